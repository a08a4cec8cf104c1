"""The service's SQL schema (SQLAlchemy 2 Core tables) and opening a database at the migration head.

Tables: ``jobs`` (one row per adaptation job; ``(creator, idempotency_key)`` unique), ``events`` (per job,
``seq`` 1, 2, ...), ``audit`` (every write and every refused request), ``tokens`` (hashed bearer tokens).
The schema is owned by the Alembic migrations in ``migrations/`` (shipped inside the package); ``open_engine``
runs them to head through Alembic's API on every open (a no-op at head). SQLite files are opened in WAL mode
with a busy timeout; any other URL (PostgreSQL) is used as given. The SQL is portable: no dialect-specific
types, JSON stored as text.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)

__all__ = ["MIGRATIONS_DIR", "audit", "events", "jobs", "metadata", "open_engine", "tokens", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("stage", String(16)),
    Column("spec", Text, nullable=False),
    Column("detector", String(128), nullable=False),
    Column("creator", String(128), nullable=False),
    Column("idempotency_key", String(255)),
    Column("body_hash", String(64), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("started_at", String(32)),
    Column("finished_at", String(32)),
    Column("error", Text),
    Column("result", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("next_seq", Integer, nullable=False, default=1),
    UniqueConstraint("creator", "idempotency_key", name="uq_jobs_creator_idempotency_key"),
    Index("ix_jobs_status_created", "status", "created_at"),
    Index("ix_jobs_created", "created_at", "id"),
)

events = Table(
    "events",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("time", String(32), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("stage", String(16)),
    Column("message", Text, nullable=False),
    Column("data", Text),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", String(32), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(255)),
    Column("status_code", Integer, nullable=False),
    Column("detail", Text),
)

tokens = Table(
    "tokens",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("token_id", String(32), nullable=False, unique=True),
    Column("salt", String(64), nullable=False),
    Column("hash", String(128), nullable=False),
    Column("scopes", String(64), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("revoked_at", String(32)),
)

_upgrade_lock = threading.Lock()


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    dbapi_connection.isolation_level = None  # transactions are begun by _sqlite_begin (below)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
    """Writers take SQLite's write lock when their transaction begins (``BEGIN IMMEDIATE``, through the
    ``immediate`` execution option): a read-then-write transaction cannot then fail with "database is
    locked" when another writer committed in between; the busy timeout makes writers queue instead."""
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL, foreign keys and a busy timeout on every connection."""
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the packaged Alembic migrations up to ``revision`` on ``engine`` (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with _upgrade_lock, engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None, f"{MIGRATIONS_DIR}: no migrations"
    return head


def open_engine(url: str) -> Engine:
    """An engine for ``url`` with the schema migrated to head."""
    engine = make_engine(url)
    upgrade(engine)
    return engine
