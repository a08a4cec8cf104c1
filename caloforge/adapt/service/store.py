"""``JobStore``: adaptation jobs, their events and the audit log in SQL (``db``; migrated to head on open).

Shared by the API (``app``) and the executor; every status change is an atomic compare-and-set
(:meth:`JobStore.transition`), so the API's cancel and the executor's progress cannot overwrite each other.
Times are UTC ISO-8601 strings (microseconds; they sort as text). Job ids are ``adapt-<24 hex>``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from caloforge.adapt.service import db

__all__ = [
    "ACTIVE",
    "STAGES",
    "STATUSES",
    "TERMINAL",
    "AuditEntry",
    "Event",
    "IdempotencyConflict",
    "Job",
    "JobStore",
    "utcnow",
]

STATUSES = ("validating", "queued", "running", "cancelling", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset(STATUSES) - TERMINAL
STAGES = ("adapt", "distill", "evaluate", "export", "register")
EVENT_KINDS = ("stage", "log", "metric", "result", "error")


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


class IdempotencyConflict(ValueError):
    """The same creator used an Idempotency-Key before with another request body (``job`` is that job)."""

    def __init__(self, job: Job) -> None:
        super().__init__(
            f"Idempotency-Key {job.idempotency_key!r} was used for job {job.id} with another request body"
        )
        self.job = job


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    stage: str | None
    spec: dict[str, Any]
    creator: str
    idempotency_key: str | None
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None
    result: dict[str, Any] | None
    attempts: int
    cancel_requested: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "stage": self.stage,
            "spec": self.spec,
            "creator": self.creator,
            "idempotency_key": self.idempotency_key,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "result": self.result,
            "attempts": self.attempts,
            "cancel_requested": self.cancel_requested,
        }


@dataclass(frozen=True)
class Event:
    job_id: str
    seq: int
    time: str
    kind: str
    stage: str | None
    message: str
    data: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "stage": self.stage,
            "message": self.message,
            "data": self.data,
        }


@dataclass(frozen=True)
class AuditEntry:
    id: int
    time: str
    actor: str
    action: str
    target: str | None
    status_code: int
    detail: dict[str, Any] | None


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _job(row: Any) -> Job:
    return Job(
        id=row.id,
        status=row.status,
        stage=row.stage,
        spec=json.loads(row.spec),
        creator=row.creator,
        idempotency_key=row.idempotency_key,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        error=row.error,
        result=_loads(row.result),
        attempts=int(row.attempts),
        cancel_requested=bool(row.cancel_requested),
    )


def encode_cursor(created_at: str, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at}|{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """(created_at, id) of a cursor from :meth:`JobStore.list_jobs`; ValueError naming it otherwise."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, job_id = text.split("|", 1)
        dt.datetime.fromisoformat(created_at)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError(f"cursor: {cursor!r} is not a cursor returned by this service") from None
    return created_at, job_id


class JobStore:
    """Jobs, events and the audit log (see the module docstring). ``url``: a SQLAlchemy URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = db.open_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(immediate=True) as conn, conn.begin():
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def ping(self) -> None:
        """Raises when the database cannot be reached (the readiness probe)."""
        with self._read() as conn:
            conn.execute(select(func.count()).select_from(db.tokens).limit(1)).scalar_one()

    # -- jobs ----------------------------------------------------------------------------------------------
    def create_job(
        self, *, spec: dict[str, Any], creator: str, idempotency_key: str | None, body_hash: str
    ) -> tuple[Job, bool]:
        """A new ``queued`` job (the API validates before it calls this), or — for a key this creator used
        before with the same ``body_hash`` — that job and ``created=False``; another hash raises
        :class:`IdempotencyConflict`."""
        if idempotency_key is not None:
            existing = self.job_for_key(creator, idempotency_key)
            if existing is not None:
                return self._replay(existing, body_hash)
        now = utcnow()
        job_id = f"adapt-{uuid.uuid4().hex[:24]}"
        detector = spec.get("detector") or {}
        plan = spec.get("plan") or {}
        row = {
            "id": job_id,
            "status": "queued",
            "stage": None,
            "spec": json.dumps(spec, sort_keys=True),
            "detector": str(plan.get("detector") or detector.get("name") or "?"),
            "creator": creator,
            "idempotency_key": idempotency_key,
            "body_hash": body_hash,
            "created_at": now,
            "updated_at": now,
            "attempts": 0,
            "cancel_requested": False,
            "next_seq": 1,
        }
        try:
            with self._write() as conn:
                conn.execute(insert(db.jobs).values(**row))
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self.job_for_key(
                creator, idempotency_key
            )  # a concurrent request with the same key won
            if existing is None:
                raise
            return self._replay(existing, body_hash)
        job = self.get_job(job_id)
        assert job is not None
        return job, True

    def job_for_key(self, creator: str, key: str) -> tuple[Job, str] | None:
        """(the job ``creator`` submitted with Idempotency-Key ``key``, its body hash), or None."""
        with self._read() as conn:
            row = conn.execute(
                select(db.jobs).where(db.jobs.c.creator == creator, db.jobs.c.idempotency_key == key)
            ).first()
        return None if row is None else (_job(row), row.body_hash)

    @staticmethod
    def _replay(existing: tuple[Job, str], body_hash: str) -> tuple[Job, bool]:
        job, stored_hash = existing
        if stored_hash != body_hash:
            raise IdempotencyConflict(job)
        return job, False

    def get_job(self, job_id: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).first()
        return None if row is None else _job(row)

    def list_jobs(
        self,
        *,
        status: str | None = None,
        detector: str | None = None,
        creator: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """Newest first; ``cursor`` (from a previous page) continues after that page. Returns (jobs, the next
        page's cursor or None on the last page)."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        c = db.jobs.c
        query = select(db.jobs)
        if status is not None:
            query = query.where(c.status == status)
        if detector is not None:
            query = query.where(c.detector == detector)
        if creator is not None:
            query = query.where(c.creator == creator)
        if cursor is not None:
            created_at, job_id = decode_cursor(cursor)
            query = query.where(
                or_(c.created_at < created_at, and_(c.created_at == created_at, c.id < job_id))
            )
        query = query.order_by(c.created_at.desc(), c.id.desc()).limit(limit + 1)
        with self._read() as conn:
            rows = conn.execute(query).all()
        jobs = [_job(r) for r in rows[:limit]]
        more = len(rows) > limit
        return jobs, (encode_cursor(jobs[-1].created_at, jobs[-1].id) if more else None)

    def jobs_in(self, statuses: Iterable[str]) -> list[Job]:
        """Jobs in any of ``statuses``, in queue order (created_at, id)."""
        statuses = list(statuses)
        with self._read() as conn:
            rows = conn.execute(
                select(db.jobs)
                .where(db.jobs.c.status.in_(statuses))
                .order_by(db.jobs.c.created_at, db.jobs.c.id)
            ).all()
        return [_job(r) for r in rows]

    def transition(
        self,
        job_id: str,
        status: str,
        *,
        expect: Iterable[str] | None = None,
        stage: str | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> Job | None:
        """Set ``status`` (and ``stage`` / ``error`` / ``result`` when given) atomically when the current
        status is in ``expect`` (any when None); None when it was not (or the job does not exist). ``queued →
        running`` counts an attempt and stamps ``started_at``; a terminal status stamps ``finished_at``;
        ``cancelling`` sets ``cancel_requested``."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}, got {status!r}")
        if stage is not None and stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
        now = utcnow()
        c = db.jobs.c
        values: dict[str, Any] = {"status": status, "updated_at": now}
        if stage is not None:
            values["stage"] = stage
        if error is not None:
            values["error"] = error
        if result is not None:
            values["result"] = _dumps(result)
        if status == "running":
            values["started_at"] = func.coalesce(c.started_at, now)
        if status in TERMINAL:
            values["finished_at"] = now
        if status in ("cancelling", "cancelled"):
            values["cancel_requested"] = True
        query = update(db.jobs).where(c.id == job_id)
        if expect is not None:
            query = query.where(c.status.in_(list(expect)))
        with self._write() as conn:
            if status == "running":
                current = conn.execute(select(c.status).where(c.id == job_id)).scalar_one_or_none()
                if current == "queued":
                    values["attempts"] = c.attempts + 1
            if conn.execute(query.values(**values)).rowcount != 1:
                return None
        return self.get_job(job_id)

    def set_stage(self, job_id: str, stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
        with self._write() as conn:
            conn.execute(
                update(db.jobs).where(db.jobs.c.id == job_id).values(stage=stage, updated_at=utcnow())
            )

    # -- events --------------------------------------------------------------------------------------------
    def add_event(
        self,
        job_id: str,
        kind: str,
        message: str,
        data: dict[str, Any] | None = None,
        stage: str | None = None,
    ) -> int:
        """Append an event to ``job_id``; returns its ``seq`` (1, 2, ... per job)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind must be one of {list(EVENT_KINDS)}, got {kind!r}")
        c = db.jobs.c
        with self._write() as conn:
            seq = conn.execute(select(c.next_seq).where(c.id == job_id)).scalar_one_or_none()
            if seq is None:
                raise ValueError(f"job {job_id!r} does not exist")
            conn.execute(update(db.jobs).where(c.id == job_id).values(next_seq=c.next_seq + 1))
            conn.execute(
                insert(db.events).values(
                    job_id=job_id,
                    seq=int(seq),
                    time=utcnow(),
                    kind=kind,
                    stage=stage,
                    message=message,
                    data=_dumps(data),
                )
            )
        return int(seq)

    def events(self, job_id: str, after: int = 0) -> list[Event]:
        with self._read() as conn:
            rows = conn.execute(
                select(db.events)
                .where(db.events.c.job_id == job_id, db.events.c.seq > after)
                .order_by(db.events.c.seq)
            ).all()
        return [Event(r.job_id, int(r.seq), r.time, r.kind, r.stage, r.message, _loads(r.data)) for r in rows]

    # -- audit ---------------------------------------------------------------------------------------------
    def audit(
        self, *, actor: str, action: str, target: str | None, status_code: int, detail: dict[str, Any] | None
    ) -> None:
        with self._write() as conn:
            conn.execute(
                insert(db.audit).values(
                    time=utcnow(),
                    actor=actor,
                    action=action,
                    target=target,
                    status_code=status_code,
                    detail=_dumps(detail),
                )
            )

    def audit_log(self, *, limit: int = 100, actor: str | None = None) -> list[AuditEntry]:
        """The newest ``limit`` audit entries (newest first)."""
        query = select(db.audit).order_by(db.audit.c.id.desc()).limit(limit)
        if actor is not None:
            query = query.where(db.audit.c.actor == actor)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [
            AuditEntry(int(r.id), r.time, r.actor, r.action, r.target, int(r.status_code), _loads(r.detail))
            for r in rows
        ]

    def count_jobs(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(db.jobs)).scalar_one())
