"""Benchmark of the learning loop on a synthetic world: does a fine-tune on 40 corrections learn, and does the gate
refuse a fine-tune on corrupted corrections?

    xdecoder-ls bench learning [--seed 0] [--corrections 40] [--cache-dir ~/.cache/xdecoder-ls]

A tiny X-Decoder is pre-trained on one look of the world (bench/synthetic_world.py: PRETRAIN; cached under
--cache-dir), the corrections come from a shifted one (SHIFTED). They go through the fine-tune job's own code
(backend.finetune: Label Studio polygons -> targets, the split, training with augmentation, the per-class gate, the
version registry), with three bad corrections among them (a label the config no longer has, an empty annotation, an
image that fails to load), which are skipped with their reasons. A second fine-tune on the same corrections with
their labels shuffled must be rejected by the gate.

Printed: the skipped corrections, the gate's figures and decision of each run, per-class IoU and PQ before and
after on a separate test set of the shifted world (more images than the held-out corrections), and last one JSON
line: iou_before, iou_after, gain_points, per_class (before/after), pq_before, pq_after, bad_run_promoted, and more.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.corrections import Correction  # noqa: E402
from backend.finetune import Example, evaluate, fine_tune, usable_examples  # noqa: E402
from backend.images import ImageFetchError  # noqa: E402
from backend.label_config import PanopticVocabulary, ProjectSpec  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.versions import VersionRegistry  # noqa: E402
from bench.synthetic_world import (  # noqa: E402
    IMAGE_SIZE,
    LABEL_CONFIG,
    LABELS,
    SHIFTED,
    THINGS,
    make_scenes,
    pretrain_tiny_model,
)
from xdecoder import Predictor, save_checkpoint  # noqa: E402

TEST_IMAGES = 40
BAD_IDS = 1001  # annotation ids of the bad corrections


def corrections_of(scenes, first_id: int, shuffle_labels: np.random.Generator | None = None) -> list[Correction]:
    """Label Studio corrections of `scenes` (task data {"image": "scene-<id>.png"}); with `shuffle_labels`, each
    region's panoptic label is replaced by a random one (a corrupted project)."""
    corrections = []
    for offset, scene in enumerate(scenes):
        regions = json.loads(json.dumps(scene.regions))
        if shuffle_labels is not None:
            for region in regions:
                names = region["value"]["polygonlabels"]
                if names[0] in LABELS:
                    names[0] = str(shuffle_labels.choice(LABELS))
        annotation_id = first_id + offset
        corrections.append(
            Correction(annotation_id, annotation_id, {"image": f"scene-{annotation_id}.png"}, regions, 1, "", "")
        )
    return corrections


def bad_corrections(scene, first_id: int) -> list[Correction]:
    """Three corrections a fine-tune must skip, with their reasons."""
    renamed = json.loads(json.dumps(scene.regions))
    renamed[0]["value"]["polygonlabels"] = ["meadow"]  # a label since removed from the config
    return [
        Correction(first_id, first_id, {"image": f"scene-{first_id}.png"}, renamed, 1, "", ""),
        Correction(first_id + 1, first_id + 1, {"image": f"scene-{first_id}.png"}, [], 1, "", ""),
        Correction(first_id + 2, first_id + 2, {"image": "missing.png"}, scene.regions, 1, "", ""),
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="of the corrections, the test images and the shuffling")
    parser.add_argument("--pretrain-seed", type=int, default=0, help="of the pre-trained model (cached per seed)")
    parser.add_argument("--corrections", type=int, default=40)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "xdecoder-ls")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()

    model = pretrain_tiny_model(args.pretrain_seed, steps=args.pretrain_steps, cache_dir=args.cache_dir, log_every=100)
    pretrained_s = time.time() - started
    spec = ProjectSpec.parse(LABEL_CONFIG)
    vocabulary = PanopticVocabulary.of(spec.images[0].controls)
    scenes = make_scenes(args.seed + 1, args.corrections + 1 + TEST_IMAGES, SHIFTED)
    correction_scenes, test_scenes = scenes[: args.corrections], scenes[args.corrections + 1 :]
    images = {f"scene-{i + 1}.png": Image.fromarray(s.image) for i, s in enumerate(correction_scenes)}
    images[f"scene-{BAD_IDS}.png"] = Image.fromarray(scenes[args.corrections].image)

    def fetch(url: str, task_id: int) -> Image.Image:
        if url not in images:
            raise ImageFetchError("not_found", f"{url}: HTTP 404")
        return images[url]

    test = [Example(i, i, s.image, s.target()) for i, s in enumerate(test_scenes)]

    with tempfile.TemporaryDirectory() as model_dir:
        checkpoint = save_checkpoint(model, Path(model_dir) / "synthetic-world.safetensors")
        settings = Settings(MODEL_DIR=model_dir, XDECODER_CHECKPOINT=str(checkpoint), XDECODER_DEVICE="cpu")
        registry = VersionRegistry(settings.model_dir, settings.checkpoint)
        served = Predictor(
            model,
            short_side=IMAGE_SIZE,
            object_mask_threshold=settings.object_mask_threshold,
            overlap_threshold=settings.overlap_threshold,
        )
        good = corrections_of(correction_scenes, 1) + bad_corrections(scenes[args.corrections], BAD_IDS)
        shuffled = corrections_of(correction_scenes, 1, np.random.default_rng(args.seed))
        runs = {}
        for project, name, corrections in ((1, "corrections", good), (2, "shuffled labels", shuffled)):
            examples, unusable = usable_examples(corrections, spec, vocabulary, fetch)
            for annotation, reason in unusable.items():
                print(f"[{name}] annotation {annotation} skipped: {reason}")
            tuned_at = time.time()
            summary = fine_tune(settings, registry, project, registry.base, served, examples, vocabulary)
            version = registry.get(summary["version"])
            gate = version.metrics["gate"]
            print(
                f"[{name}] {len(examples)} examples, {summary['steps']} steps in {time.time() - tuned_at:.0f} s: "
                f"{summary['status']}; gate on {summary['held_out']} held-out: {gate['decision']}"
            )
            runs[name] = {"summary": summary, "model": registry.weights_path(version), "skipped": unusable}

        tuned = Predictor(
            load_fine_tuned(model, runs["corrections"]["model"]),
            short_side=IMAGE_SIZE,
            object_mask_threshold=settings.object_mask_threshold,
            overlap_threshold=settings.overlap_threshold,
        )
        before, after = evaluate(served, test, vocabulary), evaluate(tuned, test, vocabulary)

    per_class = {
        label: {"before": before["per_class_iou"].get(label), "after": after["per_class_iou"].get(label)}
        for label in LABELS
    }
    print(f"test set: {TEST_IMAGES} images of the shifted world")
    print(f"{'class':<8} {'IoU before':>10} {'IoU after':>10} {'PQ before':>10} {'PQ after':>10}")
    for label in LABELS:
        print(
            f"{label:<8} {per_class[label]['before']:>10} {per_class[label]['after']:>10} "
            f"{before['per_class_pq'].get(label)!s:>10} {after['per_class_pq'].get(label)!s:>10}"
        )
    print(f"mean IoU {before['miou']} -> {after['miou']}; PQ {before['pq']} -> {after['pq']}")
    changes = [after["per_class_iou"][label] - before["per_class_iou"][label] for label in LABELS]
    figures = {
        "seed": args.seed,
        "pretrain_seed": args.pretrain_seed,
        "iou_before": before["miou"],
        "iou_after": after["miou"],
        "gain_points": round(after["miou"] - before["miou"], 2),
        "per_class": per_class,
        "pq_before": before["pq"],
        "pq_after": after["pq"],
        "pq_things_before": before["pq_things"],
        "pq_things_after": after["pq_things"],
        "pq_stuff_before": before["pq_stuff"],
        "pq_stuff_after": after["pq_stuff"],
        "referring_ciou_before": before["referring_ciou"],
        "referring_ciou_after": after["referring_ciou"],
        "served": runs["corrections"]["summary"]["status"] == "served",
        "bad_run_promoted": runs["shuffled labels"]["summary"]["status"] == "served",
        "bad_run_decision": runs["shuffled labels"]["summary"]["detail"],
        "skipped": len(runs["corrections"]["skipped"]),
        "targets_met": bool(
            after["miou"] - before["miou"] >= 15
            and all(after["per_class_iou"][t] - before["per_class_iou"][t] >= 10 for t in THINGS)
            and min(changes) >= -2
            and runs["shuffled labels"]["summary"]["status"] != "served"
        ),
        "pretrain_s": round(pretrained_s, 1),
        "total_s": round(time.time() - started, 1),
    }
    print(json.dumps(figures))
    return figures


def load_fine_tuned(base, weights: Path):
    from safetensors.torch import load_file

    from xdecoder.checkpoint import with_replaced_weights

    return with_replaced_weights(base, load_file(str(weights)))


if __name__ == "__main__":
    main()
