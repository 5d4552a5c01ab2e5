"""Prove this package computes what the official X-Decoder computes.

    python -m xdecoder.parity FIXTURE_DIR [--json]

A fixture folder holds a model in the official checkpoint format, its official config, input images
and the official code's outputs at every stage (format: shared/fixtures/xdecoder_parity/README.md).
Every recorded array is recomputed through this package's public API and compared: floats within
the fixture's per-array tolerance (noise_floor.json: 20x what the official code itself varies across
thread counts and float64, at least 1e-4), integer arrays exactly, except label maps, which may differ
at the near-tie pixels the fixture counts. Prints one line per array; exits 1 if any is out of
tolerance. Instance-segmentation arrays are not compared: this package has no instance output, and the
fixture marks them tie-sensitive.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_model
from .config import XDecoderConfig
from .model import XDecoderModel
from .predictor import Predictor
from .templates import PROMPT_TEMPLATES
from .text import clean_class_name, prompt_embeddings, template_embeddings
from .tokenizer import get_tokenizer
from .transformer_decoder import GroundingTokens

DEFAULT_ATOL = 1e-4


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
        noise_path = folder / "noise_floor.json"
        self.noise = json.loads(noise_path.read_text()) if noise_path.exists() else {"arrays": {}, "near_ties": {}}

    def arrays(self, name: str) -> dict[str, np.ndarray] | None:
        path = self.folder / f"{name}.npz"
        if not path.exists():
            return None
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
        thresholds = meta["thresholds"]
        self.predictor = Predictor(
            self.model,
            short_side=int(meta["resize"]["short_side"]),
            max_long_side=None,
            object_mask_threshold=float(thresholds["object_mask_threshold"]),
            overlap_threshold=float(thresholds["overlap_threshold"]),
        )
        self.image = Image.open(folder / meta["image"]["file"])

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
        for stage in (self.tokens, self.inputs, self.text, self.image_encoder, self.decoder, self.panoptic,
                      self.referring, self.batch):  # fmt: skip
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

    def inputs(self) -> None:
        recorded = self.fixture.arrays("inputs")
        prepared = self.predictor.prepare(self.image)
        self.equal("inputs/image_resized_uint8", prepared.resized, recorded["image_resized_uint8"])
        batch = self.model.prepare_images([torch.tensor(prepared.resized).permute(2, 0, 1)])
        self.pixels = batch.pixels
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
        self.class_embeddings = self.predictor.class_embeddings([*self.things, *self.stuff])
        self.close("text/class_embeddings", self.class_embeddings, recorded["class_embeddings"])

        ids, mask = self.tokenizer(self.prompts)
        self.equal("text/prompt_token_ids", ids, recorded["prompt_token_ids"])
        self.equal("text/prompt_attention_mask", mask, recorded["prompt_attention_mask"])
        with torch.inference_mode():
            all_tokens, _ = self.model.language.encode(ids)
        self.close("text/prompt_token_embeddings", all_tokens, recorded["prompt_token_embeddings"])
        self.prompt_embeddings = prompt_embeddings(self.model.language, self.tokenizer, self.prompts)
        self.close("text/prompt_pooled_embeddings", self.prompt_embeddings.pooled, recorded["prompt_pooled_embeddings"])

    def image_encoder(self) -> None:
        with torch.inference_mode():
            self.features = self.model.encode_image(self.pixels)
        recorded = self.fixture.arrays("backbone")
        for name in sorted(recorded):
            self.close(f"backbone/{name}", self.features.backbone[name], recorded[name])
        recorded = self.fixture.arrays("pixel_decoder")
        pixel = self.features.pixel
        self.close("pixel_decoder/mask_features", pixel.mask_features, recorded["mask_features"])
        self.close("pixel_decoder/encoder_output", pixel.encoder_output, recorded["encoder_output"])
        for level, features in enumerate(pixel.multi_scale):
            self.close(f"pixel_decoder/multi_scale_{level}", features, recorded[f"multi_scale_{level}"])

    def decoder(self) -> None:
        with torch.inference_mode():
            output = self.model.decode(self.features, self.class_embeddings, all_layer_masks=True)
        self.object_probs = output.object_logits[0].softmax(dim=-1)
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


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
    return np.asarray(value)


def run(folder: str | Path) -> list[Check]:
    """All checks for one fixture folder."""
    return ParityRun(Path(folder)).run()


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m xdecoder.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture", type=Path, help="fixture folder (checkpoint.pt, config.yaml, meta.json, *.npz)")
    parser.add_argument("--json", action="store_true", help="print the checks as one JSON document instead")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the fixtures were made with 2)")
    args = parser.parse_args(argv)
    if not (args.fixture / "meta.json").is_file():
        parser.error(f"{args.fixture} is not a parity fixture folder (no meta.json)")
    torch.set_num_threads(args.threads)
    checks = run(args.fixture)
    failed = [c for c in checks if not c.passed]
    if args.json:
        out(json.dumps({"fixture": str(args.fixture), "checks": [asdict(c) | {"passed": c.passed} for c in checks]}))
    else:
        for check in checks:
            out(check.line())
        out(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
