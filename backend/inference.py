"""Predictions for Label Studio tasks: the model loaded once per process, tasks in, results out.

The server's /predict and the workers' pre-annotation jobs both call `ModelService.predict`, so the
two paths give identical results. Each task is isolated: an image that cannot be fetched or decoded
gives that task an empty placeholder (logged with the reason) and the others go on.

One image pass serves everything a task asks of an image: panoptic labels, referring prompts, the caption (caption
TextAreas) and the ranking of its Choices' texts go to the model in one `Predictor.predict` call per batch.

Placeholders carry a model_version of their own ("<version>/failed", "<version>/pending"), never the
current one: Label Studio skips tasks that already have a prediction of the current version, so an
empty placeholder under that name would hide the task from every later retrieval.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdecoder import Prediction, Predictor, PreparedImage, XDecoderConfig, XDecoderModel, load_model
from xdecoder.checkpoint import with_replaced_weights

from .images import ImageFetcher, ImageFetchError
from .label_config import ControlSpec, ImageSpec, PanopticVocabulary, ProjectSpec, Prompt
from .polygons import PolygonOptions
from .results import (
    ChoicePolicy,
    ReferringRegion,
    RegionIds,
    caption_results,
    choices_results,
    image_regions,
    rank_texts,
    task_score,
)
from .settings import Settings
from .versions import ModelVersion, VersionRegistry

logger = logging.getLogger(__name__)

PREFETCH = 4  # threads fetching images; a batch's images are fetched while the model works on the batch before
MAX_LOADED_VERSIONS = 3  # fine-tuned versions kept in memory besides the base


@dataclass
class TaskPrediction:
    """One task's answer. `error` says why there is no result (it is logged, not sent)."""

    result: list[dict]
    score: float
    model_version: str
    error: str | None = None

    def to_label_studio(self) -> dict:
        return {"result": self.result, "score": self.score, "model_version": self.model_version}


@dataclass
class PredictOutcome:
    predictions: list[TaskPrediction]  # one per task, in task order
    unfinished: list[int] = field(default_factory=list)  # indexes of tasks not reached before the deadline


@dataclass
class _ImageWork:
    """One image of one task, with what to ask the model about it."""

    task_index: int
    spec: ImageSpec
    controls: list[ControlSpec]
    vocabulary: PanopticVocabulary
    prompts: list[Prompt]
    interactive: bool  # asked by an annotator's prompt in the editor
    caption: bool = False  # the image's caption, for its caption TextAreas
    rank_texts: tuple[str, ...] = ()  # its Choices' texts, ranked against the image

    @property
    def request(self) -> tuple:
        """What the model is asked for the whole batch (the prompts are per image)."""
        return self.vocabulary, self.caption, self.rank_texts

    @property
    def asks_model(self) -> bool:
        return bool(self.vocabulary.labels or self.prompts or self.caption or self.rank_texts)


def load_base_model(settings: Settings) -> XDecoderModel:
    config = XDecoderConfig.from_official_yaml(settings.official_config) if settings.official_config else None
    threads = use_cpu_threads(settings)
    started = time.perf_counter()
    model = load_model(settings.checkpoint, config=config, device=settings.device)
    logger.info(
        "loaded %s on %s in %.1f s (%d CPU threads)",
        settings.checkpoint,
        model.device,
        time.perf_counter() - started,
        threads,
    )
    return model


def use_cpu_threads(settings: Settings) -> int:
    """Sets how many threads torch computes with on the CPU in this process (XDECODER_THREADS, else torch's own
    choice capped by the container's CPU quota) and returns that number.

    Several model processes on one CPU machine (the server and a worker, or two workers) each start with all the
    cores; give each a share with XDECODER_THREADS or --threads.
    """
    default = _torch_default_threads()
    threads = settings.threads or min(default, cpu_quota() or default)
    torch.set_num_threads(threads)
    return threads


@functools.cache
def _torch_default_threads() -> int:
    """torch's choice before we change it: the physical cores, or OMP_NUM_THREADS."""
    return torch.get_num_threads()


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The whole CPUs a container's CPU quota allows (`docker run --cpus 2`: 2, at least 1), or None without one.

    torch sizes its threads by the machine's cores and does not see the quota: in a 2-CPU container on a 64-core host
    it would run 64 threads on 2 CPUs' worth of time, throttled at every step.
    """
    try:  # cgroup v2, then v1
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return max(1, int(quota) // int(period))


class ModelService:
    def __init__(self, settings: Settings, model: XDecoderModel | None = None, fetcher: ImageFetcher | None = None):
        self.settings = settings
        self.registry = VersionRegistry(settings.model_dir, settings.checkpoint)
        self.fetcher = fetcher or ImageFetcher(settings)
        self.base_model = model if model is not None else load_base_model(settings)
        self.polygon_options = PolygonOptions(
            tolerance_px=settings.polygon_tolerance_px,
            max_points=settings.polygon_max_points,
            min_area_px=settings.polygon_min_area_px,
            keep_holes=settings.polygon_keep_holes,
        )
        self.choice_policy = ChoicePolicy(settings.choices_top_k, settings.choices_min_probability)
        self._predictors: OrderedDict[str, Predictor] = OrderedDict()
        # One inference at a time: a forward pass already uses every core, and two would double memory.
        self._inference = threading.Lock()
        self._loading = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="fetch")
        self.clock = time.monotonic  # what `deadline` is measured on

    # ------------------------------------------------------------------------------- versions
    def current_version(self, project: int | None) -> ModelVersion:
        return self.registry.current(project)

    def predictor(self, version: ModelVersion) -> Predictor:
        with self._loading:
            if version.name in self._predictors:
                self._predictors.move_to_end(version.name)
                return self._predictors[version.name]
            model = self.base_model if version.is_base else self._load_fine_tuned(version)
            predictor = Predictor(
                model,
                short_side=self.settings.short_side,
                max_long_side=self.settings.max_long_side,
                object_mask_threshold=self.settings.object_mask_threshold,
                overlap_threshold=self.settings.overlap_threshold,
                batch_size=self.settings.batch_size,
                max_output_pixels=self.settings.result_max_pixels or None,
            )
            self._predictors[version.name] = predictor
            fine_tuned = [name for name in self._predictors if name != self.registry.base.name]
            for name in fine_tuned[:-MAX_LOADED_VERSIONS]:
                del self._predictors[name]
            return predictor

    def no_caption_reason(self, spec: ProjectSpec, version: ModelVersion) -> str | None:
        """Why the caption TextAreas of `spec` get no caption from `version`, or None when they get it. Fine-tuned
        versions have the base model's shape and heads, so the base model tells."""
        areas = [area for image in spec.images for area in image.caption_areas]
        if not areas or self.base_model.can_caption:
            return None
        return (
            f"caption TextAreas ({', '.join(areas)}) get no caption: model {version.name} cannot caption "
            f"({self.base_model.caption_support}); the rest is predicted"
        )

    def _load_fine_tuned(self, version: ModelVersion) -> XDecoderModel:
        """The base model's tensors, with the ones fine-tuning changed replaced (the rest are shared)."""
        from safetensors.torch import load_file

        changed = load_file(str(self.registry.weights_path(version)), device=str(self.base_model.device))
        logger.info("loading model version %s (%d tensors fine-tuned)", version.name, len(changed))
        return with_replaced_weights(self.base_model, changed)

    # ------------------------------------------------------------------------------ predicting
    def predict(
        self,
        tasks: Sequence[Mapping[str, Any]],
        spec: ProjectSpec,
        project: int | None,
        context: Mapping[str, Any] | None = None,
        deadline: float | None = None,
        on_task: Callable[[int, TaskPrediction], None] | None = None,
        queued: Collection[Any] = (),
    ) -> PredictOutcome:
        """Results for `tasks` (Label Studio task dicts with `id` and `data`), in order.

        context: /predict's params.context (interactive mode): when it holds prompts, only those are
        segmented. deadline: a time.monotonic() after which no new task is started; tasks left over
        are listed in `unfinished` and get "/pending" placeholders. on_task(index, prediction): called
        as soon as a task's prediction is made (or has failed), while the model goes on with the next
        tasks, whose images are fetched ahead meanwhile; not called for tasks the deadline left over.
        queued: ids of tasks the workers are predicting already; they get "/pending" placeholders and are
        neither predicted here nor listed in `unfinished`.
        """
        version = self.current_version(project)
        predictor = self.predictor(version)
        elsewhere = {i for i, task in enumerate(tasks) if task.get("id") in queued}
        can_caption = predictor.model.can_caption
        works = [
            [] if i in elsewhere else self._plan(i, task, spec, context, can_caption) for i, task in enumerate(tasks)
        ]
        if uncaptioned := self.no_caption_reason(spec, version):
            logger.warning("%s", uncaptioned)
        progress = _Progress(len(tasks))
        images_left = [len(task_works) for task_works in works]

        def prediction_of(index: int) -> TaskPrediction:
            if index in progress.failed:
                return TaskPrediction([], 0.0, f"{version.name}/failed", progress.failed[index])
            score = round(float(np.mean(progress.scores[index])), 6)
            return TaskPrediction(progress.regions[index], score, version.name)

        for index, task_works in enumerate(works):
            if not task_works and index not in elsewhere:
                progress.failed[index] = "no_image"
                logger.error("task %s: no image URL in the fields %s", tasks[index].get("id"), _image_keys(spec))
                if on_task is not None:
                    on_task(index, prediction_of(index))
        images = [w for task_works in works for w in task_works]

        def fetch(url: str, task_id) -> PreparedImage:  # on the fetch threads: the model's thread only runs the model
            return predictor.prepare(self.fetcher.fetch(url, task_id))

        fetches = _Prefetch(self._pool, fetch, images, tasks, ahead=PREFETCH + self.settings.batch_size)
        processed = 0
        seconds_per_image = 0.0
        while processed < len(images):
            batch_size = min(self.settings.batch_size, len(images) - processed)
            if deadline is not None and self.clock() + seconds_per_image * batch_size > deadline:
                break
            batch = fetches.take(processed, batch_size)
            started = self.clock()
            for group in _same_request(batch):
                self._run(predictor, group, tasks, progress)
            spent = (self.clock() - started) / len(batch)
            seconds_per_image = spent if processed == 0 else 0.7 * seconds_per_image + 0.3 * spent
            processed += len(batch)
            for work, _ in batch:
                images_left[work.task_index] -= 1
                if images_left[work.task_index] == 0 and on_task is not None:
                    on_task(work.task_index, prediction_of(work.task_index))
        fetches.cancel()

        outcome = PredictOutcome([])
        for index in range(len(tasks)):
            reached = images_left[index] == 0 or index in progress.failed
            if reached and index not in elsewhere:
                outcome.predictions.append(prediction_of(index))
            else:
                outcome.predictions.append(TaskPrediction([], 0.0, f"{version.name}/pending"))
                if index not in elsewhere:
                    outcome.unfinished.append(index)
        return outcome

    def _plan(
        self,
        index: int,
        task: Mapping[str, Any],
        spec: ProjectSpec,
        context: Mapping[str, Any] | None,
        can_caption: bool,
    ) -> list[_ImageWork]:
        data = task.get("data") or {}
        works = []
        for image in spec.images:
            if not data.get(image.data_key):
                continue
            prompts = image.prompts(data, context)
            interactive = [p for p in prompts if p.source == "context"]
            controls = self._chosen_controls(image)
            # An annotator's prompt asks for that region only, not for a full pre-fill (no caption, no choices); one
            # that names none of the labels (skipped with a warning) gets nothing.
            asked = image.asked_interactively(context)
            vocabulary = PanopticVocabulary.of([] if asked else controls)
            work = _ImageWork(index, image, controls, vocabulary, interactive if asked else prompts, asked)
            if not asked:
                work.caption = bool(image.caption_areas) and can_caption
                work.rank_texts = tuple(rank_texts(image, data))
            works.append(work)
        return works

    def _chosen_controls(self, image: ImageSpec) -> list[ControlSpec]:
        if image.polygon_controls and image.brush_controls:
            both = self.settings.both_controls_output
            if both == "polygons":
                return list(image.polygon_controls)
            if both == "brush":
                return list(image.brush_controls)
        return list(image.controls)

    def _run(self, predictor: Predictor, group, tasks, progress: _Progress) -> None:
        ready = []
        for work, future in group:
            task_id = tasks[work.task_index].get("id")
            try:
                ready.append((work, future.result()))
            except ImageFetchError as error:
                logger.error("task %s: no prediction, image unavailable (%s): %s", task_id, error.reason, error)
                progress.failed[work.task_index] = error.reason
            except Exception:  # a defect of ours rather than the image's: logged in full, and this task alone fails
                logger.exception("task %s: no prediction, the image could not be prepared", task_id)
                progress.failed[work.task_index] = "internal_error"
        asks = [(w, img) for w, img in ready if w.asks_model]
        if asks:
            first = asks[0][0]
            with self._inference:
                predictions = predictor.predict(
                    [img for _, img in asks],
                    labels=first.vocabulary.labels,
                    stuff=first.vocabulary.stuff,
                    synonyms=first.vocabulary.synonyms,
                    prompts=[[p.text for p in w.prompts] for w, _ in asks],
                    caption=first.caption,
                    rank_texts=first.rank_texts,
                )
        else:
            predictions = []
        results = {id(w): p for (w, _), p in zip(asks, predictions, strict=True)}
        for work, image in ready:
            prediction = results.get(id(work), Prediction())
            referring = _referring_regions(work, prediction)
            task = tasks[work.task_index]
            ids = RegionIds(task.get("id"), work.spec.name, fresh=work.interactive)
            regions = image_regions(
                work.spec, image.image_size, work.controls, prediction, referring, ids, self.polygon_options
            )
            texts = []
            if not work.interactive:
                texts = caption_results(work.spec, prediction.caption, ids) + choices_results(
                    work.spec, task.get("data") or {}, prediction.ranking, ids, self.choice_policy, task.get("id")
                )
            progress.regions[work.task_index] += regions + texts
            progress.scores[work.task_index].append(task_score(prediction, referring, [r["score"] for r in texts]))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.fetcher.close()


class _Progress:
    def __init__(self, num_tasks: int):
        self.regions: dict[int, list[dict]] = {i: [] for i in range(num_tasks)}
        self.scores: dict[int, list[float]] = {i: [] for i in range(num_tasks)}
        self.failed: dict[int, str] = {}


def _image_keys(spec: ProjectSpec) -> list[str]:
    return [image.data_key for image in spec.images]


class _Prefetch:
    """The images of `works`, fetched in order on `pool`, at most `ahead` past the last one taken: images arrive
    before the model needs them, and only those (and the ones being worked on) are held in memory."""

    def __init__(self, pool: ThreadPoolExecutor, fetch, works: list[_ImageWork], tasks, ahead: int):
        self._pool, self._fetch, self._works, self._tasks, self._ahead = pool, fetch, works, tasks, ahead
        self._waiting: dict[int, Future] = {}  # fetches started and not taken yet, by position in `works`
        self._started = 0

    def _start(self, work: _ImageWork) -> Future:
        task = self._tasks[work.task_index]
        return self._pool.submit(self._fetch, str((task.get("data") or {}).get(work.spec.data_key)), task.get("id"))

    def take(self, start: int, count: int) -> list[tuple[_ImageWork, Future]]:
        """(work, future image) for works start .. start + count - 1, which are then no longer held here; starts
        the fetches of the next ones."""
        for index in range(self._started, min(len(self._works), start + count + self._ahead)):
            self._waiting[index] = self._start(self._works[index])
            self._started = index + 1
        end = min(start + count, len(self._works))
        return [(self._works[index], self._waiting.pop(index)) for index in range(start, end)]

    def cancel(self) -> None:
        """Drop the fetches not taken (past a deadline)."""
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()


def _same_request(batch):
    """Split a batch into runs of consecutive images asking the same of the model (_ImageWork.request)."""
    groups: list[list] = []
    for item in batch:
        if groups and groups[-1][0][0].request == item[0].request:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _referring_regions(work: _ImageWork, prediction: Prediction) -> list[ReferringRegion]:
    referring = prediction.referring
    if referring is None:
        return []
    return [
        ReferringRegion(
            referring.masks[i],
            prompt.label,
            prompt.text,
            float(referring.probabilities[i] * referring.mask_scores[i]),
        )
        for i, prompt in enumerate(work.prompts)
    ]
