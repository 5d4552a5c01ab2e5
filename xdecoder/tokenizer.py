"""The CLIP BPE tokenizer, built offline.

The official model uses `CLIPTokenizer.from_pretrained("openai/clip-vit-base-patch32")` (slow tokenizer,
with ftfy). That download is not needed: the same BPE merges ship inside the `openai-clip` PyPI package
(`clip/bpe_simple_vocab_16e6.txt.gz`). We rebuild the vocabulary from them exactly as Hugging Face did,
hand it to `transformers.CLIPTokenizer`, and clean text with ftfy first as the slow tokenizer did.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from functools import lru_cache
from pathlib import Path

import ftfy
import torch
from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

START_TOKEN = 49406
END_TOKEN = 49407
NUM_MERGES = 49152 - 256 - 2


def bpe_vocabulary_path() -> Path:
    """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed `openai-clip` package.

    Found without importing `clip` (its __init__ imports torchvision)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the CLIP vocabulary comes from the 'openai-clip' package: pip install openai-clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"openai-clip is installed but {path} is missing")
    return path


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in its canonical order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


class ClipTokenizer:
    """Text -> fixed-length token ids, identical to the official tokenizer.

    `__call__(texts)` returns ids [N, context_length] (int64, padded with the end token) and the
    attention mask [N, context_length]. Texts longer than the context are cut (the end token is kept
    last) with a logged warning.
    """

    def __init__(self, context_length: int = 77):
        self.context_length = context_length
        with gzip.open(bpe_vocabulary_path(), "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        symbols = _byte_symbols()
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self._tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)
        self._tokenizer.add_special_tokens({"cls_token": self._tokenizer.eos_token})

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cleaned = [ftfy.fix_text(t) for t in texts]
        encoded = self._tokenizer(
            cleaned,
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
            return_overflowing_tokens=False,
        )
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        full = mask[:, -1] == 1
        if full.any():
            lengths = [len(x) for x in self._tokenizer([cleaned[i] for i in full.nonzero()[:, 0]])["input_ids"]]
            for text, length in zip((t for t, f in zip(texts, full, strict=True) if f), lengths, strict=True):
                if length > self.context_length:
                    logger.warning("text of %d tokens cut to the model's %d: %.80r", length, self.context_length, text)
        return ids.long(), mask.long()

    def caption_text(self, token_buffer: list[int]) -> str:
        """The official caption text of a token buffer (start token first): decoded with its special tokens, cut
        at the first end token, start tokens removed, stripped (`forward_captioning`), then cut at the first '.'
        (`evaluate_captioning`)."""
        text = self._tokenizer.decode(token_buffer, skip_special_tokens=False)
        text = text.split(self._tokenizer.eos_token)[0].replace(self._tokenizer.bos_token, "").strip()
        return text.split(".")[0]


@lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77) -> ClipTokenizer:
    """Process-wide tokenizer (building it reads the 1.3 MB vocabulary)."""
    return ClipTokenizer(context_length)
