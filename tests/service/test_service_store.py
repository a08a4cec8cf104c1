"""JobStore, tokens, migrations and the config on real SQLite files (no server)."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from caloforge.adapt.service import db
from caloforge.adapt.service.auth import TokenStore, parse_scopes
from caloforge.adapt.service.config import ServiceConfig, load_service_config
from caloforge.adapt.service.store import IdempotencyConflict, JobStore

SPEC = {"detector": {"name": "lar-pb"}, "plan": {"detector": "lar-pb"}}


def test_fresh_database_is_at_head_in_wal_mode_and_reopening_is_idempotent(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'service.db'}"
    store = JobStore(url)
    assert db.current_revision(store.engine) == db.head_revision() == "0001"
    assert set(inspect(store.engine).get_table_names()) >= {
        "jobs",
        "events",
        "audit",
        "tokens",
        "alembic_version",
    }
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
    job, _ = store.create_job(spec=SPEC, creator="a", idempotency_key=None, body_hash="h")
    store.close()
    again = JobStore(url)
    assert db.current_revision(again.engine) == db.head_revision()
    assert again.get_job(job.id) == job
    with again.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1


def test_migrations_are_shipped_as_package_data() -> None:
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["caloforge.adapt.service"]
    shipped = {
        p.relative_to(db.MIGRATIONS_DIR.parent)
        for pat in patterns
        for p in db.MIGRATIONS_DIR.parent.glob(pat)
    }
    present = {
        p.relative_to(db.MIGRATIONS_DIR.parent)
        for p in db.MIGRATIONS_DIR.rglob("*")
        if p.suffix in (".py", ".mako")
    }
    assert present and present <= shipped


def test_transitions_are_compare_and_set(tmp_path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}")
    job, created = store.create_job(spec=SPEC, creator="a", idempotency_key="k", body_hash="h")
    assert created and job.status == "queued"
    assert store.create_job(spec=SPEC, creator="a", idempotency_key="k", body_hash="h") == (job, False)
    with pytest.raises(IdempotencyConflict):
        store.create_job(spec=SPEC, creator="a", idempotency_key="k", body_hash="other")
    running = store.transition(job.id, "running", expect=["queued"], stage="adapt")
    assert running is not None and running.attempts == 1 and running.started_at and running.stage == "adapt"
    assert store.transition(job.id, "cancelled", expect=["queued"]) is None  # not queued any more
    assert store.transition(job.id, "queued", expect=["running"]).attempts == 1  # requeue keeps the count
    assert store.transition(job.id, "running", expect=["queued"]).attempts == 2
    done = store.transition(job.id, "succeeded", expect=["running"], result={"uri": "models:/m/1"})
    assert done.finished_at and done.result == {"uri": "models:/m/1"}
    assert [store.add_event(job.id, "log", f"m{i}") for i in range(3)] == [1, 2, 3]
    assert [e.message for e in store.events(job.id, after=1)] == ["m1", "m2"]
    assert [j.id for j in store.jobs_in(["succeeded"])] == [job.id]
    with pytest.raises(ValueError, match="status must be one of"):
        store.transition(job.id, "done")
    with pytest.raises(ValueError, match="does not exist"):
        store.add_event("adapt-none", "log", "x")


def test_tokens_are_hashed_scoped_and_revocable(tmp_path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}")
    tokens = TokenStore(store)
    token = tokens.create("alice", ["submit,read"])
    assert token.startswith("cft_") and len(token) > 40
    with store.engine.connect() as conn:
        stored = " ".join(map(str, conn.execute(text("SELECT * FROM tokens")).one()))
    assert token not in stored and token[4:] not in stored
    principal = tokens.authenticate(token)
    assert principal.name == "alice" and principal.has("read") and not principal.has("admin")
    assert tokens.authenticate(token + "x") is None and tokens.authenticate("cft_" + "A" * 43) is None
    with pytest.raises(ValueError, match="exists"):
        tokens.create("alice", ["read"])
    tokens.revoke("alice")
    assert tokens.authenticate(token) is None
    with pytest.raises(ValueError, match="no such active token"):
        tokens.revoke("alice")
    assert tokens.authenticate(tokens.create("alice", ["admin"])).has("submit")  # admin implies all
    with pytest.raises(ValueError, match="scope"):
        parse_scopes(["write"])
    tokens.ensure_bootstrap("b" * 32)
    tokens.ensure_bootstrap("b" * 32)  # unchanged: nothing to do
    assert tokens.authenticate("b" * 32).scopes == ("admin",)
    tokens.ensure_bootstrap("c" * 32)  # a new value replaces the old
    assert tokens.authenticate("b" * 32) is None and tokens.authenticate("c" * 32).name == "bootstrap"
    for placeholder in ("<bootstrap-token>" + "x" * 32, "short-token", "a" * 31, "a b" + "c" * 32):
        with pytest.raises(ValueError, match="placeholder"):
            tokens.ensure_bootstrap(placeholder)
    assert tokens.authenticate("c" * 32).name == "bootstrap"  # a refused value changes nothing


def test_service_config_yaml_and_env(tmp_path) -> None:
    config = load_service_config("configs/service/local.yaml", env={})
    assert config == ServiceConfig()
    env = {
        "CALOFORGE_SERVICE_DATABASE_URL": "postgresql+psycopg://u@db/caloforge",
        "RAY_ADDRESS": "http://ray:8265",
    }
    config = load_service_config(
        "configs/service/local.yaml", ["max_concurrent=3", f"data_roots=[{tmp_path}]"], env
    )
    assert (
        config.database_url == env["CALOFORGE_SERVICE_DATABASE_URL"]
        and config.ray_address == "http://ray:8265"
    )
    assert config.max_concurrent == 3 and config.resolved_data_roots() == (tmp_path.resolve(),)
    with pytest.raises(ValueError, match="max_concurrent"):
        load_service_config(None, ["max_concurrent=0"], {})
    with pytest.raises(ValueError, match="unknown key"):
        load_service_config(None, ["prot=1"], {})
