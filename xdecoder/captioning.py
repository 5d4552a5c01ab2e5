"""Image captioning: the official `evaluate_captioning` (greedy decoding), computed incrementally.

The official code keeps a token buffer [B, 77] that starts as the start token everywhere and, for step
s = 0 .. steps-1, re-encodes the whole buffer with the (causal) text encoder, appends the 77 token embeddings
(@ lang_proj) to the object and class queries as caption queries (position part: the same plus
`pos_embed_caping`), re-runs the whole decoder, and writes the arg-max over the vocabulary
(`decoder_norm(output)[Q:] @ caping_embed @ token_embedding.T`) at position s into slot s + 1.

Three facts make most of that work constant, and this module skips it (same tokens, logits within float noise):
  * object and class queries never attend to caption queries (`self_attn_mask`), so their states are those of
    the plain decoder pass: computed once (`CaptionContext`), also serving panoptic and referring;
  * caption queries cross-attend to the whole memory (their attention-mask rows are all zeros), and a step has
    one query per image: rather than projecting the memory to keys and values (per layer: 2 x h*w x C^2
    multiply-adds), the query is projected into the memory's space and the attended memory back (per step:
    2 x heads x h*w x C, 1/64 of that for Focal-T), the same function up to rounding;
  * caption queries are causal among themselves and the text encoder is causal, so position s depends only on
    tokens 0..s, which do not change after step s - 1: each step encodes and decodes ONE new position, reusing
    the keys and values of the earlier ones (text encoder and decoder self-attention), and decoding stops
    once every caption of the batch has its end token (the official code always runs all steps; the text is
    cut at the first end token either way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import XDecoderConfig
from .language import KeyValues
from .tokenizer import END_TOKEN, START_TOKEN
from .transformer_decoder import NUM_LEVELS, CaptionContext, XDecoderTransformer


def caption_support(config: XDecoderConfig) -> str | None:
    """Why a model of this config cannot caption as the official code does, or None when it can."""
    decoder, text = config.decoder, config.text
    if not decoder.captioning:
        return "the checkpoint has no captioning weights (sem_seg_head.predictor.caping_embed, pos_embed_caping)"
    if decoder.num_queries < text.context_length:
        # The official code pads the cross-attention mask with min(Q, 77) rows, which fails for fewer queries.
        return (
            f"official captioning needs at least {text.context_length} queries (the text context length); "
            f"this model has {decoder.num_queries}"
        )
    if not text.width == config.dim_proj == decoder.hidden_dim:
        return (
            "official captioning needs the text width, the projection size and the decoder width to be equal "
            f"(text {text.width}, projection {config.dim_proj}, decoder {decoder.hidden_dim})"
        )
    if decoder.captioning_steps >= text.context_length:
        return f"{decoder.captioning_steps} captioning steps do not fit the {text.context_length}-token buffer"
    return None


@dataclass
class CaptionDecoding:
    """Greedy decoding of a batch of B images.

    token_buffer [B, L]: the official buffer: the start token, then the token chosen at step s in slot s + 1,
        start tokens after the last step run.
    token_log_probs [B, S]: log softmax over the vocabulary of each chosen token (S = steps run).
    embeddings [B, S, D]: the caption embedding at each step's position (before the vocabulary product).
    logits [B, S, V]: the vocabulary logits of each step, when asked for (else None).
    """

    token_buffer: Tensor
    token_log_probs: Tensor
    embeddings: Tensor
    logits: Tensor | None

    @property
    def steps(self) -> int:
        return self.token_log_probs.shape[1]

    def caption_length(self, index: int) -> int:
        """Tokens of caption `index` after the start token, up to and including its first end token."""
        generated = self.token_buffer[index, 1 : self.steps + 1]
        ends = (generated == END_TOKEN).nonzero()
        return int(ends[0, 0]) + 1 if len(ends) else self.steps


class IncrementalCaptionDecoder:
    """Caption queries decoded a few positions at a time against one image batch's `CaptionContext`.

    `advance(token_ids)` takes the tokens at the next positions and returns their caption embeddings, keeping
    the text encoder's and the decoder self-attention's keys and values for later positions.
    """

    def __init__(self, decoder: XDecoderTransformer, context: CaptionContext):
        self.decoder = decoder
        self.context_length = decoder.lang_encoder.context_length
        self.num_queries = context.object_pos.shape[1]
        self.length = 0  # positions decoded so far
        self.text_cache: list[KeyValues] | None = None
        # Per level: what the memory's keys and values are projected from: [B, h*w, C] each.
        self.memory_keys = [memory + pos for memory, pos in zip(context.memories, context.memory_pos, strict=True)]
        self.memory_values = context.memories
        self.self_keys, self.self_values = [], []
        for i, self_attn in enumerate(decoder.transformer_self_attention_layers):
            states = context.object_states[i]
            keys, values = self_attn.self_attn.project_keys_values(states + context.object_pos, states)
            # Room for every caption position after the object queries' keys and values.
            shape = (*keys.shape[:2], self.num_queries + self.context_length, keys.shape[3])
            self.self_keys.append(keys.new_empty(shape))
            self.self_values.append(values.new_empty(shape))
            self.self_keys[-1][:, :, : self.num_queries] = keys
            self.self_values[-1][:, :, : self.num_queries] = values

    def advance(self, token_ids: Tensor, all_layers: bool = False) -> list[Tensor]:
        """token_ids [B, n] at positions length .. length+n-1 -> caption embeddings [B, n, D]: a list with the final
        ones, or (all_layers) those of every prediction head, the first before any decoder layer."""
        decoder, language = self.decoder, self.decoder.lang_encoder
        start, count = self.length, token_ids.shape[1]
        if start + count > self.context_length:
            raise ValueError(f"captions are at most {self.context_length} tokens long")
        hidden, cache = language.lang_encoder(token_ids, past=self.text_cache)
        self.text_cache = (
            cache
            if self.text_cache is None
            else [
                KeyValues(torch.cat((old.keys, new.keys), dim=2), torch.cat((old.values, new.values), dim=2))
                for old, new in zip(self.text_cache, cache, strict=True)
            ]
        )
        content = hidden @ language.lang_proj
        query_pos = content + decoder.pos_embed_caping.weight[start : start + count]
        end = self.num_queries + start + count
        allowed = None
        if count > 1:  # caption queries see every object query and the caption positions up to their own
            allowed = torch.ones(count, end, dtype=torch.bool, device=content.device)
            allowed[:, self.num_queries + start :] = torch.ones(
                count, count, dtype=torch.bool, device=content.device
            ).tril()
        x = content
        outputs = [self._head(x)] if all_layers else []
        for i, (cross, self_attn, ffn) in enumerate(decoder.layers()):
            attended = self._attend_memory(cross.multihead_attn, x + query_pos, i % NUM_LEVELS)
            x = cross.norm(x + attended)
            attention = self_attn.self_attn
            q, k, v = attention.project(x + query_pos, x + query_pos, x)
            self.self_keys[i][:, :, self.num_queries + start : end] = k
            self.self_values[i][:, :, self.num_queries + start : end] = v
            attended = attention.attend(q, self.self_keys[i][:, :, :end], self.self_values[i][:, :, :end], allowed)
            x = ffn(self_attn.norm(x + attended))
            if all_layers:
                outputs.append(self._head(x))
        self.length += count
        return outputs if all_layers else [self._head(x)]

    def _attend_memory(self, attention, query: Tensor, level: int) -> Tensor:
        """Unmasked cross-attention of queries [B, n, C] to a level's memory -> [B, n, C], with the projections
        moved to the query side: score = q_h . (W_k,h key + b_k,h) = (q_h W_k,h) . key + (the same for every key,
        which softmax ignores); sum of weights x (W_v,h value + b_v,h) = W_v,h (sum of weights x value) + b_v,h."""
        batch, count, dim = query.shape
        heads = attention.num_heads
        head_dim = dim // heads
        weight, bias = attention.in_proj_weight, attention.in_proj_bias
        key_weight = weight[dim : 2 * dim].view(heads, head_dim, dim)
        value_weight = weight[2 * dim :].view(heads, head_dim, dim)
        q = attention.query_projection(query) * head_dim**-0.5  # [B, heads, n, C / heads]
        q_memory = torch.einsum("bhnd,hdc->bhnc", q, key_weight).reshape(batch, heads * count, dim)
        scores = q_memory @ self.memory_keys[level].transpose(1, 2)  # [B, heads * n, h*w]
        mixed = scores.float().softmax(dim=-1).to(q_memory.dtype) @ self.memory_values[level]
        out = torch.einsum("bhnc,hdc->bhnd", mixed.view(batch, heads, count, dim), value_weight)
        out = out + bias[2 * dim :].view(heads, 1, head_dim)
        return attention.out_proj(out.transpose(1, 2).flatten(2))

    def _head(self, x: Tensor) -> Tensor:
        """Caption queries' states [B, n, C] -> caption embeddings [B, n, D]."""
        return self.decoder.decoder_norm(x) @ self.decoder.caping_embed


def vocabulary_logits(decoder: XDecoderTransformer, embeddings: Tensor) -> Tensor:
    """Caption embeddings [..., D] -> logits over the vocabulary [..., V] (through the token embedding table)."""
    return embeddings @ decoder.lang_encoder.lang_encoder.token_embedding.weight.t()


def start_buffer(batch: int, context_length: int, device: torch.device) -> Tensor:
    """[B, L] int64, the start token everywhere (the official captioning input)."""
    return torch.full((batch, context_length), START_TOKEN, dtype=torch.long, device=device)


@torch.inference_mode()
def greedy_captions(
    decoder: XDecoderTransformer,
    context: CaptionContext,
    steps: int,
    stop_at_end: bool = True,
    keep_logits: bool = False,
) -> CaptionDecoding:
    """Greedy decoding of `steps` tokens per image (fewer when every caption has ended and `stop_at_end`).

    Same tokens as the official 50-step loop; `stop_at_end=False` runs every step as it does (parity checks).
    """
    batch = context.object_pos.shape[0]
    device = context.object_pos.device
    buffer = start_buffer(batch, decoder.lang_encoder.context_length, device)
    incremental = IncrementalCaptionDecoder(decoder, context)
    log_probs, embeddings, all_logits = [], [], []
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(steps):
        (embedding,) = incremental.advance(buffer[:, step : step + 1])
        logits = vocabulary_logits(decoder, embedding[:, 0])
        token = logits.argmax(dim=-1)
        buffer[:, step + 1] = token
        log_probs.append(logits.float().log_softmax(dim=-1).gather(1, token[:, None])[:, 0])
        embeddings.append(embedding[:, 0])
        if keep_logits:
            all_logits.append(logits)
        ended |= token == END_TOKEN
        if stop_at_end and bool(ended.all()):
            break
    return CaptionDecoding(
        buffer,
        torch.stack(log_probs, dim=1),
        torch.stack(embeddings, dim=1),
        torch.stack(all_logits, dim=1) if keep_logits else None,
    )


@torch.inference_mode()
def caption_embeddings(
    decoder: XDecoderTransformer, context: CaptionContext, token_buffer: Tensor, all_layers: bool = False
) -> list[Tensor]:
    """Every position of a token buffer [B, L] decoded at once -> caption embeddings [B, L, D] of the last
    prediction head (or of every head, the first before any decoder layer): what one official step computes."""
    return IncrementalCaptionDecoder(decoder, context).advance(token_buffer, all_layers=all_layers)


def official_self_attention_mask(num_queries: int, context_length: int, device: torch.device) -> Tensor:
    """The official `self_attn_mask` [1, 1, Q+L, Q+L] (True: may not attend): object and class queries see neither
    each other nor the caption queries; caption queries see every object and class query and the caption
    positions up to their own."""
    size = num_queries + context_length
    blocked = torch.zeros(size, size, dtype=torch.bool, device=device)
    blocked[:num_queries, num_queries:] = True
    blocked[num_queries:, num_queries:] = torch.ones(context_length, context_length, device=device).triu(1).bool()
    blocked[: num_queries - 1, num_queries - 1] = True
    blocked[num_queries - 1, : num_queries - 1] = True
    return blocked[None, None]


@torch.inference_mode()
def reference_greedy_captions(
    decoder: XDecoderTransformer, multi_scale: list[Tensor], mask_features: Tensor, steps: int
) -> CaptionDecoding:
    """The official `forward_captioning` written plainly, for tests and benchmarks: every step re-encodes the whole
    buffer, appends it to the object and class queries and re-runs the whole decoder (prediction heads with masks
    after every layer included), then keeps the arg-max at the step's position. Slow; `greedy_captions` computes
    the same tokens. multi_scale, mask_features: the pixel decoder's outputs for a batch of B images."""
    batch = mask_features.shape[0]
    num_queries = decoder.num_queries
    language = decoder.lang_encoder
    context_length = language.context_length
    memories, memory_pos, level_features = decoder.memories(multi_scale, mask_features)
    self_blocked = official_self_attention_mask(num_queries, context_length, mask_features.device)
    buffer = start_buffer(batch, context_length, mask_features.device)
    query_feat = decoder.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
    query_embed = decoder.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
    log_probs, embeddings = [], []
    for step in range(steps):
        content, _ = language.encode(buffer)
        output = torch.cat((query_feat, content), dim=1)
        query_pos = torch.cat((query_embed, content + decoder.pos_embed_caping.weight), dim=1)
        _, mask_embed = decoder._predict(output[:, :num_queries], mask_features, None, False, full_masks=True)
        for i, (cross, self_attn, ffn) in enumerate(decoder.layers()):
            level = i % NUM_LEVELS
            blocked = decoder._cross_attention_mask(mask_embed, level_features[level], False)
            # Caption queries' rows of the cross-attention mask are all False: they see the whole memory.
            blocked = torch.cat((blocked, blocked.new_zeros(batch, 1, context_length, blocked.shape[-1])), dim=2)
            output = cross(output, memories[level], memory_pos[level], query_pos, blocked)
            output = ffn(self_attn(output, query_pos, self_blocked))
            _, mask_embed = decoder._predict(output[:, :num_queries], mask_features, None, False, full_masks=True)
        caption = decoder.decoder_norm(output[:, num_queries:]) @ decoder.caping_embed
        logits = vocabulary_logits(decoder, caption[:, step])
        buffer[:, step + 1] = logits.argmax(dim=-1)
        log_probs.append(logits.float().log_softmax(dim=-1).gather(1, buffer[:, step + 1, None])[:, 0])
        embeddings.append(caption[:, step])
    return CaptionDecoding(buffer, torch.stack(log_probs, dim=1), torch.stack(embeddings, dim=1), None)
