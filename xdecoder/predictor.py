"""Predictor: images and words in, masks out, at each image's original size (or, for large images, at most
`max_output_pixels`).

    predictor = Predictor(load_model("xdecoder_focalt_last.pt"))
    result = predictor.panoptic(image, ["person", "car", "sky"], stuff={"sky"})
    result.id_map, result.segments
    predictor.referring(image, ["the red car on the left"]).masks
    predictor.caption(image).text                          # models with the captioning head (can_caption)
    predictor.rank(image, ["a dog on grass", "a city street"]).probabilities
    predictor.classify(image, ["dog", "cat"])              # image-level label probabilities
    both = predictor.predict(image, labels=[...], prompts=[...], caption=True)   # the image is encoded once

Images may be PIL images or numpy arrays (see `xdecoder.image.to_rgb`), one or a list, or images made ready
ahead with `predictor.prepare(image)`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import postprocess
from .captioning import CaptionDecoding, greedy_captions
from .image import ImageInput, ResizePolicy, rgb_pixels
from .language import MAX_GROUNDING_SCALE
from .model import XDecoderModel
from .postprocess import Geometry
from .text import (
    BACKGROUND,
    CLASS_EMBEDDING_CACHE,
    ClassEmbeddingCache,
    grounding_tokens,
    language_fingerprint,
    prompt_embeddings,
)
from .tokenizer import get_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class Segment:
    """One panoptic segment. `score` is the class probability of its query (max over merged stuff
    queries); `mask_score` the mean mask probability over the query's foreground."""

    id: int
    label: str
    label_index: int
    is_thing: bool
    score: float
    mask_score: float
    area: int


@dataclass
class PanopticResult:
    id_map: np.ndarray  # [H, W] int32; 0 where no segment, else Segment.id
    segments: list[Segment]

    def mask(self, segment_id: int) -> np.ndarray:
        return self.id_map == segment_id


@dataclass
class SemanticResult:
    label_map: np.ndarray  # [H, W] int32 index into `labels`
    score_map: np.ndarray  # [H, W] float32
    labels: list[str]


@dataclass
class ReferringResult:
    prompts: list[str]
    masks: np.ndarray  # [P, H, W] bool
    scores: np.ndarray  # [P] matched query's similarity: min(exp(logit_scale), 100) * cosine
    probabilities: np.ndarray  # [P] softmax of those similarities over the grounding queries, at the match
    mask_scores: np.ndarray  # [P] mean mask probability inside each mask
    matched_query: np.ndarray  # [P] grounding query index


@dataclass
class Caption:
    """A caption as the official `evaluate_captioning` gives it (greedy decoding).

    text: the decoded tokens cut at the first end token, then at the first '.' (the official text rule).
    token_ids: the greedy tokens after the start token, up to and including the first end token (all of them,
        `captioning_steps`, when none ended the caption).
    score: the geometric mean of those tokens' softmax probabilities over the vocabulary, exp(mean(log p)), in
        (0, 1]: how sure the greedy decoding was, not a calibrated probability that the caption is right.
    """

    text: str
    token_ids: list[int]
    score: float


@dataclass
class TextRanking:
    """Texts ranked against an image as the official retrieval evaluator scores them.

    similarity: [N] float32, 0.5 * cosine(backbone embedding, text) + 0.5 * cosine(decoder embedding, text): the
        backbone embedding is the mean of the stride-32 backbone map @ backbone_proj, the decoder embedding the
        re-pooled class query @ class_embed, a text's embedding its end token @ lang_proj (no prompt templates).
    probabilities: [N] float32, softmax over the N texts of similarity * min(exp(logit_scale), 100).
    """

    texts: list[str]
    similarity: np.ndarray
    probabilities: np.ndarray


@dataclass
class Prediction:
    panoptic: PanopticResult | None = None
    semantic: SemanticResult | None = None
    referring: ReferringResult | None = None
    caption: Caption | None = None
    ranking: TextRanking | None = None
    classification: np.ndarray | None = None  # [L] see Predictor.classify


@dataclass(frozen=True)
class Vocabulary:
    """Labels as the caller names them, and the texts the model reads for them.

    A label reads as itself unless `synonyms` gives it other texts; synonyms' probabilities add up.
    """

    labels: tuple[str, ...]
    is_thing: tuple[bool, ...]
    texts: tuple[str, ...]  # what the text encoder embeds (without the trailing "background")
    text_to_label: tuple[int, ...]

    @classmethod
    def build(
        cls,
        labels: Sequence[str],
        stuff: Collection[str] = (),
        synonyms: Mapping[str, Sequence[str]] | None = None,
    ) -> Vocabulary:
        if isinstance(labels, str):
            raise ValueError("labels must be a list of names, not a single string")
        labels = tuple(labels)
        if not labels:
            raise ValueError("labels must not be empty")
        for label in labels:
            if not isinstance(label, str) or not label.strip():
                raise ValueError(f"labels must be non-empty strings, got {label!r}")
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"duplicate labels: {duplicates}")
        unknown = sorted(set(stuff) - set(labels))
        if unknown:
            raise ValueError(f"stuff names that are not labels: {unknown}")
        synonyms = dict(synonyms or {})
        unknown = sorted(set(synonyms) - set(labels))
        if unknown:
            raise ValueError(f"synonyms given for names that are not labels: {unknown}")
        texts, text_to_label = [], []
        for index, label in enumerate(labels):
            names = list(synonyms.get(label) or [label])
            for name in names:
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"synonyms of {label!r} must be non-empty strings, got {name!r}")
            texts += names
            text_to_label += [index] * len(names)
        if BACKGROUND in texts:
            logger.warning("a label reads %r, which the model also uses for 'no object'", BACKGROUND)
        return cls(labels, tuple(label not in stuff for label in labels), tuple(texts), tuple(text_to_label))

    @property
    def has_synonyms(self) -> bool:
        return len(self.texts) != len(self.labels)


@dataclass(frozen=True, eq=False)  # compared by identity: it holds an array
class PreparedImage:
    """An image made ready for one Predictor (`Predictor.prepare`), which `predict` takes in place of the image."""

    resized: np.ndarray  # [h, w, 3] uint8, what the model sees
    output_size: tuple[int, int]  # (height, width) of the results
    image_size: tuple[int, int]  # (height, width) of the image
    prepared_for: tuple  # the resize policy and size limit it was made with


@dataclass(frozen=True)
class _Tasks:
    vocabulary: Vocabulary | None
    panoptic: bool
    semantic: bool
    caption: bool = False
    classify: bool = False
    rank_texts: tuple[str, ...] = ()


class Predictor:
    """Runs an XDecoderModel on images.

    short_side / max_long_side: resize policy (see ResizePolicy). object_mask_threshold: minimum class
    probability of a panoptic query; overlap_threshold: minimum share of its own mask a query must
    win. batch_size: images per forward pass (images of a batch are padded to a common size, which
    changes results slightly, as in the official code). autocast: None = bf16 on CUDA (fp16 where
    bf16 is unsupported) and off on CPU; False = off; or a dtype. max_output_pixels: results of images
    with more pixels are made at a smaller size of the same shape, with at most that many (None: at the
    image's size, as the official code). The masks come from the model at a quarter of its input size, so
    a 12 MP photo's results at 4 MP keep what the model resolves, and cost half or less to merge.
    """

    def __init__(
        self,
        model: XDecoderModel,
        *,
        short_side: int = 512,
        max_long_side: int | None = 1333,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        batch_size: int = 1,
        autocast: bool | torch.dtype | None = None,
        embedding_cache: ClassEmbeddingCache = CLASS_EMBEDDING_CACHE,
        max_output_pixels: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if max_output_pixels is not None and max_output_pixels < 1:
            raise ValueError("max_output_pixels must be at least 1 (or None: no limit)")
        self.model = model.eval()
        self.resize_policy = ResizePolicy(short_side, max_long_side)
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.batch_size = batch_size
        self.max_output_pixels = max_output_pixels
        self.autocast_dtype = _autocast_dtype(autocast, model.device)
        self.tokenizer = get_tokenizer(model.language.context_length)
        self.embedding_cache = embedding_cache
        self.fingerprint = language_fingerprint(model.language)

    # ------------------------------------------------------------------------------------ tasks
    def panoptic(
        self,
        images: ImageInput | PreparedImage | Sequence[ImageInput | PreparedImage],
        labels: Sequence[str],
        stuff: Collection[str] = (),
        synonyms: Mapping[str, Sequence[str]] | None = None,
    ) -> PanopticResult | list[PanopticResult]:
        """Every pixel assigned to one of `labels` or left void (0). `stuff` names the labels that are
        amorphous (one segment per label); the others get one segment per instance."""
        return self._map(self.predict(images, labels=labels, stuff=stuff, synonyms=synonyms), "panoptic")

    def semantic(
        self,
        images: ImageInput | PreparedImage | Sequence[ImageInput | PreparedImage],
        labels: Sequence[str],
        synonyms: Mapping[str, Sequence[str]] | None = None,
    ) -> SemanticResult | list[SemanticResult]:
        predictions = self.predict(images, labels=labels, synonyms=synonyms, semantic=True, panoptic=False)
        return self._map(predictions, "semantic")

    def referring(
        self,
        images: ImageInput | PreparedImage | Sequence[ImageInput | PreparedImage],
        prompts: Sequence[str] | Sequence[Sequence[str]],
    ) -> ReferringResult | list[ReferringResult]:
        """One mask per prompt. Several prompts in one call are decoded together (their tokens form one
        sequence, as in the official model), so each can see the others."""
        return self._map(self.predict(images, prompts=prompts), "referring")

    def caption(
        self, images: ImageInput | PreparedImage | Sequence[ImageInput | PreparedImage]
    ) -> Caption | list[Caption]:
        """The official greedy caption of each image (ValueError on a model that cannot caption: `can_caption`)."""
        return self._map(self.predict(images, caption=True), "caption")

    def rank(
        self, images: ImageInput | PreparedImage | Sequence[ImageInput | PreparedImage], texts: Sequence[str]
    ) -> TextRanking | list[TextRanking]:
        """`texts` scored against each image as the official image-text retrieval does (see TextRanking)."""
        return self._map(self.predict(images, rank_texts=texts), "ranking")

    def classify(
        self,
        images: ImageInput | PreparedImage | Sequence[ImageInput | PreparedImage],
        labels: Sequence[str],
        synonyms: Mapping[str, Sequence[str]] | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Image-level label probabilities [L] (float32) from the class query's logits (the official
        `evaluate_classification`, with the prompt-template class embeddings): a softmax over the labels' texts
        ("background" left out: it is no image-level class), synonyms adding up."""
        predictions = self.predict(images, labels=labels, synonyms=synonyms, panoptic=False, classify=True)
        return self._map(predictions, "classification")

    def predict(
        self,
        images: ImageInput | PreparedImage | Sequence[ImageInput | PreparedImage],
        labels: Sequence[str] = (),
        stuff: Collection[str] = (),
        prompts: Sequence[str] | Sequence[Sequence[str]] = (),
        synonyms: Mapping[str, Sequence[str]] | None = None,
        semantic: bool = False,
        panoptic: bool = True,
        caption: bool = False,
        rank_texts: Sequence[str] = (),
        classify: bool = False,
    ) -> Prediction | list[Prediction]:
        """Panoptic (and semantic) for `labels`, referring for `prompts`, the caption (`caption=True`), `rank_texts`
        ranked (`Prediction.ranking`) and label probabilities (`classify=True`, `Prediction.classification`), all
        from ONE image encoding (backbone and pixel decoder once per image).

        prompts: a list of strings for every image, or (with a list of images) one list per image.
        rank_texts: a list of strings ranked for every image.
        """
        single = not isinstance(images, list | tuple)
        image_list = [images] if single else list(images)
        if not image_list:
            return []
        vocabulary = Vocabulary.build(labels, stuff, synonyms) if labels else None
        if vocabulary is None and (semantic or stuff or synonyms or classify):
            raise ValueError("labels are required for panoptic, semantic and classification results")
        per_image_prompts = _per_image(prompts, len(image_list), single)
        rank_texts = _texts(rank_texts, "rank_texts")
        if caption and not self.model.can_caption:
            raise ValueError(f"this model cannot caption: {self.model.caption_support}")
        if vocabulary is None and not (any(per_image_prompts) or caption or rank_texts):
            raise ValueError("nothing to predict: give labels, prompts, caption=True or rank_texts")
        tasks = _Tasks(vocabulary, vocabulary is not None and panoptic, semantic, caption, classify, rank_texts)
        rank_embeddings = self.text_embeddings(rank_texts) if rank_texts else None
        results = []
        for start in range(0, len(image_list), self.batch_size):
            end = start + self.batch_size
            results += self._predict_batch(image_list[start:end], tasks, per_image_prompts[start:end], rank_embeddings)
        return results[0] if single else results

    # ------------------------------------------------------------------------------- embeddings
    def class_embeddings(self, texts: Sequence[str]) -> Tensor:
        """[len(texts) + 1, D] L2-normalised template-ensemble embeddings, "background" appended."""
        return self.embedding_cache.get(self.fingerprint, self.model.language, self.tokenizer, [*texts, BACKGROUND])

    def text_embeddings(self, texts: Sequence[str]) -> Tensor:
        """[N, D] retrieval embeddings of whole texts: each text's end token @ lang_proj (the official
        `get_text_token_embeddings(text)['class_emb']`: no prompt templates, not normalised)."""
        return prompt_embeddings(self.model.language, self.tokenizer, texts).pooled

    def prepare(self, image: ImageInput | PreparedImage) -> PreparedImage:
        """The image converted to RGB and resized for the model, which `predict` does itself; done ahead (on
        another thread, say), it keeps that work off the model's way. Large images take 0.1-0.2 s. A PIL image
        opened lazily is loaded here: give each thread images of its own, or `load()` them first."""
        settings = (self.resize_policy, self.max_output_pixels)
        if isinstance(image, PreparedImage):
            if image.prepared_for != settings:
                raise ValueError("the image was prepared by a Predictor with another resize policy or size limit")
            return image
        rgb = rgb_pixels(image)
        size = (rgb.height, rgb.width) if isinstance(rgb, Image.Image) else rgb.shape[:2]
        return PreparedImage(self.resize_policy.resize(rgb), output_size(size, self.max_output_pixels), size, settings)

    # -------------------------------------------------------------------------------- internals
    def _predict_batch(
        self,
        images: list[ImageInput | PreparedImage],
        tasks: _Tasks,
        prompts: list[list[str]],
        rank_embeddings: Tensor | None,
    ) -> list[Prediction]:
        prepared = [self.prepare(img) for img in images]
        model = self.model
        vocabulary = tasks.vocabulary
        with torch.inference_mode():
            class_embeddings = self.class_embeddings(vocabulary.texts) if vocabulary else None
            prompt_data = [prompt_embeddings(model.language, self.tokenizer, p) if p else None for p in prompts]
            batch = model.prepare_images([torch.tensor(p.resized).permute(2, 0, 1) for p in prepared])
            with self._autocast():
                features = model.encode_image(batch.pixels)
                output = model.decode(
                    features, class_embeddings, grounding_tokens(prompt_data), caption_context=tasks.caption
                )
                captions = self._captions(output.caption_context) if tasks.caption else None
                rankings = self._rankings(features, output, rank_embeddings) if tasks.rank_texts else None
            text_to_label = None
            if vocabulary is not None and vocabulary.has_synonyms:
                text_to_label = torch.tensor(vocabulary.text_to_label, device=model.device)
            results = []
            for i, image in enumerate(prepared):
                geometry = Geometry(tuple(batch.pixels.shape[-2:]), batch.sizes[i], image.output_size)
                prediction = Prediction()
                if vocabulary is not None:
                    probs = postprocess.group_probabilities(
                        output.object_logits[i], text_to_label, len(vocabulary.labels)
                    )
                    masks = output.object_masks[i]
                    if tasks.panoptic:
                        prediction.panoptic = self._panoptic_result(probs, masks, vocabulary, geometry)
                    if tasks.semantic:
                        label_map, score_map = postprocess.semantic(probs, masks, geometry)
                        prediction.semantic = SemanticResult(
                            label_map.cpu().numpy(), score_map.cpu().numpy(), list(vocabulary.labels)
                        )
                if prompt_data[i] is not None:
                    similarity = model.language.grounding_similarity(
                        output.grounding_captions[i], prompt_data[i].pooled
                    )
                    match = postprocess.referring(similarity, output.grounding_masks[i], geometry)
                    prediction.referring = ReferringResult(
                        list(prompts[i]),
                        match.masks.cpu().numpy(),
                        match.similarity.cpu().numpy(),
                        match.probability.cpu().numpy(),
                        match.mask_scores.cpu().numpy(),
                        match.query.cpu().numpy(),
                    )
                if tasks.classify:
                    prediction.classification = _label_probabilities(
                        output.object_logits[i, -1], text_to_label, len(vocabulary.labels)
                    )
                if captions is not None:
                    prediction.caption = captions[i]
                if rankings is not None:
                    similarity, probabilities = rankings
                    prediction.ranking = TextRanking(list(tasks.rank_texts), similarity[i], probabilities[i])
                results.append(prediction)
        return results

    def _captions(self, context) -> list[Caption]:
        decoding: CaptionDecoding = greedy_captions(
            self.model.decoder, context, self.model.config.decoder.captioning_steps
        )
        buffers = decoding.token_buffer.cpu()
        captions = []
        for i, buffer in enumerate(buffers.tolist()):
            length = decoding.caption_length(i)
            score = float(decoding.token_log_probs[i, :length].mean().exp())
            captions.append(Caption(self.tokenizer.caption_text(buffer), buffer[1 : length + 1], score))
        return captions

    def _rankings(self, features, output, text_embeddings: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(similarity, probabilities), each [B, N] float32: see TextRanking."""
        model = self.model
        backbone, decoder = model.backbone_embedding(features), model.decoder_embedding(output)
        with torch.autocast(model.device.type, enabled=False):  # scores in float32 whatever the model ran in
            texts = _unit(text_embeddings.float())
            similarity = 0.5 * _unit(backbone.float()) @ texts.t() + 0.5 * _unit(decoder.float()) @ texts.t()
            scale = model.language.logit_scale.float().exp().clamp(max=MAX_GROUNDING_SCALE)
            probabilities = (similarity * scale).softmax(dim=-1)
        return similarity.cpu().numpy(), probabilities.cpu().numpy()

    def _panoptic_result(
        self, probs: Tensor, masks: Tensor, vocabulary: Vocabulary, geometry: Geometry
    ) -> PanopticResult:
        id_map, segments = postprocess.panoptic(
            probs,
            masks,
            list(vocabulary.is_thing),
            geometry,
            self.object_mask_threshold,
            self.overlap_threshold,
        )
        return PanopticResult(
            id_map.cpu().numpy(),
            [
                Segment(
                    s.id, vocabulary.labels[s.label_index], s.label_index, s.is_thing, s.score, s.mask_score, s.area
                )
                for s in segments
            ],
        )

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=self.autocast_dtype)

    @staticmethod
    def _map(predictions, attribute: str):
        if isinstance(predictions, list):
            return [getattr(p, attribute) for p in predictions]
        return getattr(predictions, attribute)


def output_size(size: tuple[int, int], max_pixels: int | None) -> tuple[int, int]:
    """The (height, width) results are made at for an image of `size`: its own, or the same shape scaled down to
    at most `max_pixels`."""
    height, width = size
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    scale = (max_pixels / (height * width)) ** 0.5
    new_height, new_width = max(1, int(height * scale)), max(1, int(width * scale))
    # A side held at one pixel (an image thinner than the scale) leaves the other side all the pixels.
    if new_height == 1:
        new_width = min(new_width, max_pixels)
    if new_width == 1:
        new_height = min(new_height, max_pixels)
    return new_height, new_width


def _unit(x: Tensor) -> Tensor:
    """Rows scaled to unit length (no epsilon, as the official retrieval evaluator)."""
    return x / x.norm(dim=-1, keepdim=True)


def _label_probabilities(logits: Tensor, text_to_label: Tensor | None, num_labels: int) -> np.ndarray:
    """Class-query logits [K+1] (the last "background") -> [L] float32: softmax over the K texts, synonyms summed."""
    probs = logits[:-1].float().softmax(dim=-1)
    if text_to_label is not None:
        probs = torch.zeros(num_labels, device=probs.device).index_add_(0, text_to_label, probs)
    return probs.cpu().numpy()


def _texts(texts: Sequence[str], name: str) -> tuple[str, ...]:
    if isinstance(texts, str):
        raise ValueError(f"{name} must be a list of strings, not a single string")
    texts = tuple(texts)
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} must be non-empty strings, got {text!r}")
    return texts


def _per_image(prompts, num_images: int, single: bool) -> list[list[str]]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not a single string")
    prompts = list(prompts)
    nested = bool(prompts) and all(isinstance(p, list | tuple) for p in prompts)
    if nested and not single:
        if len(prompts) != num_images:
            raise ValueError(f"{len(prompts)} prompt lists for {num_images} images")
        per_image = [list(p) for p in prompts]
    else:
        per_image = [prompts] * num_images
    for image_prompts in per_image:
        for prompt in image_prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompts must be non-empty strings, got {prompt!r}")
    return per_image


def _autocast_dtype(autocast: bool | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    if autocast is False:
        return None
    if isinstance(autocast, torch.dtype):
        return autocast
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if autocast is True else None
