"""Webhook events applied to the corrections store (real Redis), checked against the stand-in Label Studio, and
the fine-tune triggers."""

from __future__ import annotations

import copy
import time
from datetime import UTC, datetime

import pytest
from rq import Queue
from rq.job import JobStatus

from backend import jobs
from backend.corrections import CorrectionStore
from backend.learning import release_claim, request_finetune
from backend.queues import EVENTS
from backend.schedule import NightlySchedule
from backend.status import collect
from tests.conftest import reference_payload
from tests.test_label_studio_api import closed_port

STAND_IN = []  # the session's stand-in Label Studio, for `saved`


@pytest.fixture
def worker_context(settings, redis, label_studio):
    label_studio.annotations.clear()
    label_config = reference_payload("webhook_annotation_created.json")["project"]["label_config"]
    for project in (3, 4):
        label_studio.add_project(project, label_config)
    STAND_IN[:] = [label_studio]
    context = jobs.WorkerContext(settings, redis)
    jobs.set_context(context)
    yield context
    jobs.set_context(None)


def saved(event: dict) -> dict:
    return STAND_IN[0].saved(event)


def deleted_in_label_studio(*annotation_ids: int) -> None:
    for annotation_id in annotation_ids:
        del STAND_IN[0].annotations[annotation_id]


def created(annotation_id=1, task_id=1, updated_at="2026-11-23T01:30:43.665757Z", label="Car", **annotation):
    event = copy.deepcopy(reference_payload("webhook_annotation_created.json"))
    event["annotation"].update(id=annotation_id, task=task_id, updated_at=updated_at, **annotation)
    event["annotation"]["result"][0]["value"]["polygonlabels"] = [label]
    event["task"]["id"] = task_id
    return event


def test_annotation_created_is_stored_with_its_task_and_author(worker_context):
    jobs.apply_event(saved(reference_payload("webhook_annotation_created.json")))
    store = worker_context.store
    correction = store.get(3, 1)
    assert correction.task_id == 1 and correction.completed_by == 1
    assert correction.data == {"image": "/data/upload/3/bf8c4da5-red.png"}
    assert correction.result[0]["value"]["polygonlabels"] == ["Car"]
    assert store.count(3) == 1 and store.changed_count(3) == 1
    assert "Car" in store.label_config(3)


def test_replays_are_harmless_and_label_studios_latest_copy_wins(worker_context):
    store = worker_context.store
    jobs.apply_event(saved(created(updated_at="2026-11-23T01:00:00Z", label="Car")))
    jobs.apply_event(saved(created(updated_at="2026-11-23T02:00:00Z", label="Sky")))  # ANNOTATION_UPDATED later
    # The older event replayed: Label Studio's copy is the newer one, stored already.
    assert jobs.apply_event(created(updated_at="2026-11-23T01:00:00Z", label="Car")).endswith("unchanged")
    assert jobs.apply_event(created(updated_at="2026-11-23T02:00:00Z", label="Sky")).endswith("unchanged")
    assert store.get(3, 1).result[0]["value"]["polygonlabels"] == ["Sky"]
    assert store.count(3) == 1 and store.changed_count(3) == 1  # one annotation, counted once


def test_updated_event_from_label_studio_is_applied(worker_context):
    jobs.apply_event(saved(reference_payload("webhook_annotation_updated.json")))
    assert worker_context.store.count(3) == 1


def test_deletion_removes_corrections_once_label_studio_confirms_it(worker_context, settings, redis):
    store = worker_context.store
    jobs.apply_event(saved(created(annotation_id=1)))
    jobs.apply_event(saved(created(annotation_id=2, task_id=2)))
    deletion = reference_payload("webhook_annotations_deleted.json")  # deletes id 1
    assert jobs.apply_event(deletion) == "deleted 0 of 1, 1 still in Label Studio"  # not deleted there: a forgery
    assert store.get(3, 1) is not None
    assert (
        "annotation 1 still exists in Label Studio" in collect(settings, redis, "test")["events_rejected"][0]["reason"]
    )
    deleted_in_label_studio(1)
    assert jobs.apply_event(deletion) == "deleted 1 of 1"
    assert store.get(3, 1) is None and store.get(3, 2) is not None
    assert store.changed_count(3) == 1


def test_bulk_annotations_created_pairs_annotations_with_tasks(worker_context):
    single = created()
    bulk = {
        "action": "ANNOTATIONS_CREATED",
        "project": single["project"],
        "annotation": [created(7, 70)["annotation"], created(8, 80)["annotation"]],
        "task": [created(7, 70)["task"], created(8, 80)["task"]],
    }
    jobs.apply_event(saved(bulk))
    store = worker_context.store
    assert {store.get(3, 7).task_id, store.get(3, 8).task_id} == {70, 80}


def test_skipped_annotations_are_not_training_data(worker_context):
    store = worker_context.store
    jobs.apply_event(saved(created(annotation_id=5)))
    jobs.apply_event(saved(created(annotation_id=5, updated_at="2026-11-23T03:00:00Z", was_cancelled=True)))
    assert store.get(3, 5) is None
    assert "cancelled" in store.excluded(3)[5]["reason"]


def test_an_older_skip_replayed_later_does_not_remove_a_newer_correction_nor_the_reverse(worker_context):
    store = worker_context.store
    jobs.apply_event(saved(created(annotation_id=5, updated_at="2026-11-23T02:00:00Z", label="Sky")))
    old_skip = created(annotation_id=5, updated_at="2026-11-23T01:00:00Z", was_cancelled=True)
    assert jobs.apply_event(old_skip).endswith("unchanged")  # Label Studio has the newer correction
    assert store.get(3, 5).result[0]["value"]["polygonlabels"] == ["Sky"]

    jobs.apply_event(saved(created(annotation_id=6, updated_at="2026-11-23T02:00:00Z", was_cancelled=True)))
    assert jobs.apply_event(created(annotation_id=6, updated_at="2026-11-23T01:00:00Z")).endswith("cancelled")
    assert store.get(3, 6) is None and "cancelled" in store.excluded(3)[6]["reason"]


def test_timestamps_compare_as_moments_with_or_without_microseconds(worker_context):
    """Two workers may read Label Studio at different moments and write in the other order."""
    store = worker_context.store
    task = {"id": 1, "data": {"image": "/data/upload/3/a.png"}}
    newer = {
        "id": 1,
        "result": created(label="Sky")["annotation"]["result"],
        "updated_at": "2026-11-23T10:00:43.500000Z",
    }
    store.upsert(3, newer, task, None)
    # As text "10:00:43Z" sorts after "10:00:43.500000Z"; as a moment it is half a second earlier.
    older = {"id": 1, "result": created(label="Car")["annotation"]["result"], "updated_at": "2026-11-23T10:00:43Z"}
    assert store.upsert(3, older, task, None) == "stale"
    assert store.get(3, 1).result[0]["value"]["polygonlabels"] == ["Sky"]


def test_an_event_arriving_after_the_deletion_does_not_bring_the_annotation_back(worker_context):
    store = worker_context.store
    jobs.apply_event(saved(created(annotation_id=1, updated_at="2026-11-23T01:00:00Z")))
    deleted_in_label_studio(1)
    jobs.apply_event(reference_payload("webhook_annotations_deleted.json"))  # deletes id 1
    # e.g. an update that failed once and was retried after the deletion that followed it
    assert jobs.apply_event(created(annotation_id=1, updated_at="2026-11-23T02:00:00Z")).endswith("refused")
    assert store.get(3, 1) is None and store.count(3) == 0 and store.changed_count(3) == 0


def test_a_malformed_annotation_is_rejected_alone_and_the_rest_of_the_event_is_stored(worker_context, settings, redis):
    no_task = {"id": 8, "result": [], "updated_at": "2026-11-23T00:00:00Z"}
    bulk = {
        "action": "ANNOTATIONS_CREATED",
        "project": created()["project"],
        "annotation": [created(7, 70)["annotation"], no_task, {"id": "x9"}, created(9, 90)["annotation"]],
        "task": [created(7, 70)["task"], created(9, 90)["task"]],
    }
    saved({**bulk, "annotation": [created(7, 70)["annotation"], created(9, 90)["annotation"]]})
    outcome = jobs.apply_event(bulk)
    assert outcome == (
        "ANNOTATIONS_CREATED: stored, rejected:no task id, rejected:annotation id is not a number: 'x9', stored"
    )
    store = worker_context.store
    assert store.get(3, 7).task_id == 70 and store.get(3, 9).task_id == 90 and store.count(3) == 2
    deleted_in_label_studio(7)
    deleted = jobs.apply_event({"action": "ANNOTATIONS_DELETED", "project": 3, "annotations": [{"id": 7}, {}]})
    assert deleted == "deleted 1 of 1" and store.get(3, 7) is None
    reasons = [e["reason"] for e in collect(settings, redis, "test")["events_rejected"]]
    assert reasons[:3] == [
        "an annotation was not deleted: no annotation id",
        "annotation 'x9' not stored: annotation id is not a number: 'x9'",
        "annotation 8 not stored: no task id",
    ]


def test_other_actions_and_broken_events_are_acknowledged_and_visible_in_status(worker_context, settings, redis):
    assert jobs.apply_event({"action": "PROJECT_UPDATED", "project": {"id": 3}}) == "ignored PROJECT_UPDATED"
    assert jobs.apply_event({"action": "ANNOTATION_CREATED", "project": {"id": 3}}).startswith("rejected")
    assert jobs.apply_event({"action": "ANNOTATION_CREATED"}).startswith("rejected")
    status = collect(settings, redis, "test")
    assert status["events_ignored"] == {"PROJECT_UPDATED": 1}
    reasons = [e["reason"] for e in status["events_rejected"]]
    assert "no annotation in the payload" in reasons and "no project id" in reasons


def test_n_corrections_queue_one_finetune_and_further_triggers_fold(worker_context, settings, redis):
    settings.finetune_every = 3
    for i in range(1, 3):
        jobs.apply_event(saved(created(annotation_id=i, task_id=i)))
    train = Queue("train", connection=redis)
    assert train.count == 0
    jobs.apply_event(saved(created(annotation_id=3, task_id=3)))
    assert train.count == 1
    for i in range(4, 8):  # more corrections and a Start Training while the fine-tune waits
        jobs.apply_event(saved(created(annotation_id=i, task_id=i)))
    result = jobs.apply_event(reference_payload("webhook_start_training.json"))
    assert result.startswith("fine-tune already queued")
    assert train.count == 1
    (job,) = train.jobs
    assert job.func_name == "backend.jobs.finetune" and job.args == (3, "corrections")
    assert int(CorrectionStore(redis).meta(3)["finetune_folded_triggers"]) == 5


def test_a_finished_finetune_lets_the_next_trigger_queue_again(worker_context, settings, redis):
    job_id, queued = request_finetune(redis, settings, 3, "start_training")
    assert queued
    Queue("train", connection=redis).fetch_job(job_id).delete()  # finished and cleaned up
    _, queued_again = request_finetune(redis, settings, 3, "start_training")
    assert not queued_again  # within the enqueue grace period the claim still holds
    redis.set("xdls:project:3:finetune_job", f"{job_id}|0")  # an old claim whose job is gone
    _, queued_again = request_finetune(redis, settings, 3, "start_training")
    assert queued_again


def test_start_training_from_the_older_train_call_stores_its_annotations(worker_context, redis):
    event = {
        "action": "START_TRAINING",
        "project": {"id": 4, "label_config": "<View/>"},
        "tasks": [{"id": 9, "data": {"image": "/x.png"}, "annotations": [created(90, 9)["annotation"]]}],
    }
    STAND_IN[0].annotate(4, created(90, 9)["annotation"], event["tasks"][0])
    assert jobs.apply_event(event).startswith("fine-tune queued")
    assert worker_context.store.get(4, 90).task_id == 9


def test_a_batch_applies_its_events_in_order_and_an_event_that_fails_is_retried_alone(worker_context, monkeypatch):
    applied = []
    original = jobs.apply_event

    def flaky(payload):
        if payload.get("annotation", {}).get("id") == 2:
            raise RuntimeError("boom")
        applied.append(payload["annotation"]["id"])
        return original(payload)

    monkeypatch.setattr(jobs, "apply_event", flaky)
    outcomes = jobs.apply_events([saved(created(annotation_id=i, task_id=i)) for i in (1, 2, 3)])
    assert applied == [1, 3]
    assert outcomes[0].startswith("ANNOTATION_CREATED") and outcomes[2].startswith("ANNOTATION_CREATED")
    assert outcomes[1].startswith("failed, retried as job")
    (retry,) = Queue("events", connection=worker_context.redis).jobs
    assert retry.func_name == "backend.jobs.apply_event" and retry.args[0]["annotation"]["id"] == 2
    assert worker_context.store.count(3) == 2


def test_the_nightly_schedule_fires_once_per_firing_across_workers(settings, redis):
    schedule = NightlySchedule(redis, settings)  # the default "0 2 * * *", in UTC
    assert schedule.next_firing(datetime(2026, 12, 2, 3, 0, tzinfo=UTC)) == datetime(2026, 12, 3, 2, 0, tzinfo=UTC)
    firing = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)
    other_worker = NightlySchedule(redis, settings)
    assert schedule.fire(firing) and not other_worker.fire(firing)
    assert schedule.fire(datetime(2026, 12, 4, 2, 0, tzinfo=UTC))  # the next night
    assert [job.func_name for job in Queue("train", connection=redis).jobs] == ["backend.jobs.nightly_finetunes"] * 2


def test_the_nightly_schedule_runs_in_its_thread(settings, redis):
    every_second = settings.model_copy(update={"finetune_cron": "* * * * * *"})  # croniter's seconds field
    schedule = NightlySchedule(redis, every_second)
    thread = schedule.start()
    try:
        deadline = time.monotonic() + 10
        while Queue("train", connection=redis).count == 0:
            assert time.monotonic() < deadline, "the schedule's thread queued nothing"
            time.sleep(0.05)
    finally:
        schedule.stop()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert Queue("train", connection=redis).jobs[0].func_name == "backend.jobs.nightly_finetunes"


def test_a_cron_expression_that_is_not_one_is_refused(settings, redis):
    with pytest.raises(ValueError, match="XDECODER_FINETUNE_CRON"):
        NightlySchedule(redis, settings.model_copy(update={"finetune_cron": "at two every night"}))


def test_the_nightly_job_queues_a_fine_tune_for_each_project_with_new_corrections(worker_context, settings, redis):
    jobs.apply_event(saved(created(annotation_id=1)))  # project 3
    other = created(annotation_id=2)
    other["project"]["id"] = 4
    jobs.apply_event(saved(other))
    worker_context.store.start_training_round(4)  # project 4's correction was learnt from
    worker_context.store.end_training_round(4, succeeded=True)
    queued = jobs.nightly_finetunes()
    (job,) = Queue("train", connection=redis).jobs
    assert queued == [job.id] and job.args == (3, "nightly")
    assert jobs.nightly_finetunes() == [job.id]  # the next night, while it still waits: folded into it
    assert Queue("train", connection=redis).count == 1


def test_status_says_a_fine_tune_whose_worker_died_was_interrupted(worker_context, settings, redis):
    jobs.apply_event(saved(created()))
    worker_context.store.record_finetune(3, status="running", progress="step 2/10")
    job_id, _ = request_finetune(redis, settings, 3, "start_training")

    def shown() -> str:
        return collect(settings, redis, "test")["projects"]["3"]["last_finetune"]["status"]

    job = Queue("train", connection=redis).fetch_job(job_id)
    job.set_status(JobStatus.STARTED)
    assert shown() == "running"
    job.set_status(JobStatus.QUEUED)  # its worker was killed; RQ put it back on the queue
    assert shown() == "interrupted, queued again"
    job.set_status(JobStatus.FAILED)  # and no try of it is left
    last = collect(settings, redis, "test")["projects"]["3"]["last_finetune"]
    assert last["status"] == "interrupted" and last["progress"] == "step 2/10"


def test_a_succeeding_fine_tune_releases_only_its_own_claim(worker_context, settings, redis):
    old, _ = request_finetune(redis, settings, 3, "start_training")
    Queue("train", connection=redis).fetch_job(old).set_status(JobStatus.FAILED)
    new, queued = request_finetune(redis, settings, 3, "start_training")  # the old one failed for good
    assert queued and new != old
    assert release_claim(redis, settings, 3, old, succeeded=True) is None  # e.g. a late end of the old one
    assert request_finetune(redis, settings, 3, "start_training") == (new, False)  # the new claim still holds
    assert redis.ttl("xdls:project:3:finetune_job") == -1  # no expiry: its job's status says whether it holds


def test_an_annotation_deleted_while_its_update_is_applied_stays_deleted(worker_context, monkeypatch):
    store = worker_context.store
    jobs.apply_event(saved(created(annotation_id=1, updated_at="2026-11-23T01:00:00Z")))
    decide = CorrectionStore._outcome
    other_worker = []

    def another_worker_deletes_it_meanwhile(self, reader, *args):
        if not other_worker:  # between this worker's watch and its write
            other_worker.append(CorrectionStore(worker_context.redis).delete(3, [1]))
        return decide(self, reader, *args)

    monkeypatch.setattr(CorrectionStore, "_outcome", another_worker_deletes_it_meanwhile)
    assert jobs.apply_event(saved(created(annotation_id=1, updated_at="2026-11-23T02:00:00Z"))).endswith("deleted")
    assert other_worker == [1] and store.get(3, 1) is None and store.changed_count(3) == 0


def test_a_fine_tune_neither_erases_a_skip_nor_marks_a_correction_it_no_longer_has(worker_context):
    store = worker_context.store
    jobs.apply_event(saved(created(annotation_id=5, updated_at="2026-11-23T01:00:00Z")))
    jobs.apply_event(saved(created(annotation_id=5, updated_at="2026-11-23T02:00:00Z", was_cancelled=True)))
    store.set_unusable(3, 5, None)  # a fine-tune that had read it before the skip found it usable
    store.set_unusable(3, 5, "image gone")  # or not: either way the skip stands
    assert store.excluded(3)[5]["reason"] == "skipped or cancelled by the annotator"
    assert jobs.apply_event(created(annotation_id=5, updated_at="2026-11-23T01:00:00Z")).endswith("cancelled")
    jobs.apply_event(saved(created(annotation_id=6, updated_at="2026-11-23T01:00:00Z")))
    store.set_unusable(3, 6, "its image is gone")
    assert store.excluded(3)[6]["reason"] == "its image is gone" and store.get(3, 6) is not None


# ------------------------------------------------------------------- only what Label Studio confirms
def test_annotations_label_studio_never_had_are_excluded_with_the_reason_and_trigger_nothing(
    worker_context, settings, redis
):
    settings.finetune_every = 3
    jobs.apply_event(saved(created(annotation_id=1, task_id=1)))
    forged = [created(annotation_id=900 + i, task_id=1) for i in range(5)]  # every pixel "Car", posted by hand
    outcomes = [jobs.apply_event(event) for event in forged]
    assert outcomes == ["ANNOTATION_CREATED: refused"] * 5
    store = worker_context.store
    assert store.count(3) == 1 and store.changed_count(3) == 1
    assert Queue("train", connection=redis).count == 0
    excluded = collect(settings, redis, "test")["projects"]["3"]["excluded"]
    assert excluded["900"] == (
        f"not confirmed by Label Studio: Label Studio at {settings.label_studio_url} has no annotation 900 (404)"
    )
    jobs.apply_event(saved(created(annotation_id=900, task_id=2)))  # a real annotation 900 later is stored
    assert store.get(3, 900).task_id == 2 and "900" not in collect(settings, redis, "test")["projects"]["3"]["excluded"]


def test_an_annotation_claimed_for_another_project_or_task_is_refused(worker_context):
    jobs.apply_event(saved(created(annotation_id=11, task_id=1)))
    elsewhere = created(annotation_id=11, task_id=1)
    elsewhere["project"]["id"] = 4
    assert jobs.apply_event(elsewhere) == "ANNOTATION_CREATED: refused"
    assert worker_context.store.excluded(4)[11]["reason"] == "Label Studio has annotation 11 in project 3"
    assert jobs.apply_event(created(annotation_id=11, task_id=2)) == "ANNOTATION_CREATED: refused"
    assert worker_context.store.excluded(3)[11]["reason"] == "Label Studio has annotation 11 on task 1, not 2"


def test_what_is_stored_is_label_studios_copy_not_the_webhooks(worker_context):
    jobs.apply_event(saved(created(annotation_id=12, label="Sky")))
    altered = created(annotation_id=12, label="Car", updated_at="2026-12-01T00:00:00Z")
    altered["task"]["data"] = {"image": "http://attacker.example/poison.png"}
    assert jobs.apply_event(altered) == "ANNOTATION_CREATED: unchanged"
    correction = worker_context.store.get(3, 12)
    assert correction.result[0]["value"]["polygonlabels"] == ["Sky"]
    assert correction.data == {"image": "/data/upload/3/bf8c4da5-red.png"}


def test_events_wait_while_label_studio_is_unreachable_and_are_checked_when_it_answers(worker_context, settings, redis):
    store = worker_context.store
    jobs.apply_event(saved(created(annotation_id=1)))
    reachable = worker_context.settings
    worker_context.settings = settings.model_copy(update={"label_studio_url": f"http://127.0.0.1:{closed_port()}"})
    worker_context._label_studio = None
    jobs.apply_event(saved(created(annotation_id=2, task_id=2)))
    jobs.apply_event(created(annotation_id=901))  # a forgery, unknown yet
    deleted_in_label_studio(1)
    assert jobs.apply_event(reference_payload("webhook_annotations_deleted.json")) == "deleted 0 of 1, 1 unchecked"
    status = collect(worker_context.settings, redis, "test")["projects"]["3"]
    assert status["not_yet_checked"] == 3 and status["corrections"] == 1  # annotation 1 still stored
    assert store.changed_count(3) == 1  # the waiting ones count for no fine-tune
    (recheck,) = Queue(EVENTS, connection=redis).scheduled_job_registry.get_job_ids()
    assert Queue(EVENTS, connection=redis).fetch_job(recheck).func_name == "backend.jobs.recheck_unchecked"
    assert jobs.recheck_unchecked(3) == {"unchecked": 3}  # still unreachable: they keep waiting
    assert store.unchecked_count(3) == 3

    worker_context.settings, worker_context._label_studio = reachable, None
    assert jobs.recheck_unchecked(3) == {"stored": 1, "refused": 1, "deleted": 1}
    status = collect(settings, redis, "test")["projects"]["3"]
    assert status["not_yet_checked"] == 0 and status["corrections"] == 1
    assert store.get(3, 2) is not None and store.get(3, 1) is None and "901" in status["excluded"]
