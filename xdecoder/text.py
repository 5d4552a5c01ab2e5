"""Text to embeddings: class names through the prompt-template ensemble, referring prompts to tokens.

Class names are embedded as the official evaluation does: each of the 81 templates filled with the
name, pooled and L2-normalised, averaged, and normalised again. Two shortcuts keep this fast and give
identical results: sequences are cut after their end token (the encoder is causal) and grouped by
length so no padding is computed; and results are cached per (language-encoder fingerprint, name).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .language import LanguageEncoder
from .templates import PROMPT_TEMPLATES
from .tokenizer import ClipTokenizer
from .transformer_decoder import GroundingTokens

BACKGROUND = "background"


def clean_class_name(name: str) -> str:
    """COCO's panoptic suffixes are not part of the name the text encoder reads."""
    return name.replace("-other", "").replace("-merged", "").replace("-stuff", "")


def language_fingerprint(encoder: LanguageEncoder) -> str:
    """A digest of the language encoder's weights: equal digests give equal embeddings."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def shared_prefix_pooled(encoder: LanguageEncoder, token_ids: Tensor) -> Tensor:
    """Pooled embeddings [G, M, D] of G groups of M token sequences [G, M, L].

    Within a group the sequences usually share a prefix (a template's words before the class name);
    the encoder is causal, so that prefix is encoded once and the members continue from its keys and
    values. Each member is cut after its end token. Same result as encoding every sequence alone.
    """
    device = encoder.lang_proj.device
    token_ids = token_ids.to(device)
    groups, members, length = token_ids.shape
    ends = token_ids.argmax(dim=-1)  # first end token: the largest id
    agree = (token_ids == token_ids[:, :1]).all(dim=1).long()  # [G, L]
    # Shared prefix: agreeing positions up to the earliest end token, which stays with the members.
    prefix_lengths = torch.minimum(agree.cumprod(dim=1).sum(dim=1), ends.min(dim=1).values)
    pooled = torch.empty(groups, members, encoder.lang_proj.shape[1], device=device)
    for prefix in prefix_lengths.unique().tolist():
        group = (prefix_lengths == prefix).nonzero()[:, 0]
        cache = None
        if prefix > 0:
            _, cache = encoder.lang_encoder(token_ids[group, 0, :prefix])
            cache = [type(kv)(*(t.repeat_interleave(members, dim=0) for t in kv)) for kv in cache]
        group_ends = ends[group].flatten()
        rest = token_ids[group, :, prefix : int(group_ends.max()) + 1].flatten(0, 1)
        hidden, _ = encoder.lang_encoder(rest, past=cache)
        last = hidden[torch.arange(len(rest), device=device), group_ends - prefix]
        pooled[group] = (last @ encoder.lang_proj).float().view(len(group), members, -1)
    return pooled


def template_embeddings(encoder: LanguageEncoder, tokenizer: ClipTokenizer, names: Sequence[str]) -> Tensor:
    """[len(names), templates, D]: each prompt template filled with each name, pooled, L2-normalised."""
    texts = [template.format(clean_class_name(name)) for template in PROMPT_TEMPLATES for name in names]
    token_ids, _ = tokenizer(texts)
    pooled = shared_prefix_pooled(encoder, token_ids.view(len(PROMPT_TEMPLATES), len(names), -1))
    pooled = pooled / (pooled.norm(dim=-1, keepdim=True) + 1e-7)
    return pooled.transpose(0, 1)


def class_name_embeddings(encoder: LanguageEncoder, tokenizer: ClipTokenizer, names: Sequence[str]) -> Tensor:
    """Template-ensemble embeddings [len(names), D], L2-normalised."""
    mean = template_embeddings(encoder, tokenizer, names).mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)


@dataclass
class PromptEmbeddings:
    """Referring prompts: `tokens[i]` [T_i, D] are prompt i's tokens from start to end token (@ lang_proj,
    not normalised) and `pooled` [P, D] its end-token embeddings."""

    tokens: list[Tensor]
    pooled: Tensor

    def concatenated(self) -> Tensor:
        """[sum T_i, D]: all prompts' tokens in one sequence, as the official multi-prompt call feeds them."""
        return torch.cat(self.tokens, dim=0)


@torch.inference_mode()
def prompt_embeddings(encoder: LanguageEncoder, tokenizer: ClipTokenizer, prompts: Sequence[str]) -> PromptEmbeddings:
    token_ids, attention = tokenizer(list(prompts))
    lengths = attention.sum(dim=1)
    longest = int(lengths.max())
    tokens, pooled = encoder.encode(token_ids[:, :longest].to(encoder.lang_proj.device))
    return PromptEmbeddings([tokens[i, : int(n)] for i, n in enumerate(lengths)], pooled)


def grounding_tokens(prompt_data: Sequence[PromptEmbeddings | None]) -> GroundingTokens | None:
    """The decoder's grounding input for a batch: per image its prompts' tokens concatenated, padded to a
    common length (padding is never attended); None when no image has prompts."""
    if all(p is None for p in prompt_data):
        return None
    sequences = [p.concatenated() if p is not None else None for p in prompt_data]
    reference = next(s for s in sequences if s is not None)
    longest = max(len(s) for s in sequences if s is not None)
    tokens = reference.new_zeros(len(sequences), longest, reference.shape[-1])
    padding = torch.ones(len(sequences), longest, dtype=torch.bool, device=reference.device)
    for i, seq in enumerate(sequences):
        if seq is not None:
            tokens[i, : len(seq)] = seq
            padding[i, : len(seq)] = False
    return GroundingTokens(tokens, padding if padding.any() else None)


class ClassEmbeddingCache:
    """Thread-safe LRU of class-name embeddings keyed by (language fingerprint, cleaned name).

    Entries live on the CPU in float32; a fine-tuned model whose language encoder is unchanged shares
    its predecessor's entries.
    """

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, fingerprint: str, encoder: LanguageEncoder, tokenizer: ClipTokenizer, names: Sequence[str]) -> Tensor:
        """Embeddings [len(names), D] on the encoder's device, computing only the missing names."""
        cleaned = [clean_class_name(n) for n in names]
        found: dict[str, Tensor] = {}
        with self._lock:
            for name in cleaned:
                if (fingerprint, name) in self._entries:
                    self._entries.move_to_end((fingerprint, name))
                    found[name] = self._entries[(fingerprint, name)]
        missing = [n for n in dict.fromkeys(cleaned) if n not in found]
        if missing:
            computed = class_name_embeddings(encoder, tokenizer, missing).float().cpu()
            found.update(zip(missing, computed, strict=True))
            with self._lock:
                for name in missing:
                    self._entries[(fingerprint, name)] = found[name]
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return torch.stack([found[n] for n in cleaned]).to(encoder.lang_proj.device)


# Shared by every Predictor in the process.
CLASS_EMBEDDING_CACHE = ClassEmbeddingCache()
