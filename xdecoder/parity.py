"""Prove this package computes what the official X-Decoder computes.

    python -m xdecoder.parity FIXTURE_DIR [--json]

A fixture folder holds a model in the official checkpoint format, its official config, input images
and the official code's outputs at every stage (format: shared/fixtures/xdecoder_parity/README.md).
Every recorded array is recomputed through this package's public API and compared: floats within
the fixture's per-array tolerance (noise_floor.json: 20x what the official code itself varies across
thread counts and float64, at least 1e-4), integer arrays exactly, except label maps, which may differ
at the near-tie pixels the fixture counts. Fixtures hold different sets of files: every stage whose file
is there is checked (captioning and retrieval included), and the last lines name the files checked.
Prints one line per array; exits 1 if any is out of tolerance. Instance-segmentation arrays are not
compared: this package has no instance output, and the fixture marks them tie-sensitive.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .captioning import caption_embeddings, greedy_captions, start_buffer, vocabulary_logits
from .checkpoint import load_model
from .config import XDecoderConfig
from .model import XDecoderModel
from .predictor import Predictor
from .templates import PROMPT_TEMPLATES
from .text import clean_class_name, prompt_embeddings, template_embeddings
from .tokenizer import START_TOKEN, get_tokenizer
from .transformer_decoder import GroundingTokens

DEFAULT_ATOL = 1e-4
DEFAULT_THRESHOLD = 0.8  # the official object-mask and overlap thresholds, for fixtures whose meta has none
TOP_K = 5  # captioning.npz records each step's top-5 vocabulary entries


@dataclass
class Check:
    name: str
    kind: str  # "float": max |diff|; "exact": mismatching elements; "ties": mismatching pixels
    value: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.value <= self.tolerance)

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        if self.kind == "float":
            return f"{status}  {self.name:<42} max|diff| {self.value:.3e}  (atol {self.tolerance:.1e})"
        label = "mismatches" if self.kind == "exact" else "mismatching pixels"
        return f"{status}  {self.name:<42} {label} {int(self.value)}  (allowed {int(self.tolerance)})"


class Fixture:
    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.files_checked: list[str] = []
        # noise_floor.json and the per-task ones (noise_floor_retrieval.json, ...) share one format.
        self.noise: dict = {"arrays": {}, "near_ties": {}}
        for path in sorted(folder.glob("noise_floor*.json")):
            noise = json.loads(path.read_text())
            self.noise["arrays"] |= noise.get("arrays", {})
            self.noise["near_ties"] |= noise.get("near_ties", {})

    def has(self, file: str) -> bool:
        return (self.folder / file).is_file()

    def arrays(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays of `<name>.npz` (recorded as checked), or None when the fixture has no such file."""
        path = self.folder / f"{name}.npz"
        if not path.exists():
            return None
        self.files_checked.append(path.name)
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    def atol(self, name: str) -> float:
        return float(self.noise["arrays"].get(name, {}).get("recommended_atol", DEFAULT_ATOL))

    def near_ties(self, *keys: str) -> int:
        ties = self.noise.get("near_ties", {})
        return int(sum(ties.get(k, 0) for k in keys))


class ParityRun:
    """Recomputes each stage of a fixture and records one Check per array."""

    def __init__(self, folder: Path):
        self.fixture = Fixture(folder)
        self.checks: list[Check] = []
        meta = self.fixture.meta
        self.config = XDecoderConfig.from_official_yaml(folder / "config.yaml")
        self.model: XDecoderModel = load_model(folder / "checkpoint.pt", config=self.config, device="cpu")
        self.tokenizer = get_tokenizer(self.config.text.context_length)
        self.things, self.stuff = list(meta["thing_classes"]), list(meta["stuff_classes"])
        self.prompts = list(meta["referring_prompts"])
        thresholds = meta.get("thresholds", {})
        self.predictor = Predictor(
            self.model,
            short_side=int(meta["resize"]["short_side"]),
            max_long_side=None,
            object_mask_threshold=float(thresholds.get("object_mask_threshold", DEFAULT_THRESHOLD)),
            overlap_threshold=float(thresholds.get("overlap_threshold", DEFAULT_THRESHOLD)),
        )
        self.image = Image.open(folder / meta.get("image", {}).get("file", "image.png"))

    # ------------------------------------------------- model inputs and intermediates, computed when first needed
    @cached_property
    def pixels(self) -> torch.Tensor:
        """[1, 3, Hp, Wp] the normalised, padded model input."""
        prepared = self.predictor.prepare(self.image)
        return self.model.prepare_images([torch.tensor(prepared.resized).permute(2, 0, 1)]).pixels

    @cached_property
    def features(self):
        with torch.inference_mode():
            return self.model.encode_image(self.pixels)

    @cached_property
    def class_embeddings(self) -> torch.Tensor:
        return self.predictor.class_embeddings([*self.things, *self.stuff])

    @cached_property
    def prompt_embeddings(self):
        return prompt_embeddings(self.model.language, self.tokenizer, self.prompts)

    @cached_property
    def seg_output(self):
        """The panoptic ('seg') decoder pass with the fixture's labels, every layer's masks, the captioning context."""
        with torch.inference_mode():
            return self.model.decode(self.features, self.class_embeddings, all_layer_masks=True, caption_context=True)

    @cached_property
    def object_probs(self) -> torch.Tensor:
        return self.seg_output.object_logits[0].softmax(dim=-1)

    # ---------------------------------------------------------------------------------- comparisons
    def close(self, name: str, ours, theirs) -> None:
        ours, theirs = _numpy(ours), np.asarray(theirs)
        if ours.shape != theirs.shape:
            self.checks.append(Check(f"{name} (shape {ours.shape} vs {theirs.shape})", "exact", 1, 0))
            return
        diff = float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max()) if ours.size else 0.0
        self.checks.append(Check(name, "float", diff, self.fixture.atol(name)))

    def equal(self, name: str, ours, theirs, allowed: int = 0, kind: str = "exact") -> None:
        ours, theirs = _numpy(ours), np.asarray(theirs)
        if ours.shape != theirs.shape:
            self.checks.append(Check(f"{name} (shape {ours.shape} vs {theirs.shape})", "exact", 1, 0))
            return
        self.checks.append(Check(name, kind, int((ours != theirs).sum()), allowed))

    # --------------------------------------------------------------------------------------- stages
    def run(self) -> list[Check]:
        """Every stage whose recorded file the fixture has."""
        stages = {
            "inputs.npz": self.inputs,
            "text.npz": self.text,
            "backbone.npz": self.image_encoder,
            "predictor_seg.npz": self.decoder,
            "seg_outputs.npz": self.panoptic,
            "grounding.npz": self.referring,
            "batch2.npz": self.batch,
            "captioning.npz": self.captioning,
            "retrieval.npz": self.retrieval,
        }
        self.tokens()
        for file, stage in stages.items():
            if self.fixture.has(file):
                stage()
        return self.checks

    def tokens(self) -> None:
        cases = self.fixture.meta.get("tokenizer_cases", [])
        if cases:
            ids, mask = self.tokenizer([c["text"] for c in cases])
            self.equal("meta/tokenizer_cases input_ids", ids, [c["input_ids"] for c in cases])
            self.equal("meta/tokenizer_cases attention_mask", mask, [c["attention_mask"] for c in cases])
        templates = self.fixture.meta.get("prompt_templates")
        if templates is not None:
            self.checks.append(Check("meta/prompt_templates", "exact", int(list(PROMPT_TEMPLATES) != templates), 0))
        if cases or templates is not None:
            self.fixture.files_checked.append("meta.json")

    def inputs(self) -> None:
        recorded = self.fixture.arrays("inputs")
        prepared = self.predictor.prepare(self.image)
        self.equal("inputs/image_resized_uint8", prepared.resized, recorded["image_resized_uint8"])
        batch = self.model.prepare_images([torch.tensor(prepared.resized).permute(2, 0, 1)])
        self.close("inputs/image_normalized_padded", batch.pixels[0], recorded["image_normalized_padded"])
        self.equal("inputs/valid_size", batch.sizes[0], recorded["valid_size"])
        self.equal("inputs/output_size", prepared.output_size, recorded["output_size"])
        self.close("inputs/pixel_mean", self.model.pixel_mean.flatten(), recorded["pixel_mean"])
        self.close("inputs/pixel_std", self.model.pixel_std.flatten(), recorded["pixel_std"])

    def text(self) -> None:
        recorded = self.fixture.arrays("text")
        names = [*self.things, *self.stuff, "background"]
        texts = [t.format(clean_class_name(n)) for n in names for t in PROMPT_TEMPLATES]
        ids, mask = self.tokenizer(texts)
        shape = (len(names), len(PROMPT_TEMPLATES), -1)
        self.equal("text/class_token_ids", ids.view(shape), recorded["class_token_ids"])
        self.equal("text/class_attention_mask", mask.view(shape), recorded["class_attention_mask"])
        per_template = template_embeddings(self.model.language, self.tokenizer, names)
        self.close("text/class_template_embeddings", per_template, recorded["class_template_embeddings"])
        self.close("text/class_embeddings", self.class_embeddings, recorded["class_embeddings"])

        ids, mask = self.tokenizer(self.prompts)
        self.equal("text/prompt_token_ids", ids, recorded["prompt_token_ids"])
        self.equal("text/prompt_attention_mask", mask, recorded["prompt_attention_mask"])
        with torch.inference_mode():
            all_tokens, _ = self.model.language.encode(ids)
        self.close("text/prompt_token_embeddings", all_tokens, recorded["prompt_token_embeddings"])
        self.close("text/prompt_pooled_embeddings", self.prompt_embeddings.pooled, recorded["prompt_pooled_embeddings"])

    def image_encoder(self) -> None:
        recorded = self.fixture.arrays("backbone")
        for name in sorted(recorded):
            self.close(f"backbone/{name}", self.features.backbone[name], recorded[name])
        recorded = self.fixture.arrays("pixel_decoder")
        if recorded is None:
            return
        pixel = self.features.pixel
        self.close("pixel_decoder/mask_features", pixel.mask_features, recorded["mask_features"])
        self.close("pixel_decoder/encoder_output", pixel.encoder_output, recorded["encoder_output"])
        for level, features in enumerate(pixel.multi_scale):
            self.close(f"pixel_decoder/multi_scale_{level}", features, recorded[f"multi_scale_{level}"])

    def decoder(self) -> None:
        output = self.seg_output
        recorded = self.fixture.arrays("predictor_seg")
        layers = {"": output.final} | {f"aux{i}_": layer for i, layer in enumerate(output.layers[:-1])}
        for prefix, layer in layers.items():
            for field in ("logits", "masks", "captions"):
                key = f"{prefix}pred_{field}"
                if key in recorded:
                    self.close(f"predictor_seg/{key}", getattr(layer, field), recorded[key])
        expected_aux = sum(1 for k in recorded if k.endswith("_pred_logits"))
        self.checks.append(
            Check("predictor_seg/number of aux outputs", "exact", abs(len(layers) - 1 - expected_aux), 0)
        )

    def _panoptic_checks(self, prefix: str, result, recorded: dict[str, np.ndarray], key_prefix: str = "") -> None:
        ties = self.fixture.near_ties("panoptic_top2_prob_gap_lt_1e-5_pixels", "kept_mask_logit_abs_lt_1e-4_pixels")
        self.equal(f"{prefix}/{key_prefix}panoptic_id_map", result.id_map, recorded[f"{key_prefix}panoptic_id_map"],
                   allowed=ties, kind="ties")  # fmt: skip
        segments = result.segments
        self.equal(f"{prefix}/{key_prefix}segments_id", [s.id for s in segments], recorded[f"{key_prefix}segments_id"])
        self.equal(f"{prefix}/{key_prefix}segments_category", [s.label_index for s in segments],
                   recorded[f"{key_prefix}segments_category"])  # fmt: skip
        self.equal(f"{prefix}/{key_prefix}segments_isthing", [s.is_thing for s in segments],
                   recorded[f"{key_prefix}segments_isthing"])  # fmt: skip
        if f"{key_prefix}segments_area" in recorded:
            areas, expected = np.array([s.area for s in segments]), recorded[f"{key_prefix}segments_area"]
            name = f"{prefix}/{key_prefix}segments_area"
            if areas.shape != expected.shape:
                self.equal(name, areas, expected)
            else:
                diff = int(np.abs(areas - expected).max()) if areas.size else 0
                self.checks.append(Check(name, "ties", diff, ties))

    def panoptic(self) -> None:
        prediction = self.predictor.predict(self.image, labels=[*self.things, *self.stuff], stuff=self.stuff,
                                            semantic=True)  # fmt: skip
        recorded = self.fixture.arrays("seg_outputs")
        self._panoptic_checks("seg_outputs", prediction.panoptic, recorded)
        probs = self.object_probs
        scores, labels = probs.max(dim=-1)
        keep = (labels != probs.shape[1] - 1) & (scores > self.predictor.object_mask_threshold)
        self.equal("seg_outputs/kept_query_index", keep.nonzero()[:, 0], recorded["kept_query_index"])
        self.equal("seg_outputs/kept_query_class", labels[keep], recorded["kept_query_class"])
        self.close("seg_outputs/kept_query_score", scores[keep], recorded["kept_query_score"])
        semantic_ties = self.fixture.near_ties("semantic_top2_gap_lt_1e-5_pixels")
        self.equal("seg_outputs/semantic_argmax", prediction.semantic.label_map, recorded["semantic_argmax"],
                   allowed=semantic_ties, kind="ties")  # fmt: skip
        self.close("seg_outputs/semantic_max", prediction.semantic.score_map, recorded["semantic_max"])

        low = self.fixture.arrays("seg_outputs_lowthr")
        if low is not None:
            predictor = Predictor(
                self.model,
                short_side=self.predictor.resize_policy.short_side,
                max_long_side=None,
                object_mask_threshold=float(low["object_mask_threshold"]),
                overlap_threshold=float(low["overlap_threshold"]),
            )
            result = predictor.panoptic(self.image, [*self.things, *self.stuff], stuff=self.stuff)
            self._panoptic_checks("seg_outputs_lowthr", result, low)

    def referring(self) -> None:
        recorded = self.fixture.arrays("grounding")
        ids, mask = self.tokenizer(self.prompts)
        self.equal("grounding/token_ids", ids, recorded["token_ids"])
        self.equal("grounding/attention_mask", mask, recorded["attention_mask"])
        tokens = self.prompt_embeddings.concatenated()
        self.close("grounding/grounding_query_tokens", tokens, recorded["grounding_query_tokens"])
        with torch.inference_mode():
            output = self.model.decode(self.features, self.class_embeddings, GroundingTokens(tokens[None]))
            self.close("grounding/pred_masks_all", output.final.masks, recorded["pred_masks_all"])
            self.close("grounding/pred_captions_all", output.final.captions, recorded["pred_captions_all"])
            self.close("grounding/pred_logits_all", output.final.logits, recorded["pred_logits_all"])
            captions = output.grounding_captions[0]
            pooled = self.prompt_embeddings.pooled
            self.close("grounding/v_emb_normed", captions / (captions.norm(dim=-1, keepdim=True) + 1e-7),
                       recorded["v_emb_normed"])  # fmt: skip
            self.close("grounding/t_emb_normed", pooled / (pooled.norm(dim=-1, keepdim=True) + 1e-7),
                       recorded["t_emb_normed"])  # fmt: skip
            similarity = self.model.language.grounding_similarity(captions, pooled)
            self.close("grounding/similarity", similarity, recorded["similarity"])
            matched = similarity.argmax(dim=0)
            self.equal("grounding/matched_query", matched, recorded["matched_query"])
            self.close("grounding/selected_mask_logits_lowres", output.grounding_masks[0][matched],
                       recorded["selected_mask_logits_lowres"])  # fmt: skip
        result = self.predictor.referring(self.image, self.prompts)
        ties = self.fixture.near_ties("kept_mask_logit_abs_lt_1e-4_pixels")
        self.equal("grounding/masks_output", result.masks, recorded["masks_output"], allowed=ties, kind="ties")

    def batch(self) -> None:
        recorded = self.fixture.arrays("batch2")
        if recorded is None:
            return
        second = Image.open(self.fixture.folder / self.fixture.meta["batch2"]["file"])
        self.equal(
            "batch2/image2_resized_uint8", self.predictor.prepare(second).resized, recorded["image2_resized_uint8"]
        )
        self.equal(
            "batch2/image2_output_size", self.predictor.prepare(second).output_size, recorded["image2_output_size"]
        )
        images = [self.image, second]
        batch = self.model.prepare_images(
            [torch.tensor(self.predictor.prepare(i).resized).permute(2, 0, 1) for i in images]
        )
        with torch.inference_mode():
            output = self.model(batch.pixels, self.class_embeddings)
        self.close("batch2/pred_logits", output.object_logits, recorded["pred_logits"])
        self.close("batch2/pred_masks", output.object_masks, recorded["pred_masks"])
        predictor = Predictor(
            self.model,
            short_side=self.predictor.resize_policy.short_side,
            max_long_side=None,
            object_mask_threshold=self.predictor.object_mask_threshold,
            overlap_threshold=self.predictor.overlap_threshold,
            batch_size=2,
        )
        predictions = predictor.predict(images, labels=[*self.things, *self.stuff], stuff=self.stuff, semantic=True)
        semantic_ties = self.fixture.near_ties("semantic_top2_gap_lt_1e-5_pixels")
        for i, prediction in enumerate(predictions):
            self._panoptic_checks("batch2", prediction.panoptic, recorded, key_prefix=f"img{i}_")
            self.equal(f"batch2/img{i}_semantic_argmax", prediction.semantic.label_map,
                       recorded[f"img{i}_semantic_argmax"], allowed=semantic_ties, kind="ties")  # fmt: skip

    def captioning(self) -> None:
        """`evaluate_captioning`: our incremental greedy decoding against the official 50 full re-runs."""
        recorded = self.fixture.arrays("captioning")
        model, decoder = self.model, self.model.decoder
        support = model.caption_support
        self.checks.append(Check(f"captioning/model can caption ({support or 'yes'})", "exact", int(bool(support)), 0))
        if support:
            return
        context = self.seg_output.caption_context
        start = start_buffer(1, model.language.context_length, model.device)
        self.equal("captioning/start_token_buffer", start[0], recorded["start_token_buffer"])
        with torch.inference_mode():
            content, _ = model.language.encode(start)
        self.close("captioning/step0_caption_query_content", content[0], recorded["step0_caption_query_content"])
        self.close("captioning/step0_caption_query_pos", content[0] + decoder.pos_embed_caping.weight,
                   recorded["step0_caption_query_pos"])  # fmt: skip
        self.close("captioning/step0_decoder_input", torch.cat((decoder.query_feat.weight, content[0])),
                   recorded["step0_decoder_input"])  # fmt: skip
        heads = caption_embeddings(decoder, context, start, all_layers=True)
        self.close("captioning/step0_outputs_captioning_all_layers", torch.stack([h[0] for h in heads]),
                   recorded["step0_outputs_captioning_all_layers"])  # fmt: skip

        steps = len(recorded["generated_token_ids"])  # the official loop never stops early
        decoding = greedy_captions(decoder, context, steps, stop_at_end=False, keep_logits=True)
        buffer = decoding.token_buffer[0]
        self.equal("captioning/generated_token_ids", buffer[1 : steps + 1], recorded["generated_token_ids"])
        self.equal("captioning/final_token_buffer", buffer, recorded["final_token_buffer"])
        logits = decoding.logits[0]
        top = logits.topk(TOP_K, dim=-1)
        self.equal("captioning/step_topk_ids", top.indices, recorded["step_topk_ids"])
        self.close("captioning/step_topk_logits", top.values, recorded["step_topk_logits"])
        self.close("captioning/step_top2_margin", top.values[:, 0] - top.values[:, 1], recorded["step_top2_margin"])
        first = recorded["step_logits_first"]
        self.close("captioning/step_logits_first", logits[: len(first)], first)
        self.close("captioning/step_caption_embedding", decoding.embeddings[0], recorded["step_caption_embedding"])
        # The last step runs on the buffer before its own token is written.
        last_input = buffer.clone()
        last_input[steps] = START_TOKEN
        (last,) = caption_embeddings(decoder, context, last_input[None])
        self.close("captioning/last_step_outputs_captioning", last[0], recorded["last_step_outputs_captioning"])
        with torch.inference_mode():
            reference_logits = vocabulary_logits(decoder, last[0, :steps])
        self.equal("captioning/last step's arg-max = the generated tokens", reference_logits.argmax(dim=-1),
                   recorded["generated_token_ids"])  # fmt: skip

        if self.fixture.has("captioning.json"):
            self.fixture.files_checked.append("captioning.json")
            official = json.loads((self.fixture.folder / "captioning.json").read_text())
            caption = self.predictor.caption(self.image)
            text = official["captioning_text"]
            self.checks.append(Check("captioning.json/Predictor.caption text", "exact", int(caption.text != text), 0))
            length = len(caption.token_ids)
            self.equal("captioning.json/Predictor.caption token_ids", caption.token_ids,
                       recorded["generated_token_ids"][:length])  # fmt: skip

    def retrieval(self) -> None:
        """`evaluate_retrieval` with the RetrievalEvaluator's ensemble score, and `evaluate_classification`."""
        recorded = self.fixture.arrays("retrieval")
        captions = [str(c) for c in recorded["captions"]]
        expected = [*self.things, *self.stuff, *self.prompts]
        self.checks.append(Check("retrieval/captions (meta labels + prompts)", "exact", int(captions != expected), 0))
        self.equal("retrieval/num_class_captions", len(self.things) + len(self.stuff), recorded["num_class_captions"])
        ids, mask = self.tokenizer(captions)
        self.equal("retrieval/caption_token_ids", ids, recorded["caption_token_ids"])
        self.equal("retrieval/caption_attention_mask", mask, recorded["caption_attention_mask"])
        text = self.predictor.text_embeddings(captions)
        self.close("retrieval/text_embeds", text, recorded["text_embeds"])
        self.close(
            "retrieval/text_embeds_normed", text / text.norm(dim=-1, keepdim=True), recorded["text_embeds_normed"]
        )

        with torch.inference_mode():
            decoder_embed = self.model.decoder_embedding(self.seg_output)
            backbone_embed = self.model.backbone_embedding(self.features)
            pooled = self.features.backbone["res5"].mean(dim=(2, 3))
        self.close("retrieval/backbone_res5_pooled", pooled, recorded["backbone_res5_pooled"])
        for name, embed in (("decoder", decoder_embed), ("backbone", backbone_embed)):
            normed = embed / embed.norm(dim=-1, keepdim=True)
            self.close(f"retrieval/image_embed_{name}", embed, recorded[f"image_embed_{name}"])
            self.close(f"retrieval/image_embed_{name}_normed", normed, recorded[f"image_embed_{name}_normed"])
            self.close(f"retrieval/similarity_{name}", normed @ (text / text.norm(dim=-1, keepdim=True)).t(),
                       recorded[f"similarity_{name}"])  # fmt: skip
        ranking = self.predictor.rank(self.image, captions)
        self.close("retrieval/similarity_ensemble", ranking.similarity[None], recorded["similarity_ensemble"])
        self.equal("retrieval/text_rank", np.argsort(-ranking.similarity, kind="stable"), recorded["text_rank"])

        logits = self.seg_output.object_logits[0, -1]
        self.close("retrieval/classification_logits", logits, recorded["classification_logits"])
        self.equal("retrieval/classification_argmax", logits.argmax(), recorded["classification_argmax"])
        # Predictor.classify: the softmax of the official logits over the labels ("background" left out).
        official = torch.from_numpy(recorded["classification_logits"][:-1]).softmax(dim=-1)
        self.close("retrieval/Predictor.classify probabilities", self.predictor.classify(self.image,
                   [*self.things, *self.stuff]), official)  # fmt: skip


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
    return np.asarray(value)


def run(folder: str | Path) -> list[Check]:
    """All checks for one fixture folder."""
    return ParityRun(Path(folder)).run()


def unchecked_files(folder: Path, checked: list[str]) -> list[str]:
    """Recorded outputs in the folder that no stage of this tool reads (a newer fixture format, say)."""
    recorded = sorted(p.name for p in folder.iterdir() if p.suffix in (".npz", ".json") and p.is_file())
    ignored = ("meta.json",)  # read for the labels and sizes, compared only where it records tokenizer cases
    return [
        name for name in recorded if name not in checked and name not in ignored and not name.startswith("noise_floor")
    ]


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m xdecoder.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture", type=Path, help="fixture folder (checkpoint.pt, config.yaml, meta.json, *.npz)")
    parser.add_argument("--json", action="store_true", help="print the checks as one JSON document instead")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the fixtures were made with 2)")
    args = parser.parse_args(argv)
    if not (args.fixture / "meta.json").is_file():
        parser.error(f"{args.fixture} is not a parity fixture folder (no meta.json)")
    torch.set_num_threads(args.threads)
    parity = ParityRun(args.fixture)
    checks = parity.run()
    failed = [c for c in checks if not c.passed]
    checked = list(dict.fromkeys(parity.fixture.files_checked))
    unchecked = unchecked_files(args.fixture, checked)
    if args.json:
        out(json.dumps({
            "fixture": str(args.fixture),
            "files_checked": checked,
            "files_not_checked": unchecked,
            "checks": [asdict(c) | {"passed": c.passed} for c in checks],
        }))  # fmt: skip
    else:
        for check in checks:
            out(check.line())
        out(f"files checked: {', '.join(checked)}")
        if unchecked:
            out(f"files NOT checked (unknown to this tool): {', '.join(unchecked)}")
        out(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
