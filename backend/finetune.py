"""The fine-tune job: from a project's corrections to a new model version, served only if better.

Steps: turn the stored corrections into (image, target masks) examples (a correction that cannot be used is
skipped, with the reason visible in `xdecoder-ls status`); hold the tasks of about a fifth out for evaluation;
train the pixel decoder and the decoder (backbone and text encoder frozen) starting from the version the project
serves now; score old and new on the held-out examples; store the new version and serve it only if it gains at
least `XDECODER_FINETUNE_MIN_GAIN` mean IoU and the project still serves the version it was trained from (else it
stays a candidate: a rollback by hand during the fine-tune wins). With too few tasks to hold out, both are scored
on the training examples instead (their fit, which still catches a broken run) and the new version is at best a
candidate, served only by hand. Versions are written atomically (versions.py): a crash at any step leaves the
served model as it was and no half-written version behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rq import get_current_job

from xdecoder import Predictor, Vocabulary, XDecoderModel
from xdecoder.checkpoint import with_replaced_weights
from xdecoder.evaluation import SegmentationScores
from xdecoder.image import to_rgb
from xdecoder.training import FineTuneConfig, SegmentationTarget, trainable_parameters

from .brush import polygon_to_mask, rle_to_mask
from .corrections import Correction, CorrectionStore
from .distributed import TrainingRun, train, train_on_devices, training_devices
from .images import ImageFetchError
from .label_config import ImageSpec, LabelConfigError, PanopticVocabulary, ProjectSpec
from .learning import forget_rerun_request, release_claim
from .settings import Settings
from .versions import ModelVersion, VersionRegistry

logger = logging.getLogger(__name__)

HELD_OUT_SHARE = 5  # one task in this many is held out for evaluation
MIN_HELD_OUT = 2  # held-out tasks needed to judge a fine-tune; with fewer, it is kept as a candidate
LOGGED_UPDATES = 20  # progress lines per fine-tune


@dataclass
class Example:
    annotation_id: int
    task_id: int  # the split goes by task: the annotations of one task (several annotators) are near copies
    image: np.ndarray  # [H, W, 3] uint8, original size
    target: SegmentationTarget  # masks [T, H, W] at the original size, label indices into the vocabulary


class Unusable(Exception):
    """A stored correction a fine-tune cannot learn from; the message says why."""


# ------------------------------------------------------------------------------------- the job
def run_finetune(ctx, project: int, reason: str) -> dict[str, Any]:
    """Fine-tune `project`'s served version on its corrections (`ctx` is a jobs.WorkerContext). Returns the
    summary also kept in the store for `xdecoder-ls status`: status served / candidate / rejected / skipped, the
    detail of why it is not served, and figures."""
    store: CorrectionStore = ctx.store
    started = time.time()
    job = get_current_job()  # None when not run by RQ (a direct call): then no retry follows a failure
    job_id = job.id if job is not None else None
    forget_rerun_request(ctx.redis, project)
    changes = store.start_training_round(project)
    store.record_finetune(project, status="running", started_at=started, reason=reason, progress="preparing")
    try:
        summary = _finetune(ctx, project, store) | {"changes": changes, "reason": reason}
    except Exception as error:
        store.end_training_round(project, succeeded=False)
        store.record_finetune(
            project, status="failed", error=f"{type(error).__name__}: {error}", finished_at=time.time()
        )
        if job is None or not job.retries_left:  # RQ counts this try off only after it raised
            release_claim(ctx.redis, ctx.settings, project, job_id, succeeded=False)
        raise
    # A skipped run (Label Studio down, so no image could be fetched) learnt nothing: its changes still count for the
    # N-corrections and nightly triggers. And no N-trigger follows it at once: it would only be skipped again.
    learnt = summary["status"] != "skipped"
    store.end_training_round(project, succeeded=learnt)
    store.record_finetune(project, finished_at=time.time(), progress="done", error="", **summary)
    release_claim(ctx.redis, ctx.settings, project, job_id, succeeded=learnt)  # last: the next may start at once
    logger.info("project %s fine-tune finished in %.0f s: %s", project, time.time() - started, summary)
    return summary


def _finetune(ctx, project: int, store: CorrectionStore) -> dict[str, Any]:
    service = ctx.service
    try:
        spec = ProjectSpec.parse(store.label_config(project))
    except LabelConfigError as error:
        return {"status": "skipped", "detail": f"no usable label config: {error}"}
    vocabulary = PanopticVocabulary.of(control for image in spec.images for control in image.controls)
    if not vocabulary.labels:
        return {"status": "skipped", "detail": "the label config has no panoptic labels to learn"}
    examples = build_examples(ctx, project, spec, vocabulary)
    if not examples:
        return {"status": "skipped", "detail": "no usable corrections (see the excluded ones in status)"}
    parent = service.current_version(project)

    def progress(**fields: Any) -> None:
        store.record_finetune(project, **fields)

    return fine_tune(
        ctx.settings, service.registry, project, parent, service.predictor(parent), examples, vocabulary, progress
    )


def fine_tune(
    settings: Settings,
    registry: VersionRegistry,
    project: int,
    parent: ModelVersion,
    served: Predictor,
    examples: list[Example],
    vocabulary: PanopticVocabulary,
    progress: Callable[..., None] = lambda **fields: None,
) -> dict[str, Any]:
    """Train a new version of `project` from `parent` (served by `served`) on `examples`, score both on the held-out
    ones, store it, and serve it or not by `judge`. Returns the job's summary; progress(**fields) hears how far."""
    train_examples, held_out = split_examples(examples)
    scored = held_out or train_examples  # nothing held out: the score is the fit, which still catches a broken run
    model = trainable_copy(served.model)
    texts = Vocabulary.build(vocabulary.labels, vocabulary.stuff, vocabulary.synonyms)
    steps = min(
        settings.finetune_max_steps, max(settings.finetune_min_steps, settings.finetune_epochs * len(train_examples))
    )
    devices = training_devices(settings.train_devices)
    run = TrainingRun(
        model=model,
        config=FineTuneConfig(learning_rate=settings.finetune_learning_rate, seed=project),
        text_to_label=torch.tensor(texts.text_to_label),
        class_embeddings=served.class_embeddings(list(texts.texts)),
        inputs=[model_input(example, served) for example in train_examples],
        steps=steps,
        batch_size=max(1, len(devices)),  # one image per device and step
        augment=settings.finetune_augment,
    )
    losses: list[float] = []

    def on_step(step: int, steps: int, loss: float) -> None:
        losses.append(loss)
        if (step + 1) % max(1, steps // LOGGED_UPDATES) == 0 or step + 1 == steps:
            recent = float(np.mean(losses[-10:]))
            progress(progress=f"{step + 1}/{steps}", loss=f"{recent:.4f}")
            logger.info("project %s fine-tune step %d/%d, loss %.4f", project, step + 1, steps, recent)

    if len(devices) > 1:

        def rank_progress(line: str) -> None:  # rank 0's "step/steps loss"
            done, loss = line.split()
            progress(progress=done, loss=loss)

        trained = train_on_devices(run, devices, rank_progress)
        with torch.no_grad():
            for name, parameter in trainable_parameters(model).items():
                parameter.copy_(trained[name])
    else:
        trained = train(run, on_step=on_step).trained_state()

    progress(progress="evaluating")
    before = evaluate(served, scored, vocabulary)
    after = evaluate(predictor_like(served, model), scored, vocabulary)
    refusal = judge(before, after, settings.finetune_min_gain, settings.finetune_max_class_drop)
    scored_on = "held-out" if held_out else "training"
    gate = {"scored_on": scored_on, "candidate": after, "parent": before, "refusal": refusal}
    metrics = {
        "parent_miou": before["miou"],
        "miou": after["miou"],
        "held_out": len(held_out),
        "train": len(train_examples),
        "steps": steps,
        "devices": run.batch_size,
        "gate": gate,
    }
    version = registry.create(project, trained, parent.name, len(examples), metrics)
    detail = decide_serving(registry, version, parent, refusal, bool(held_out))
    gate["decision"] = detail or f"served: {passed(before, after)}"
    registry.record_metrics(version)
    return {
        "status": version.status,
        "detail": detail,
        "version": version.name,
        "parent": parent.name,
        "miou": after["miou"],
        "parent_miou": before["miou"],
        "pq": after["pq"],
        "parent_pq": before["pq"],
        "gate": json.dumps(gate),  # a string: the summary is also kept in a Redis hash for `status`
        "examples": len(examples),
        "held_out": len(held_out),
        "steps": steps,
    }


def judge(before: dict[str, Any], after: dict[str, Any], min_gain: float, max_class_drop: float) -> str | None:
    """Why the candidate scored `after` may not replace the version scored `before` (`evaluate`'s summaries, in IoU
    points), or None when it may: its mean IoU must gain at least `min_gain` (a fraction: 0.005 = 0.5 points), and no
    class with held-out pixels may lose more than `max_class_drop` points of IoU."""
    if after["miou"] is None or before["miou"] is None:
        return "the held-out corrections have no labelled pixels to score"
    gain = after["miou"] - before["miou"]
    if gain < 100.0 * min_gain:
        return (
            f"mean IoU {before['miou']:.2f} -> {after['miou']:.2f} ({gain:+.2f} points), under "
            f"XDECODER_FINETUNE_MIN_GAIN ({min_gain}, i.e. {100.0 * min_gain:+.2f} points)"
        )
    drops = {
        label: (iou, after["per_class_iou"].get(label, 0.0))
        for label, iou in before["per_class_iou"].items()
        if iou - after["per_class_iou"].get(label, 0.0) > max_class_drop
    }
    if drops:
        lost = ", ".join(f"{label} {old:.2f} -> {new:.2f}" for label, (old, new) in drops.items())
        return (
            f"mean IoU {before['miou']:.2f} -> {after['miou']:.2f}, but {lost} lose more than "
            f"XDECODER_FINETUNE_MAX_CLASS_DROP ({max_class_drop} points)"
        )
    return None


def passed(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The figures of a candidate that passed `judge`, for the record."""
    worst = min(after["per_class_iou"][label] - iou for label, iou in before["per_class_iou"].items())
    return (
        f"mean IoU {before['miou']:.2f} -> {after['miou']:.2f}, no class lost more than {max(-worst, 0.0):.2f} points"
    )


def decide_serving(
    registry: VersionRegistry, version: ModelVersion, parent: ModelVersion, refusal: str | None, held_out: bool
) -> str:
    """Serve, reject or keep as a candidate the new `version` (its status says which); returns why it is not served,
    "" if it is. `refusal`: `judge`'s verdict, on held-out examples or, if `held_out` is False, on the training
    ones."""
    if refusal is not None:
        registry.reject(version)
        scored_on = "held-out" if held_out else "training"
        return f"rejected on the {scored_on} corrections: {refusal}"
    by_hand = f"`xdecoder-ls versions --serve {version.name}` serves it"
    if not held_out:
        return (
            f"too few corrections to hold out {MIN_HELD_OUT} tasks for evaluation, so it was scored on its training "
            f"corrections and is not served automatically; {by_hand}"
        )
    now_served = registry.promote(version, parent)
    if now_served.name != version.name:
        return f"the served version changed during the fine-tune ({parent.name} -> {now_served.name}); {by_hand}"
    return ""


# -------------------------------------------------------------------------------- examples
def build_examples(ctx, project: int, spec: ProjectSpec, vocabulary: PanopticVocabulary) -> list[Example]:
    """Examples from the stored corrections; the reason a correction cannot be used is recorded in the store."""
    store: CorrectionStore = ctx.store
    corrections = list(store.all(project))  # a generator
    examples, unusable = usable_examples(corrections, spec, vocabulary, ctx.service.fetcher.fetch)
    for correction in corrections:
        reason = unusable.get(correction.annotation_id)
        if reason is not None:
            logger.warning("project %s: annotation %s not used: %s", project, correction.annotation_id, reason)
        store.set_unusable(project, correction.annotation_id, reason)
    return examples


def usable_examples(
    corrections: list[Correction], spec: ProjectSpec, vocabulary: PanopticVocabulary, fetch
) -> tuple[list[Example], dict[int, str]]:
    """(examples of the usable corrections, {annotation id: why it is not usable} of the others)."""
    examples, unusable = [], {}
    for correction in corrections:
        try:
            examples += examples_from(correction, spec, vocabulary, fetch)
        except Unusable as error:
            unusable[correction.annotation_id] = str(error)
    return examples, unusable


def examples_from(correction: Correction, spec: ProjectSpec, vocabulary: PanopticVocabulary, fetch) -> list[Example]:
    """One example per segmented image of the correction's task. fetch(url, task_id) -> PIL image."""
    found = []
    for image in spec.images:
        regions = [r for r in correction.result if r.get("to_name") == image.name]
        if not regions:
            continue
        url = correction.data.get(image.data_key)
        if not url:
            raise Unusable(f"task {correction.task_id} has no image in field '{image.data_key}'")
        try:
            rgb = to_rgb(fetch(str(url), correction.task_id))  # as /predict sees it (16-bit scaled, not clipped)
        except ImageFetchError as error:
            raise Unusable(f"image unavailable ({error.reason}): {error}") from error
        target = regions_to_target(regions, image, vocabulary, rgb.shape)
        found.append(Example(correction.annotation_id, correction.task_id, rgb, target))
    if not found:
        raise Unusable("no polygon or brush regions on a segmented image")
    return found


def regions_to_target(
    regions: list[dict], image: ImageSpec, vocabulary: PanopticVocabulary, shape: tuple[int, ...]
) -> SegmentationTarget:
    """Label Studio result regions -> one mask per thing region, one merged mask per stuff label, every pixel in at
    most one of them; and a referring prompt with its mask for each region of a label with a fixed `prompt`.

    Annotators draw stuff (grass, sky) as coarse polygons that run under the objects on it, and objects over one
    another; a pixel drawn by several regions belongs to a thing before a stuff, and to the region drawn later before
    an earlier one of the same kind (Label Studio shows later regions on top). Without this, the stuff masks would
    teach the model that the objects' pixels are stuff too, and the panoptic merge, where a confident stuff query
    wins each pixel it claims, would lose the objects. A thing hidden entirely under later ones is left out.

    Regions of free-text referring labels are left out; a region whose label the config no longer has, or that
    cannot be drawn (a polygon of two points, a brush mask of another image size: the task's image was replaced),
    makes the whole correction unusable (its other regions may be wrong too).
    """
    height, width = shape[:2]
    controls = {control.name: control for control in image.controls}
    drawn: list[tuple[int, np.ndarray]] = []  # (label index, mask) of the panoptic regions, in drawing order
    prompts: list[str] = []
    prompt_masks: list[np.ndarray] = []
    for region in regions:
        kind = region.get("type")
        control = controls.get(region.get("from_name"))
        if control is None or kind not in ("polygonlabels", "brushlabels"):
            continue
        value = region.get("value") or {}
        for name in value.get(kind) or []:
            label = control.label(name)
            if label is None:
                raise Unusable(f"label config changed: '{name}' is no longer a label of '{control.name}'")
            if name not in vocabulary.labels and label.prompt is None:
                continue
            try:
                if kind == "polygonlabels":
                    mask = polygon_to_mask(value.get("points") or [], width, height)
                else:
                    mask = rle_to_mask(value.get("rle") or [], height, width)
            except ValueError as error:
                raise Unusable(f"a '{name}' region cannot be drawn on the {width}x{height} image: {error}") from error
            if not mask.any():
                continue
            if name in vocabulary.labels:
                drawn.append((vocabulary.labels.index(name), mask))
            if label.prompt is not None:
                prompts.append(label.prompt)
                prompt_masks.append(mask)
    if not drawn:
        raise Unusable("no region carries a label of the panoptic vocabulary")
    # Paint stuff first, then things, each kind in drawing order: the last painter of a pixel owns it.
    is_stuff = [vocabulary.labels[index] in vocabulary.stuff for index, _ in drawn]
    owner = np.full((height, width), -1, np.int64)
    for region in sorted(range(len(drawn)), key=lambda r: not is_stuff[r]):  # stable: drawing order within a kind
        owner[drawn[region][1]] = region
    masks: list[np.ndarray] = []
    classes: list[int] = []
    stuff_mask_index: dict[int, int] = {}
    for region, (index, _) in enumerate(drawn):
        mask = owner == region
        if not mask.any():
            continue
        if is_stuff[region] and index in stuff_mask_index:
            masks[stuff_mask_index[index]] |= mask
            continue
        if is_stuff[region]:
            stuff_mask_index[index] = len(masks)
        masks.append(mask)
        classes.append(index)
    return SegmentationTarget(
        torch.tensor(classes),
        torch.from_numpy(np.stack(masks)),
        prompts,
        torch.from_numpy(np.stack(prompt_masks)) if prompts else None,
    )


def split_examples(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held out): the examples of about one task in HELD_OUT_SHARE are held out, chosen by a hash of the task
    id, so that a task stays on its side in every run and its annotations never land on both. With fewer than
    MIN_HELD_OUT tasks held out, or none left to train on, nothing is held out: train is all the examples."""
    held_out = [e for e in examples if _is_held_out(e.task_id)]
    train = [e for e in examples if not _is_held_out(e.task_id)]
    if len({e.task_id for e in held_out}) < MIN_HELD_OUT or not train:
        return examples, []
    return train, held_out


def _is_held_out(task_id: int) -> bool:
    # sha1, not hash(): Python salts str hashes per process, and the side of a task must not change between runs.
    return int(hashlib.sha1(str(task_id).encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def model_input(example: Example, predictor: Predictor) -> tuple[torch.Tensor, SegmentationTarget]:
    """Image [3, h, w] uint8 and masks [T, h, w] bool at the size the predictor feeds the model."""
    image = predictor.resize_policy.resize(example.image)
    height, width = image.shape[:2]
    target = example.target

    def resized(masks: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(masks[:, None].float(), size=(height, width), mode="nearest")[:, 0] > 0.5

    prompt_masks = None if target.prompt_masks is None else resized(target.prompt_masks)
    return torch.from_numpy(image.copy()).permute(2, 0, 1), SegmentationTarget(
        target.labels, resized(target.masks), target.prompts, prompt_masks
    )


# ------------------------------------------------------------------------------------ models
def trainable_copy(served: XDecoderModel) -> XDecoderModel:
    """A model of its own with the served weights: the tensors training changes are copies, the frozen ones
    (backbone, text encoder) are shared with the served model, which training never writes."""
    return with_replaced_weights(served, {k: p.detach().clone() for k, p in trainable_parameters(served).items()})


def predictor_like(template: Predictor, model: XDecoderModel) -> Predictor:
    return Predictor(
        model,
        short_side=template.resize_policy.short_side,
        max_long_side=template.resize_policy.max_long_side,
        object_mask_threshold=template.object_mask_threshold,
        overlap_threshold=template.overlap_threshold,
        max_output_pixels=template.max_output_pixels,
    )


def evaluate(predictor: Predictor, examples: list[Example], vocabulary: PanopticVocabulary) -> dict[str, Any]:
    """`SegmentationScores.summary()` of `predictor` on `examples` (panoptic, and referring where they have
    prompts: both from one encoding of each image)."""
    scores = SegmentationScores(vocabulary.labels, vocabulary.stuff)
    for example in examples:
        target = example.target
        prediction = predictor.predict(
            example.image, vocabulary.labels, vocabulary.stuff, list(target.prompts), vocabulary.synonyms
        )
        scores.add_panoptic(prediction.panoptic, target.labels, target.masks)
        if target.prompts:
            scores.add_referring(prediction.referring.masks, target.prompt_masks)
    return scores.summary()
