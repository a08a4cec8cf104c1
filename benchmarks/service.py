"""Service benchmark: concurrent submissions to a real ``caloforge serve``, and a few real jobs to the end.

1. **Validate-only** (``caloforge serve --no-execute``, a subprocess on 127.0.0.1 with a fresh
   ``$CALOFORGE_HOME``): a tiny base registered as ``caloforge-base@champion`` in a local sqlite MLflow
   registry, tiny ``lar-pb`` shards in the data root, a ``submit``+``read`` token made with the token store.
   One warm-up submission (cold: the base is downloaded and the plan built), then ``--n`` submissions fired
   at once (httpx, asyncio; each with its own Idempotency-Key and seed) together with ``--dups`` requests
   that repeat an earlier key with the same body (they race the original: de-duplication is tested where it
   is hardest), then one ``GET /v1/adaptations/{id}`` per job plus list pages, also at once.
2. **Executing** (``caloforge serve``, a second fresh database; its own Ray head): ``--real`` submissions
   with a tiny config (4 steps, a small evaluation), plus one duplicate, followed with ``GET`` until each
   has finished.

Reported: p50/p99 latency of POST and GET, throughput, the count of non-2xx answers, **lost** jobs (a 202
whose job is absent from the database or from the paginated list) and **duplicated** jobs (more than one
row, or more than one job id answered, for one Idempotency-Key) — both must be 0 —, and for the real jobs
their time in queue and to ``succeeded`` and the registry versions tagged with the job (exactly one each).

Prints a table and writes ``benchmarks/results/service.json`` (``--out``). ``--quick``: 20 submissions, 4
duplicates, no real job (``--real`` to add some). Every random draw is seeded.

    PYTHONPATH=. .venv/bin/python benchmarks/service.py --quick
    PYTHONPATH=. .venv/bin/python benchmarks/service.py            # 200 (+20 duplicates) and 3 real jobs
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from common import RESULTS, git_commit, write_results

from caloforge.environment import apply_default_env, free_port

ROOT = Path(__file__).resolve().parents[1]

BASE_DETECTORS = ("par04-siw", "pbwo4")
TARGET = "lar-pb"
# A tiny adaptation: a few optimizer steps and an evaluation of 20 showers (the README walkthrough's sizes).
TINY_HYPERPARAMETERS: dict[str, Any] = {
    "loop.steps": 4,
    "loop.batch_size": 8,
    "loop.log_every": 2,
    "loop.checkpoint_every": 4,
    "stream.shuffle_buffer": 8,
    "eval.n_showers": 20,
    "eval.metrics.classifier.epochs": 1,
    "eval.metrics.classifier.n_seeds": 1,
    "eval.metrics.fpd.min_samples": 10,
    "eval.metrics.fpd.max_samples": 10,
    "eval.metrics.kpd.batch_size": 10,
    "eval.metrics.plots.enabled": False,
    "progress": False,
}


# -- the world: a home, a registry with a tiny base, tiny shards -------------------------------------------
def _shards(out: Path, detectors: tuple[str, ...], n: int, seed: int) -> Path:
    from caloforge.datasets.prepare import SimulateConfig, simulate_and_shard
    from caloforge.datasets.shards import ShardConfig, SplitFractions

    spec = SimulateConfig(
        detectors=detectors,
        particles=("e-", "pi+"),
        n_per_detector=n,
        energy_gev=(2.0, 50.0),
        seed=seed,
        shards=ShardConfig(showers_per_shard=40, split=SplitFractions(train=0.6, val=0.1, test=0.3)),
    )
    return simulate_and_shard(spec, out)


def make_world(work: Path) -> dict[str, Any]:
    """A tiny untrained base (debug backbone, a spare detector slot; seeded) registered as
    ``caloforge-base@champion`` in ``work/mlflow.db``, and lar-pb shards in ``work/data`` (the data root)."""
    import torch

    from caloforge.datasets.shards import Manifest
    from caloforge.platform.energy import LayerEnergyConfig
    from caloforge.platform.lineage import Lineage
    from caloforge.platform.shower_model import ShowerModelConfig
    from caloforge.registry.store import RegistryStore
    from caloforge.training.job import model_for_manifest

    model_cfg = ShowerModelConfig(
        backbone="debug",
        patch_size=(9, 4, 3),
        parametrisation="flow_matching",
        sampler="euler",
        num_steps=2,
        layer_energy=LayerEnergyConfig(width=16, depth=1, num_steps=2),
    )
    base_data = _shards(work / "base-data", BASE_DETECTORS, 40, seed=3)
    torch.manual_seed(0)
    model = model_for_manifest(model_cfg, Manifest.load(base_data), spare_detector_slots=1)
    bundle = model.save(work / "base-bundle", lineage=Lineage(kind="base", objective="flow_matching"))
    version = RegistryStore().register_bundle(
        bundle, name="caloforge-base", kind="base", aliases=("champion",)
    )
    data_root = work / "data"
    data = _shards(data_root / TARGET, (TARGET,), 100, seed=5)
    return {"base": "caloforge-base@champion", "base_uri": version.uri, "data_root": data_root, "data": data}


class Service:
    """``caloforge serve`` as a subprocess on 127.0.0.1 (a home and database of its own)."""

    def __init__(self, home: Path, data_root: Path, execute: bool, max_concurrent: int, log: Path) -> None:
        from caloforge.adapt.service.auth import TokenStore
        from caloforge.adapt.service.config import ServiceConfig
        from caloforge.adapt.service.store import JobStore

        self.home = home
        self.env = {**os.environ, "CALOFORGE_HOME": str(home)}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("CALOFORGE_SERVICE_DATABASE_URL", None)
        os.environ["CALOFORGE_HOME"] = str(home)  # the database URL and the token below: this home's
        self.db_url = ServiceConfig().resolved_database_url()
        store = JobStore(self.db_url)
        self.token = TokenStore(store).create("bench", ["submit", "read"])
        store.close()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            *(sys.executable, "-m", "caloforge.cli", "serve", "--port", str(self.port)),
            *("--set", f"configs_dir={ROOT / 'configs'}", "--set", f"data_roots=[{data_root}]"),
            *("--set", f"max_concurrent={max_concurrent}", "--set", "poll_interval_s=0.5"),
            *("--set", "page_limit_max=500"),
        ]
        if not execute:
            cmd.append("--no-execute")
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        deadline = t0 + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"caloforge serve exited with {self.proc.returncode}:\n{log.read_text()}")
            try:  # ready, and the validator warmed up (it reports a failed warm-up; the requests then fail)
                ready = httpx.get(f"{self.url}/readyz", timeout=2)
                if ready.status_code == 200 and ready.json().get("validator") != "warming up":
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"caloforge serve did not become ready in 300 s:\n{log.read_text()}")
            time.sleep(0.25)
        self.start_s = time.perf_counter() - t0

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down, the executor stops), then SIGKILL after 30 s; the service's own Ray
        head (which outlives it by design) is stopped through ``RayJobRunner.close(shutdown_head=True)``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if (self.home / "service" / "ray-head.json").is_file():
            from caloforge.adapt.service.rayjobs import RayJobRunner

            RayJobRunner(None, self.home).close(shutdown_head=True)


# -- requests ----------------------------------------------------------------------------------------------
def _body(world: dict[str, Any], seed: int, hyperparameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "base": world["base"],
        "detector": {"name": TARGET},
        "data": str(world["data"]),
        "strategy": "full",
        "hyperparameters": dict(hyperparameters or TINY_HYPERPARAMETERS),
        "seed": seed,
        "metadata": {"benchmark": "service", "i": seed},
    }


async def _timed(client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        response = await client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        return {"status": 0, "ms": 1e3 * (time.perf_counter() - t0), "error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {"status": response.status_code, "ms": 1e3 * (time.perf_counter() - t0)}
    out["replayed"] = response.headers.get("Idempotent-Replayed") == "true"
    try:
        out["body"] = response.json()
    except ValueError:
        out["body"] = response.text[:500]
    return out


async def _burst(url: str, token: str, calls: list[tuple[str, str, dict[str, Any]]]) -> tuple[list, float]:
    """All ``calls`` (method, path, kwargs) at once on one connection pool; (results, wall seconds)."""
    limits = httpx.Limits(max_connections=len(calls), max_keepalive_connections=len(calls))
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=300) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_timed(client, m, p, **kw) for m, p, kw in calls))
        return list(results), time.perf_counter() - t0


def _stats(results: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    ms = np.array([r["ms"] for r in results], dtype=float)
    codes = Counter(str(r["status"]) for r in results)
    return {
        "requests": len(results),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
        "wall_s": round(wall_s, 3),
        "throughput_per_s": round(len(results) / wall_s, 1),
        "status_codes": dict(sorted(codes.items())),
    }


def _list_all(client: httpx.Client, page: int) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": page}
        if cursor:
            params["cursor"] = cursor
        response = client.get("/v1/adaptations", params=params)
        response.raise_for_status()
        body = response.json()
        jobs += body["data"]
        cursor = body["next_cursor"]
        if not cursor:
            return jobs


def _db_rows(db_url: str) -> list[tuple[str, str | None]]:
    """(id, idempotency_key) of every job row, straight from the service's database."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(text("SELECT id, idempotency_key FROM jobs"))]
    finally:
        engine.dispose()


def check_jobs(
    service: Service, accepted: dict[str, set[str]], keyless: set[str] | None = None
) -> dict[str, Any]:
    """Lost and duplicated jobs: ``accepted`` maps each Idempotency-Key to the job ids its 202s named."""
    keyless = keyless or set()
    rows = _db_rows(service.db_url)
    in_db = {job_id for job_id, _ in rows}
    per_key = Counter(key for _, key in rows if key is not None)
    with httpx.Client(
        base_url=service.url, headers={"Authorization": f"Bearer {service.token}"}, timeout=60
    ) as client:
        listed = {j["id"] for j in _list_all(client, page=100)}
    ids = {i for v in accepted.values() for i in v} | keyless
    return {
        "accepted_jobs": len(ids),
        "rows": len(rows),
        "lost_db": len(ids - in_db),
        "lost_list": len(ids - listed),
        "lost": len(ids - (in_db & listed)),
        "duplicated_rows": sum(n - 1 for n in per_key.values() if n > 1),
        "duplicated_answers": sum(len(v) - 1 for v in accepted.values() if len(v) > 1),
        "duplicated": sum(n - 1 for n in per_key.values() if n > 1)
        + sum(len(v) - 1 for v in accepted.values() if len(v) > 1),
        "unexpected_rows": len(in_db - ids),
    }


# -- the two phases ----------------------------------------------------------------------------------------
def validate_only(world: dict[str, Any], work: Path, n: int, dups: int, seed: int) -> dict[str, Any]:
    service = Service(work / "home-validate", world["data_root"], False, 1, work / "serve-validate.log")
    try:
        print(f"validate-only service ready in {service.start_s:.1f} s: {service.url}", file=sys.stderr)
        warm, _ = asyncio.run(
            _burst(
                service.url,
                service.token,
                [
                    (
                        "POST",
                        "/v1/adaptations",
                        {"json": _body(world, 0), "headers": {"Idempotency-Key": "warm"}},
                    )
                ],
            )
        )
        if warm[0]["status"] != 202:
            raise RuntimeError(f"the warm-up submission failed: {warm[0]}")
        accepted: dict[str, set[str]] = {"warm": {warm[0]["body"]["id"]}}

        rng = np.random.default_rng(seed)
        keys = [f"bench-{i:04d}" for i in range(n)]
        calls = [
            ("POST", "/v1/adaptations", {"json": _body(world, 1 + i), "headers": {"Idempotency-Key": k}})
            for i, k in enumerate(keys)
        ]
        for i in rng.choice(n, size=min(dups, n), replace=False):  # the same key and body again, racing
            calls.append(calls[int(i)])
        order = rng.permutation(len(calls))
        calls = [calls[int(i)] for i in order]
        posts, post_wall = asyncio.run(_burst(service.url, service.token, calls))
        for (_, _, kw), r in zip(calls, posts, strict=True):
            if r["status"] == 202:
                accepted.setdefault(kw["headers"]["Idempotency-Key"], set()).add(r["body"]["id"])
        replayed = sum(1 for r in posts if r["status"] == 202 and r.get("replayed"))
        errors = [r for r in posts if r["status"] != 202][:5]

        job_ids = sorted({i for v in accepted.values() for i in v})
        gets = [("GET", f"/v1/adaptations/{j}", {}) for j in job_ids]
        gets += [("GET", "/v1/adaptations", {"params": {"limit": 20}}) for _ in range(max(1, n // 20))]
        got, get_wall = asyncio.run(_burst(service.url, service.token, gets))
        missing = sum(
            1 for (_, p, _), r in zip(gets, got, strict=True) if p.count("/") == 3 and r["status"] == 404
        )
        checks = check_jobs(service, accepted)
        checks["lost"] += missing
        return {
            "service_start_s": round(service.start_s, 2),
            "warmup_post_ms": round(warm[0]["ms"], 1),
            "submissions": n,
            "duplicate_requests": min(dups, n),
            "replayed_answers": replayed,
            "post": _stats(posts, post_wall),
            "get": _stats(got, get_wall),
            "errors": errors,
            "checks": checks,
        }
    finally:
        service.stop()


def executing(world: dict[str, Any], work: Path, real: int, max_concurrent: int, seed: int) -> dict[str, Any]:
    from caloforge.adapt.service.client import AdaptationClient
    from caloforge.registry.store import RegistryStore

    service = Service(work / "home-exec", world["data_root"], True, max_concurrent, work / "serve-exec.log")
    try:
        print(f"executing service (its own Ray head) up in {service.start_s:.1f} s", file=sys.stderr)
        jobs: dict[str, dict[str, Any]] = {}
        accepted: dict[str, set[str]] = {}
        t_all = time.perf_counter()
        with AdaptationClient(service.url, service.token, timeout=120) as client:
            for i in range(real):
                key = f"real-{i}"
                t0 = time.perf_counter()
                job = client.submit(_body(world, 1000 + seed + i), idempotency_key=key)
                jobs[job["id"]] = {"key": key, "submitted": t0, "post_ms": 1e3 * (time.perf_counter() - t0)}
                accepted.setdefault(key, set()).add(job["id"])
            again = client.submit(_body(world, 1000 + seed), idempotency_key="real-0")  # a retry
            accepted["real-0"].add(again["id"])
            pending = set(jobs)
            while pending:
                for job_id in sorted(pending):
                    job = client.get(job_id)
                    rec = jobs[job_id]
                    if job["status"] == "running" and "running_at" not in rec:
                        rec["running_at"] = time.perf_counter()
                    if job["status"] in ("succeeded", "failed", "cancelled"):
                        rec["done_at"] = time.perf_counter()
                        rec["status"] = job["status"]
                        rec["error"] = job["error"]
                        rec["result"] = job["result"]
                        rec["events"] = len(client.events(job_id))
                        pending.discard(job_id)
                time.sleep(0.5)
        wall = time.perf_counter() - t_all
        registry = RegistryStore()
        out = []
        for job_id, rec in jobs.items():
            versions = registry.search(tags={"caloforge.service_job": job_id})
            started = rec.get("running_at", rec["done_at"])
            out.append(
                {
                    "job": job_id,
                    "status": rec["status"],
                    "error": rec["error"],
                    "post_ms": round(rec["post_ms"], 1),
                    "queued_s": round(started - rec["submitted"], 1),
                    "to_done_s": round(rec["done_at"] - rec["submitted"], 1),
                    "events": rec["events"],
                    "registered": (rec["result"] or {}).get("uri"),
                    "registry_versions": len(versions),
                }
            )
        checks = check_jobs(service, accepted)
        return {
            "service_start_s": round(service.start_s, 2),
            "max_concurrent": max_concurrent,
            "hyperparameters": TINY_HYPERPARAMETERS,
            "wall_s": round(wall, 1),
            "jobs": out,
            "succeeded": sum(j["status"] == "succeeded" for j in out),
            "registered_once": sum(j["registry_versions"] == 1 for j in out),
            "checks": checks,
        }
    finally:
        service.stop()


def table(record: dict[str, Any]) -> str:
    v = record["validate_only"]
    lines = [
        f"validate-only: {v['submissions']} submissions + {v['duplicate_requests']} duplicate keys at once "
        f"(warm-up POST {v['warmup_post_ms']:.0f} ms)",
        f"{'request':<8} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'req/s':>8}  status codes",
    ]
    for name in ("post", "get"):
        s = v[name]
        lines.append(
            f"{name.upper():<8} {s['requests']:>5} {s['p50_ms']:>9.1f} {s['p99_ms']:>9.1f} "
            f"{s['max_ms']:>9.1f} {s['throughput_per_s']:>8.1f}  {s['status_codes']}"
        )
    c = v["checks"]
    lines.append(
        f"jobs accepted {c['accepted_jobs']}, rows {c['rows']}, lost {c['lost']}, "
        f"duplicated {c['duplicated']}, replayed answers {v['replayed_answers']}"
    )
    e = record.get("executing")
    if e:
        lines.append("")
        lines.append(
            f"executing (max_concurrent {e['max_concurrent']}, service + Ray head up in "
            f"{e['service_start_s']:.0f} s): {e['succeeded']}/{len(e['jobs'])} succeeded in "
            f"{e['wall_s']:.0f} s"
        )
        lines.append(
            f"{'job':<31} {'status':<10} {'POST ms':>8} {'queued s':>9} {'done s':>7} {'events':>7}  "
            "registered"
        )
        for j in e["jobs"]:
            lines.append(
                f"{j['job']:<31} {j['status']:<10} {j['post_ms']:>8.0f} {j['queued_s']:>9.1f} "
                f"{j['to_done_s']:>7.1f} {j['events']:>7}  {j['registered']} "
                f"({j['registry_versions']} version)"
            )
        c = e["checks"]
        lines.append(f"jobs accepted {c['accepted_jobs']}, lost {c['lost']}, duplicated {c['duplicated']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 submissions, 4 duplicates, no real job")
    parser.add_argument("--n", type=int, default=None, help="concurrent submissions (default 200; quick 20)")
    parser.add_argument("--dups", type=int, default=None, help="duplicate-key requests (default n/10)")
    parser.add_argument(
        "--real", type=int, default=None, help="real jobs on an executing service (3; quick 0)"
    )
    parser.add_argument(
        "--max-concurrent", type=int, default=2, help="the executing service's max_concurrent"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--out", type=Path, default=RESULTS / "service.json")
    args = parser.parse_args(argv)
    n = args.n if args.n is not None else (20 if args.quick else 200)
    dups = args.dups if args.dups is not None else max(1, n // 10)
    real = args.real if args.real is not None else (0 if args.quick else 3)
    if n < 1 or dups < 0 or real < 0:
        parser.error("--n must be >= 1, --dups and --real >= 0")

    apply_default_env()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="caloforge-bench-service-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["CALOFORGE_HOME"] = str(work / "home-validate")
    t0 = time.perf_counter()
    world = make_world(work)
    print(
        f"tiny base {world['base_uri']} and {TARGET} shards in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )

    record: dict[str, Any] = {
        "benchmark": "service",
        "quick": args.quick,
        "commit": git_commit(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "work_dir": str(work),
        "validate_only": validate_only(world, work, n, dups, args.seed),
    }
    if real:
        record["executing"] = executing(world, work, real, args.max_concurrent, args.seed)
    checks = [record["validate_only"]["checks"]] + ([record["executing"]["checks"]] if real else [])
    record["lost"] = sum(c["lost"] for c in checks)
    record["duplicated"] = sum(c["duplicated"] for c in checks)
    print()
    print(table(record))
    write_results(record, "service", "cpu", out=args.out)
    finite = all(
        math.isfinite(record["validate_only"][k][s]) for k in ("post", "get") for s in ("p50_ms", "p99_ms")
    )
    ok = record["lost"] == 0 and record["duplicated"] == 0 and finite
    if real:
        e = record["executing"]
        ok = ok and e["succeeded"] == real and e["registered_once"] == real
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
