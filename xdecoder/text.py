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
def pooled_embeddings(encoder: LanguageEncoder, token_ids: Tensor) -> Tensor:
    """Pooled embeddings [N, D] of token ids [N, L], each sequence cut after its end token and
    sequences of equal length batched together."""
    device = encoder.lang_proj.device
    ends = token_ids.argmax(dim=-1)
    pooled = torch.empty(token_ids.shape[0], encoder.lang_proj.shape[1], device=device)
    for end in ends.unique().tolist():
        rows = (ends == end).nonzero()[:, 0]
        _, group = encoder.encode(token_ids[rows, : end + 1].to(device))
        pooled[rows.to(device)] = group.float()
    return pooled


def class_name_embeddings(encoder: LanguageEncoder, tokenizer: ClipTokenizer, names: Sequence[str]) -> Tensor:
    """Template-ensemble embeddings [len(names), D], L2-normalised."""
    texts = [template.format(clean_class_name(name)) for name in names for template in PROMPT_TEMPLATES]
    token_ids, _ = tokenizer(texts)
    per_template = pooled_embeddings(encoder, token_ids)
    per_template = per_template / (per_template.norm(dim=-1, keepdim=True) + 1e-7)
    mean = per_template.view(len(names), len(PROMPT_TEMPLATES), -1).mean(dim=1)
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
