"""The X-Decoder transformer decoder (Mask2Former-style masked attention plus text-aware queries).

Queries: `num_queries - 1` object queries and one class query (the last row). Each layer runs masked
cross-attention to one pixel-decoder level (strides 32, 16, 8 in turn), self-attention and an FFN, all
post-norm. Before the first layer and after every layer the prediction head gives, per query:
  logits   [B, N, K+1]  similarity to the K+1 class-name embeddings (the last is "background")
  masks    [B, N, H/4, W/4]  mask logits
  captions [B, N, D]    the query's embedding in the joint text space (`decoder_output @ class_embed`)

Referring ("grounding") mode adds `num_queries - 1` copies of the object queries and appends the
prompt's text tokens to the self-attention; the copies and the tokens see each other and never the
object block, so rows 0..Q-1 are exactly the panoptic ones and one pass serves both tasks.
N = Q in plain mode, 2Q - 1 in grounding mode (rows Q.. are the grounding queries).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DecoderConfig
from .language import LanguageEncoder
from .layers import MLP, Attention, sine_position_embedding

NUM_LEVELS = 3


@dataclass
class QueryPredictions:
    """One prediction-head output. `logits` is None when no class embeddings were given; `masks` is
    None for intermediate layers unless the decoder was asked for every layer's masks."""

    logits: Tensor | None
    masks: Tensor | None
    captions: Tensor


@dataclass
class CaptionContext:
    """What caption queries read from one decoder pass over an image batch, none of which depends on the caption
    (object and class queries never attend to caption queries): per level the memory [B, h*w, C] and its position
    embedding [1, h*w, C]; per layer the object and class queries entering self-attention [B, Q, C] (after
    cross-attention), and their position embeddings `object_pos` [B, Q, C]."""

    memories: list[Tensor]
    memory_pos: list[Tensor]
    object_states: list[Tensor]
    object_pos: Tensor


@dataclass
class DecoderOutput:
    layers: list[QueryPredictions]  # the first on the learnable queries, the last is the final output
    num_queries: int
    caption_context: CaptionContext | None = None

    @property
    def final(self) -> QueryPredictions:
        return self.layers[-1]

    @property
    def object_logits(self) -> Tensor:
        """[B, Q, K+1] class logits of the object queries and the class query."""
        return self.final.logits[:, : self.num_queries]

    @property
    def object_masks(self) -> Tensor:
        """[B, Q, H/4, W/4]."""
        return self.final.masks[:, : self.num_queries]

    @property
    def grounding_masks(self) -> Tensor:
        """[B, Q-1, H/4, W/4] mask logits of the grounding queries."""
        return self.final.masks[:, self.num_queries :]

    @property
    def grounding_captions(self) -> Tensor:
        """[B, Q-1, D]."""
        return self.final.captions[:, self.num_queries :]


@dataclass
class GroundingTokens:
    """Text tokens for referring: `tokens` [B, T, D] (prompt token embeddings @ lang_proj, all prompts of
    an image concatenated) and `padding` [B, T] (True where a row is shorter than T)."""

    tokens: Tensor
    padding: Tensor | None = None


class SelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, query_pos: Tensor, blocked: Tensor | None) -> Tensor:
        q = x + query_pos
        return self.norm(x + self.self_attn(q, q, x, blocked))


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.multihead_attn = Attention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, memory: Tensor, memory_pos: Tensor, query_pos: Tensor, blocked: Tensor) -> Tensor:
        attended = self.multihead_attn(x + query_pos, memory + memory_pos, memory, blocked)
        return self.norm(x + attended)


class FFNLayer(nn.Module):
    def __init__(self, dim: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class XDecoderTransformer(nn.Module):
    def __init__(
        self,
        config: DecoderConfig,
        in_channels: int,
        mask_dim: int,
        dim_proj: int,
        language_encoder: LanguageEncoder,
    ):
        super().__init__()
        hidden = config.hidden_dim
        self.num_queries = config.num_queries
        self.num_heads = config.nheads
        num_layers = config.dec_layers - 1
        self.class_embed = nn.Parameter(torch.empty(hidden, dim_proj))
        nn.init.trunc_normal_(self.class_embed, std=0.02)
        if config.captioning:
            # Captioning head (xdecoder.captioning decodes with it).
            self.caping_embed = nn.Parameter(torch.zeros(hidden, dim_proj))
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden, config.nheads) for _ in range(num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden, config.nheads) for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden, config.dim_feedforward) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden)
        self.query_feat = nn.Embedding(config.num_queries, hidden)
        self.query_embed = nn.Embedding(config.num_queries, hidden)
        self.level_embed = nn.Embedding(NUM_LEVELS, hidden)
        if in_channels != hidden or config.enforce_input_proj:
            self.input_proj = nn.ModuleList(nn.Conv2d(in_channels, hidden, 1) for _ in range(NUM_LEVELS))
        else:
            self.input_proj = None
        self.lang_encoder = language_encoder
        self.mask_embed = MLP(hidden, hidden, mask_dim, 3)
        if config.captioning:
            self.pos_embed_caping = nn.Embedding(language_encoder.context_length, hidden)

    def forward(
        self,
        multi_scale: list[Tensor],
        mask_features: Tensor,
        class_embeddings: Tensor | None,
        grounding: GroundingTokens | None = None,
        all_layer_masks: bool = False,
        caption_context: bool = False,
    ) -> DecoderOutput:
        """multi_scale: 3 maps [B, C, h_i, w_i] (strides 32, 16, 8); mask_features [B, M, H/4, W/4];
        class_embeddings [K+1, D] L2-normalised (last row "background"), or None to skip logits.
        all_layer_masks: also return the full-resolution masks of the intermediate layers (for deep
        supervision and parity checks; inference needs only the final ones).
        caption_context: also return what captioning reads from this pass (`DecoderOutput.caption_context`)."""
        batch = mask_features.shape[0]
        memories, memory_pos, level_features = self.memories(multi_scale, mask_features)
        output = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        if grounding is not None:
            output = torch.cat((output, output[:, :-1]), dim=1)
            query_pos = torch.cat((query_pos, query_pos[:, :-1]), dim=1)
            text_state = grounding.tokens
            query_pos = torch.cat((query_pos, grounding.tokens), dim=1)
        self_blocked = self._self_attention_mask(grounding, output.device)
        num_layers = len(self.transformer_ffn_layers)
        grounded = grounding is not None
        object_pos = query_pos[:, : self.num_queries]
        object_states = []

        prediction, mask_embed = self._predict(output, mask_features, class_embeddings, grounded, all_layer_masks)
        predictions = [prediction]
        for i, (cross, self_attn, ffn) in enumerate(self.layers()):
            level = i % NUM_LEVELS
            blocked = self._cross_attention_mask(mask_embed, level_features[level], grounded)
            num_rows = output.shape[1]
            output = cross(output, memories[level], memory_pos[level], query_pos[:, :num_rows], blocked)
            if caption_context:
                object_states.append(output[:, : self.num_queries])
            if grounding is not None:
                output = torch.cat((output, text_state), dim=1)
            output = ffn(self_attn(output, query_pos, self_blocked))
            if grounding is not None:
                output, text_state = output[:, :num_rows], output[:, num_rows:]
            full_masks = all_layer_masks or i == num_layers - 1
            prediction, mask_embed = self._predict(output, mask_features, class_embeddings, grounded, full_masks)
            predictions.append(prediction)
        context = CaptionContext(memories, memory_pos, object_states, object_pos) if caption_context else None
        return DecoderOutput(predictions, self.num_queries, context)

    def layers(self) -> Iterator[tuple[CrossAttentionLayer, SelfAttentionLayer, FFNLayer]]:
        """The decoder layers in order, each as its cross-attention, self-attention and FFN parts."""
        return zip(
            self.transformer_cross_attention_layers,
            self.transformer_self_attention_layers,
            self.transformer_ffn_layers,
            strict=True,
        )

    def memories(
        self, multi_scale: list[Tensor], mask_features: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: the memory [B, h*w, C] (projected, plus the level embedding), its sine position embedding
        [1, h*w, C], and the mask features resized to the level [B, M, h, w] (for the cross-attention masks)."""
        memories, memory_pos, level_features = [], [], []
        # A query attends where its mask, resized to the level, is on. Resizing is linear, so resizing
        # the mask features once per level equals resizing every layer's masks (and is ~10x cheaper).
        # (Float32, channels-first: antialiased bicubic has no half-precision CPU kernel and is several
        # times slower on channels_last tensors.)
        dense = mask_features.float().contiguous()
        hidden = self.query_feat.embedding_dim
        for level, x in enumerate(multi_scale):
            pos = sine_position_embedding(*x.shape[-2:], hidden // 2, x.device).to(x.dtype)
            memory_pos.append(pos.flatten(2).transpose(1, 2))
            projected = x if self.input_proj is None else self.input_proj[level](x)
            memories.append(projected.flatten(2).transpose(1, 2) + self.level_embed.weight[level])
            level_features.append(
                F.interpolate(dense, size=x.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
            )
        return memories, memory_pos, level_features

    def _predict(
        self,
        output: Tensor,
        mask_features: Tensor,
        class_embeddings: Tensor | None,
        grounding: bool,
        full_masks: bool,
    ) -> tuple[QueryPredictions, Tensor]:
        """Prediction head on decoder states [B, N, C] -> (predictions, mask embeddings [B, N, M])."""
        q = self.num_queries
        decoded = self.decoder_norm(output)
        # The class query is re-pooled from the object queries it is most similar to.
        normed = decoded / (decoded.norm(dim=-1, keepdim=True) + 1e-7)
        weights = (normed[:, q - 1 : q] @ normed[:, : q - 1].transpose(1, 2)).softmax(dim=-1)
        class_query = weights @ decoded[:, : q - 1]
        parts = [decoded[:, : q - 1], class_query]
        if grounding:
            parts.append(decoded[:, q:])
        decoded = torch.cat(parts, dim=1)

        captions = decoded @ self.class_embed
        logits = None
        if class_embeddings is not None:
            logits = self.lang_encoder.similarity(captions, class_embeddings)
        mask_embed = self.mask_embed(decoded)
        masks = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features) if full_masks else None
        return QueryPredictions(logits, masks, captions), mask_embed

    def _cross_attention_mask(self, mask_embed: Tensor, level_features: Tensor, grounding: bool) -> Tensor:
        """Queries attend only where their current mask is on (sigmoid >= 0.5 at the level's size).
        mask_embed [B, N, M], level_features [B, M, h, w] -> blocked [B, 1, N, h*w]."""
        logits = torch.einsum("bqc,bcl->bql", mask_embed.float(), level_features.flatten(2))
        blocked = logits.sigmoid() < 0.5
        if grounding:
            # Official quirk (meant for the class token): the first grounding query sees everything.
            blocked[:, self.num_queries] = False
        blocked[blocked.all(dim=-1)] = False
        return blocked.unsqueeze(1)

    def _self_attention_mask(self, grounding: GroundingTokens | None, device: torch.device) -> Tensor:
        """Blocked [B or 1, 1, L, L]: object queries and the class query do not see each other; grounding
        queries and text tokens see only each other (and not padded tokens)."""
        q = self.num_queries
        size = q if grounding is None else 2 * q - 1 + grounding.tokens.shape[1]
        blocked = torch.ones(size, size, dtype=torch.bool, device=device)
        blocked[: q - 1, : q - 1] = False
        blocked[q - 1, q - 1] = False
        blocked[q:, q:] = False
        blocked = blocked[None, None]
        if grounding is not None and grounding.padding is not None:
            pad_columns = torch.zeros(grounding.padding.shape[0], size, dtype=torch.bool, device=device)
            pad_columns[:, 2 * q - 1 :] = grounding.padding
            blocked = blocked | pad_columns[:, None, None, :]
        return blocked
