"""The corrections store: annotators' answers, kept in Redis, as training data for fine-tuning.

Per project (keys under `xdls:project:<id>:`):
    corrections       hash  annotation id -> the annotation's result, its task's data, who and when
    excluded          hash  annotation id -> why its latest event keeps it out of training (skipped, no task data,
                            not confirmed by Label Studio)
    unchecked         hash  annotation id -> an event Label Studio could not be asked about yet (it was unreachable);
                            it waits there, out of training, until a recheck asks again (backend.jobs)
    unusable          hash  annotation id -> why the last fine-tune could not learn from it (image gone, ...)
    deleted           set   annotation ids deleted in Label Studio (which never reuses an id): a late event for
                            one of them does not bring it back
    changed           set   annotation ids created or updated since the last fine-tune started (the N-trigger)
    changed_in_round  set   those the running (or a killed) fine-tune took when it started; see start_training_round
    meta              hash  latest label config, fine-tune bookkeeping

Only what Label Studio confirms is stored: backend.jobs checks every annotation event against its API and stores
Label Studio's own copy of the annotation and its task, never the webhook's. Events may arrive twice or out of order
(Label Studio retries, a failed event is retried after the others; replays are harmless): the latest `updated_at`
wins per annotation, whether it stored the annotation or excluded it (skipped, no task data), and the trigger counts
distinct annotations, not events.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from redis import Redis

PREFIX = "xdls"
PROJECTS = f"{PREFIX}:projects"
IGNORED_ACTIONS = f"{PREFIX}:events:ignored"
REJECTED_EVENTS = f"{PREFIX}:events:rejected"
MAX_REJECTED_KEPT = 200
EXCLUSIONS = {
    "excluded:cancelled": "skipped or cancelled by the annotator",
    "excluded:no_task_data": "the webhook carried no task data (no image to learn from)",
}


@dataclass
class Correction:
    annotation_id: int
    task_id: int
    data: dict  # the task's data (the image URL lives here)
    result: list[dict]  # Label Studio result regions
    completed_by: Any
    updated_at: str
    label_config_hash: str


class InvalidAnnotation(ValueError):
    """An annotation in a webhook that cannot be stored (no usable id, no task id)."""


def meta_key(project: int) -> str:
    return f"{PREFIX}:project:{project}:meta"


def config_hash(label_config: str | None) -> str:
    return hashlib.sha1((label_config or "").strip().encode()).hexdigest()[:12]


def as_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidAnnotation(f"no {what}" if value is None else f"{what} is not a number: {value!r}")
    try:
        return int(value)
    except ValueError:
        raise InvalidAnnotation(f"{what} is not a number: {value!r}") from None


def _is_older(updated_at: str, than: str) -> bool:
    """Label Studio's timestamps are ISO 8601, with or without microseconds, so they are compared as moments
    (as strings, "10:00:43Z" would sort after "10:00:43.5Z"); anything else falls back to comparing text."""
    try:
        return datetime.fromisoformat(updated_at) < datetime.fromisoformat(than)
    except (TypeError, ValueError):
        return updated_at < than


class CorrectionStore:
    def __init__(self, redis: Redis):
        self.redis = redis

    def _key(self, project: int, name: str) -> str:
        return f"{PREFIX}:project:{project}:{name}"

    # -------------------------------------------------------------------------------- writing
    def upsert(self, project: int, annotation: Mapping, task: Mapping, label_config: str | None) -> str:
        """Store one annotation. Returns what happened: stored, unchanged, stale, deleted or excluded:<reason>.
        Raises InvalidAnnotation if it has no usable annotation or task id."""
        annotation_id = as_id(annotation.get("id"), "annotation id")
        correction = Correction(
            annotation_id=annotation_id,
            task_id=as_id(task.get("id") or annotation.get("task"), "task id"),
            data=dict(task.get("data") or {}),
            result=list(annotation.get("result") or []),
            completed_by=annotation.get("completed_by"),
            updated_at=str(annotation.get("updated_at") or annotation.get("created_at") or ""),
            label_config_hash=config_hash(label_config),
        )
        cancelled = bool(annotation.get("was_cancelled"))

        def check_and_write(pipe) -> str:  # as one: another worker may apply an event of the same project meanwhile
            outcome = self._outcome(pipe, project, correction, cancelled)
            pipe.multi()
            if outcome == "stored":
                self._write_stored(pipe, project, correction, label_config)
            elif outcome.startswith("excluded:"):
                self._write_excluded(pipe, project, annotation_id, EXCLUSIONS[outcome], correction.updated_at)
            return outcome

        keys = [self._key(project, name) for name in ("corrections", "excluded", "deleted")]
        return self.redis.transaction(check_and_write, *keys, value_from_callable=True)

    def _outcome(self, reader: Redis, project: int, correction: Correction, cancelled: bool) -> str:
        annotation_id = correction.annotation_id
        if reader.sismember(self._key(project, "deleted"), annotation_id):
            return "deleted"  # an event that arrived after the annotation's deletion
        raw = reader.hget(self._key(project, "corrections"), annotation_id)
        existing = Correction(**json.loads(raw)) if raw else None
        if existing is not None:
            latest = existing.updated_at
        else:  # the event that excluded it, if one did
            raw = reader.hget(self._key(project, "excluded"), annotation_id)
            latest = json.loads(raw).get("updated_at") if raw else None
        if latest is not None and _is_older(correction.updated_at, latest):
            return "stale"  # an older event replayed after a newer one
        if cancelled:
            return "excluded:cancelled"
        if not correction.data:
            return "excluded:no_task_data"
        return "unchanged" if existing == correction else "stored"

    def _write_stored(self, pipe, project: int, correction: Correction, label_config: str | None) -> None:
        annotation_id = correction.annotation_id
        pipe.sadd(PROJECTS, project)
        pipe.hset(self._key(project, "corrections"), annotation_id, json.dumps(asdict(correction)))
        pipe.hdel(self._key(project, "excluded"), annotation_id)
        pipe.hdel(self._key(project, "unusable"), annotation_id)
        pipe.sadd(self._key(project, "changed"), annotation_id)
        if label_config:
            pipe.hset(self._key(project, "meta"), mapping={"label_config": label_config})

    def _write_excluded(
        self, pipe, project: int, annotation_id: int, reason: str, updated_at: str | None = None
    ) -> None:
        """`updated_at` None: the record never makes a later event stale (a refusal, whose claimed time is not
        Label Studio's)."""
        record = json.dumps({"reason": reason, "at": time.time(), "updated_at": updated_at})
        pipe.sadd(PROJECTS, project)
        pipe.hdel(self._key(project, "corrections"), annotation_id)
        pipe.hdel(self._key(project, "unusable"), annotation_id)
        for counter in ("changed", "changed_in_round"):
            pipe.srem(self._key(project, counter), annotation_id)
        pipe.hset(self._key(project, "excluded"), annotation_id, record)

    def refuse(self, project: int, annotation_id: int, reason: str) -> None:
        """Keep an annotation Label Studio did not confirm out of training, with why (listed by `status`)."""
        with self.redis.pipeline() as pipe:
            self._write_excluded(pipe, project, annotation_id, reason)
            pipe.hdel(self._key(project, "unchecked"), annotation_id)
            pipe.execute()

    def park(self, project: int, annotation_id: int, kind: str, task_id: int | None, reason: str) -> None:
        """An event for `annotation_id` (`kind` "annotation" or "deletion") that could not be checked with Label Studio
        yet: it waits, out of training, until `settle` (a later check that could ask). A newer event replaces it."""
        record = json.dumps({"kind": kind, "task": task_id, "reason": reason, "at": time.time()})
        with self.redis.pipeline() as pipe:
            pipe.sadd(PROJECTS, project)
            pipe.hset(self._key(project, "unchecked"), annotation_id, record)
            pipe.execute()

    def settle(self, project: int, annotation_id: int) -> None:
        self.redis.hdel(self._key(project, "unchecked"), annotation_id)

    def unchecked(self, project: int) -> dict[int, dict]:
        return {int(k): json.loads(v) for k, v in self.redis.hgetall(self._key(project, "unchecked")).items()}

    def unchecked_count(self, project: int) -> int:
        return int(self.redis.hlen(self._key(project, "unchecked")))

    def known(self, project: int, annotation_id: int) -> bool:
        """Whether any event for the annotation was kept: stored, excluded or waiting to be checked."""
        with self.redis.pipeline() as pipe:
            for name in ("corrections", "excluded", "unchecked"):
                pipe.hexists(self._key(project, name), annotation_id)
            return any(pipe.execute())

    def delete(self, project: int, annotation_ids: list[int]) -> int:
        if not annotation_ids:
            return 0
        with self.redis.pipeline() as pipe:
            pipe.hdel(self._key(project, "corrections"), *annotation_ids)
            for name in ("excluded", "unusable", "unchecked"):
                pipe.hdel(self._key(project, name), *annotation_ids)
            pipe.sadd(self._key(project, "deleted"), *annotation_ids)
            for counter in ("changed", "changed_in_round"):  # a failed round must not give these back
                pipe.srem(self._key(project, counter), *annotation_ids)
            removed = pipe.execute()[0]
        return int(removed)

    def set_unusable(self, project: int, annotation_id: int, reason: str | None) -> None:
        """Record why a fine-tune could not learn from a stored correction (its image is gone, its label was
        renamed), or clear that record (reason None). The correction stays: the next fine-tune tries it again.
        Kept apart from the exclusions that events decide (a skip), which a fine-tune must not erase, and only
        while the correction is stored (not for one deleted or skipped during the fine-tune)."""
        key, corrections = self._key(project, "unusable"), self._key(project, "corrections")
        if reason is None:
            self.redis.hdel(key, annotation_id)
            return

        def mark_if_stored(pipe) -> None:
            stored = pipe.hexists(corrections, annotation_id)
            pipe.multi()
            if stored:
                pipe.hset(key, annotation_id, json.dumps({"reason": reason, "at": time.time()}))

        self.redis.transaction(mark_if_stored, corrections)

    def set_label_config(self, project: int, label_config: str) -> None:
        self.redis.sadd(PROJECTS, project)
        self.redis.hset(self._key(project, "meta"), mapping={"label_config": label_config})

    def record_ignored(self, action: str) -> None:
        self.redis.hincrby(IGNORED_ACTIONS, action, 1)

    def record_rejected(self, action: str, reason: str) -> None:
        entry = json.dumps({"action": action, "reason": reason, "at": time.time()})
        with self.redis.pipeline() as pipe:
            pipe.lpush(REJECTED_EVENTS, entry)
            pipe.ltrim(REJECTED_EVENTS, 0, MAX_REJECTED_KEPT - 1)
            pipe.execute()

    # -------------------------------------------------------------------------------- reading
    def get(self, project: int, annotation_id: int) -> Correction | None:
        raw = self.redis.hget(self._key(project, "corrections"), annotation_id)
        return Correction(**json.loads(raw)) if raw else None

    def all(self, project: int) -> Iterator[Correction]:
        for raw in self.redis.hvals(self._key(project, "corrections")):
            yield Correction(**json.loads(raw))

    def count(self, project: int) -> int:
        return int(self.redis.hlen(self._key(project, "corrections")))

    def changed_count(self, project: int) -> int:
        """Corrections no finished fine-tune has learnt from: new ones, and those of a round still running or
        whose worker was killed (the nightly trigger must still see those)."""
        return len(self.redis.sunion([self._key(project, "changed"), self._key(project, "changed_in_round")]))

    def excluded(self, project: int) -> dict[int, dict]:
        """Annotations kept out of training, with why: by their events (skipped, no task data) or by the last
        fine-tune (unusable)."""
        records = {}
        for name in ("unusable", "excluded"):
            records |= {int(k): json.loads(v) for k, v in self.redis.hgetall(self._key(project, name)).items()}
        return records

    def label_config(self, project: int) -> str | None:
        raw = self.redis.hget(self._key(project, "meta"), "label_config")
        return raw.decode() if raw else None

    def projects(self) -> list[int]:
        return sorted(int(p) for p in self.redis.smembers(PROJECTS))

    def meta(self, project: int) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self._key(project, "meta")).items()}

    # ------------------------------------------------------------------------- fine-tune bookkeeping
    def start_training_round(self, project: int) -> int:
        """Take the N-trigger counter at the start of a fine-tune (changes from now on count towards the next one);
        returns how many changes it takes. `end_training_round` settles them; a round that never ended (its worker
        was killed) is taken again by the next one."""
        changed, taken = self._key(project, "changed"), self._key(project, "changed_in_round")
        with self.redis.pipeline() as pipe:
            pipe.sunionstore(taken, [taken, changed])
            pipe.delete(changed)
            pipe.scard(taken)
            count = pipe.execute()[-1]
        return int(count)

    def end_training_round(self, project: int, succeeded: bool) -> None:
        """A fine-tune that failed gives its changes back to the N-trigger counter, so they still count."""
        changed, taken = self._key(project, "changed"), self._key(project, "changed_in_round")
        with self.redis.pipeline() as pipe:
            if not succeeded:
                pipe.sunionstore(changed, [changed, taken])
            pipe.delete(taken)
            pipe.execute()

    def record_finetune(self, project: int, **fields: Any) -> None:
        self.redis.hset(self._key(project, "meta"), mapping={f"finetune_{k}": str(v) for k, v in fields.items()})
