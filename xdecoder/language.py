"""Language encoder: a CLIP-style causal text transformer plus the projection into the joint space.

token ids [N, L] (L <= context length, start token first) ->
  token embeddings [N, L, D] (every token @ lang_proj, not normalised; the referring text queries)
  pooled           [N, D]    (the first end-of-text token @ lang_proj, not normalised)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TextConfig
from .layers import Attention

# Official cap on exp(logit_scale) for referring scores (class logits are not capped).
MAX_GROUNDING_SCALE = 100.0


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm with eps 1e-12, normalising in float32 whatever the input dtype (as the official
    text encoder does)."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        normed = F.layer_norm(x.float(), self.normalized_shape, None, None, self.eps).to(x.dtype)
        return normed * self.weight + self.bias


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class KeyValues(NamedTuple):
    """Attention keys and values of already-encoded positions, per layer: [B, heads, P, C / heads]."""

    keys: Tensor
    values: Tensor


class ResidualAttentionBlock(nn.Module):
    """Pre-LN causal self-attention and QuickGELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = FP32LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, width * 4),
                gelu=QuickGELU(),
                c_proj=nn.Linear(width * 4, width),
            )
        )
        self.ln_2 = FP32LayerNorm(width)

    def forward(self, x: Tensor, past: KeyValues | None = None) -> tuple[Tensor, KeyValues]:
        """x [B, L, C] are the positions after `past` (a shared prefix already encoded), if any.
        Returns the new states and this layer's keys/values for x's positions."""
        h = self.ln_1(x)
        q, k, v = self.attn.project(h, h, h)
        own = KeyValues(k, v)
        if past is None:
            attended = self.attn.attend(q, k, v, causal=True)
        else:
            prefix = past.keys.shape[2]
            k, v = torch.cat((past.keys, k), dim=2), torch.cat((past.values, v), dim=2)
            position = torch.arange(x.shape[1], device=x.device)[:, None]
            allowed = torch.arange(prefix + x.shape[1], device=x.device)[None, :] <= position + prefix
            attended = self.attn.attend(q, k, v, allowed=allowed)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), own


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.zeros(config.context_length, config.width))
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config.width, config.heads) for _ in range(config.layers))
        self.ln_final = FP32LayerNorm(config.width)

    def forward(self, token_ids: Tensor, past: list[KeyValues] | None = None) -> tuple[Tensor, list[KeyValues]]:
        """token_ids [N, L] -> (hidden states [N, L, width], per-layer keys/values of these positions).

        Causal: position i sees positions <= i, so a sequence may be cut after its end token, and a prefix
        shared by many sequences may be encoded once and passed as `past` (its per-layer keys/values,
        batch-aligned with token_ids); token_ids then hold only the positions after the prefix.
        """
        start = 0 if past is None else past[0].keys.shape[2]
        x = self.token_embedding(token_ids) + self.positional_embedding[start : start + token_ids.shape[1]]
        cache = []
        for i, block in enumerate(self.resblocks):
            x, layer_cache = block(x, None if past is None else past[i])
            cache.append(layer_cache)
        return self.ln_final(x), cache


class LanguageEncoder(nn.Module):
    def __init__(self, config: TextConfig, dim_proj: int):
        super().__init__()
        self.context_length = config.context_length
        self.lang_proj = nn.Parameter(torch.empty(config.width, dim_proj))
        nn.init.trunc_normal_(self.lang_proj, std=0.02)
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.lang_encoder = TextTransformer(config)

    def encode(self, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """token_ids [N, L] -> (token embeddings [N, L, D], pooled [N, D]), both @ lang_proj, not
        normalised. The pooled token is the first end-of-text token (the largest id)."""
        hidden, _ = self.lang_encoder(token_ids)
        tokens = hidden @ self.lang_proj
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), token_ids.argmax(dim=-1)]
        return tokens, pooled

    def similarity(self, embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
        """Class logits: exp(logit_scale) * cos(embeddings [B, N, D], class_embeddings [K, D]) -> [B, N, K]."""
        normed = embeddings / (embeddings.norm(dim=-1, keepdim=True) + 1e-7)
        return self.logit_scale.exp() * normed @ class_embeddings.to(normed.dtype).t()

    def grounding_similarity(self, embeddings: Tensor, text: Tensor) -> Tensor:
        """Referring scores: min(exp(logit_scale), 100) * cos(embeddings [N, D], text [P, D]) -> [N, P]."""
        v = embeddings / (embeddings.norm(dim=-1, keepdim=True) + 1e-7)
        t = text / (text.norm(dim=-1, keepdim=True) + 1e-7)
        return self.logit_scale.exp().clamp(max=MAX_GROUNDING_SCALE) * v @ t.to(v.dtype).t()
