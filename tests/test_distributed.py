"""A fine-tune over several devices (backend/distributed.py), on the CPU with 2 gloo ranks and the tiny model: the
same steps as one process with the same global batch; a rank or a whole worker killed mid-training leaves no version
and the served one as it was."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from PIL import Image
from rq import Queue

from backend import distributed, jobs
from backend.corrections import Correction
from backend.distributed import TrainingRun, train
from backend.finetune import evaluate, model_input, predictor_like, trainable_copy, usable_examples
from backend.label_config import PanopticVocabulary, ProjectSpec
from backend.learning import request_finetune
from backend.queues import TRAIN
from backend.versions import VersionRegistry
from tests.helpers import subprocess_env
from tests.standin_ls import png
from tests.test_finetune import CONFIG, PROJECT, retry_now, run_train_jobs, scene_regions, store_correction
from xdecoder import Predictor, Vocabulary, load_model
from xdecoder.training import FineTuneConfig

CPU_RANKS = ["cpu", "cpu"]


@pytest.fixture
def context(settings, redis):
    """A worker's context whose fine-tunes run 3 steps on 2 gloo ranks, any result counting as a gain."""
    two_ranks = settings.model_copy(
        update={"train_devices": "cpu,cpu", "finetune_min_steps": 3, "finetune_max_steps": 3, "finetune_min_gain": -1}
    )
    context = jobs.WorkerContext(two_ranks, redis)
    jobs.set_context(context)
    yield context
    jobs.set_context(None)


def rank_processes() -> list[psutil.Process]:
    """The fine-tune ranks still running anywhere below this test process."""
    return [p for p in psutil.Process().children(recursive=True) if "backend.distributed" in " ".join(p.cmdline())]


def test_train_devices_are_read_and_mistakes_refused_in_one_line(settings):
    assert distributed.training_devices(None) == [] and distributed.training_devices("") == []
    assert distributed.training_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert distributed.training_devices("cpu,cpu") == CPU_RANKS  # two CPU ranks: how the tests run it
    for devices, refusal in [
        ("cuda,cuda:0", "name a GPU twice"),
        ("cpu,cuda:1", "mix cpu and cuda"),
        ("cuda:0,gpu7", "is not a device"),
    ]:
        with pytest.raises(ValueError, match=refusal):
            distributed.training_devices(devices)
    env = subprocess_env(settings)
    refused = subprocess.run(
        [sys.executable, "-m", "backend.cli", "worker", "--queues", "train", "--burst", "--devices", "cuda:1,cuda:1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: train devices cuda:1,cuda:1 name a GPU twice: one rank per GPU"
    ], refused.stderr


def scenes(checkpoint) -> tuple[Predictor, list, PanopticVocabulary]:
    """The tiny model, examples of 6 scenes and their vocabulary."""
    spec = ProjectSpec.parse(CONFIG)
    vocabulary = PanopticVocabulary.of(spec.images[0].controls)
    corrections = [
        Correction(task, task, {"image": f"scene-{task}.png"}, scene_regions(), None, "", "")
        for task in range(101, 107)
    ]
    examples, unusable = usable_examples(
        corrections, spec, vocabulary, lambda url, task: Image.open(io.BytesIO(png(seed=task)))
    )
    assert not unusable
    served = Predictor(load_model(checkpoint, device="cpu"), short_side=64, object_mask_threshold=0.0)
    return served, examples, vocabulary


def training_run(served: Predictor, examples: list, vocabulary: PanopticVocabulary) -> TrainingRun:
    """A run of 2 steps, global batch 2, with augmentation, on a copy of the served model."""
    texts = Vocabulary.build(vocabulary.labels, vocabulary.stuff, vocabulary.synonyms)
    return TrainingRun(
        model=trainable_copy(served.model),
        config=FineTuneConfig(learning_rate=1e-3, warmup_steps=1, seed=PROJECT),
        text_to_label=torch.tensor(texts.text_to_label),
        class_embeddings=served.class_embeddings(list(texts.texts)),
        inputs=[model_input(example, served) for example in examples],
        steps=2,
        batch_size=2,
        augment=True,
    )


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The L2 distance between two sets of the trained tensors."""
    assert set(a) == set(b)
    return float(torch.stack([(a[name] - b[name]).norm() for name in a]).norm())


def test_two_gloo_ranks_train_what_one_process_does_with_the_same_global_batch(tiny_checkpoint):
    served, examples, vocabulary = scenes(tiny_checkpoint)
    trained_on, held_out = examples[:4], examples[4:]
    alone = training_run(served, trained_on, vocabulary)
    initial = {name: tensor.detach().clone() for name, tensor in alone.model.state_dict().items()}
    trained_alone = train(alone).trained_state()
    initial = {name: initial[name] for name in trained_alone}
    lines = []

    shared = training_run(served, trained_on, vocabulary)
    trained_by_ranks = distributed.train_on_devices(shared, CPU_RANKS, lines.append)

    # Equal up to the order of float sums (which Adam's first steps amplify where a gradient is near 0): measured
    # 0.07 % of how far training moved the weights.
    assert distance(trained_by_ranks, trained_alone) < 0.01 * distance(trained_alone, initial)
    assert lines and lines[-1].startswith("2/2 ")  # rank 0's progress reached the job
    alone_scores = evaluate(predictor_like(served, alone.model), held_out, vocabulary)
    shared.model.load_state_dict(trained_by_ranks, strict=False)
    ranked_scores = evaluate(predictor_like(served, shared.model), held_out, vocabulary)
    assert ranked_scores["per_class_iou"] == pytest.approx(alone_scores["per_class_iou"], abs=1e-3)
    assert not rank_processes()


def test_a_rank_killed_mid_training_fails_the_fine_tune_for_a_retry_and_leaves_no_version(
    context, label_studio, monkeypatch
):
    for annotation_id in range(1, 4):
        store_correction(context, label_studio, annotation_id, scene_regions())
    redis, settings = context.redis, context.settings
    job_id, _ = request_finetune(redis, settings, PROJECT, "start_training")
    monkeypatch.setattr(distributed, "KILL_RANK_AT_STEP_FOR_TESTS", (1, 1))

    run_train_jobs(context, max_jobs=1)

    assert not rank_processes()  # rank 0 was stopped too
    registry = context.service.registry
    assert [v.name for v in registry.all(PROJECT)] == [registry.base.name]
    assert not any(p.name.startswith(".staging") for p in (registry.root / "versions").iterdir())
    assert context.service.current_version(PROJECT).is_base
    meta = context.store.meta(PROJECT)
    assert meta["finetune_status"] == "failed"
    assert "fine-tune rank 1 on cpu was killed by SIGKILL" in meta["finetune_error"], meta["finetune_error"]
    assert context.store.changed_count(PROJECT) == 3  # given back for the retry
    job = Queue(TRAIN, connection=redis).fetch_job(job_id)
    assert job.get_status(refresh=True) == "scheduled"  # the claim holds for RQ's retry

    monkeypatch.setattr(distributed, "KILL_RANK_AT_STEP_FOR_TESTS", None)
    retry_now(context, job_id)
    run_train_jobs(context, max_jobs=1)

    meta = context.store.meta(PROJECT)
    assert meta["finetune_status"] == "candidate", meta  # too few tasks to hold out: kept, not served
    version = registry.get(meta["finetune_version"])
    assert version.metrics["devices"] == 2 and version.metrics["steps"] == 3
    assert request_finetune(redis, settings, PROJECT, "start_training")[1]  # the claim was released
    assert not rank_processes()


def test_a_worker_killed_during_a_distributed_fine_tune_takes_its_ranks_and_leaves_no_version(context, label_studio):
    for annotation_id in range(1, 4):
        store_correction(context, label_studio, annotation_id, scene_regions())
    settings = context.settings.model_copy(
        update={"finetune_min_steps": 400, "finetune_max_steps": 400}  # far longer than the test waits
    )
    request_finetune(context.redis, settings, PROJECT, "start_training")
    worker = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "worker", "--queues", "train", "--burst", "--devices", "cpu,cpu"],
        env=subprocess_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while "/400" not in context.store.meta(PROJECT).get("finetune_progress", ""):
            assert worker.poll() is None and time.monotonic() < deadline, "the ranks never reported a step"
            time.sleep(0.2)
        ranks = rank_processes()
        assert len(ranks) == 2
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()

    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive  # they died with their worker
    registry = VersionRegistry(settings.model_dir, settings.checkpoint)
    assert [v.name for v in registry.all(PROJECT)] == [registry.base.name]
    assert not any(p.name.startswith(".staging") for p in (registry.root / "versions").iterdir())
    assert registry.current(PROJECT).is_base
