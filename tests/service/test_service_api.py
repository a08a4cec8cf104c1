"""The HTTP API against a real uvicorn server on 127.0.0.1 (conftest ``service``: validate-only, SQLite)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from service_helpers import client, request_body

from caloforge.adapt.service import db


def _count(service, table) -> int:
    from sqlalchemy import func, select

    with service.store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _submit(service, token="submitter", key=None, **changes):
    headers = {"Idempotency-Key": key} if key else {}
    with client(service.url, service.tokens[token]) as c:
        r = c.post("/v1/adaptations", json=request_body(service, **changes), headers=headers)
    assert r.status_code == 202, r.text
    return r.json()


def test_probes_and_openapi(service) -> None:
    with client(service.url, None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["database"] == "ok"
        assert ready.json()["executor"] == "none" and ready.json()["execute"] is False
        assert c.get("/docs").status_code == 200
        spec = c.get("/openapi.json").json()
    assert "/v1/adaptations" in spec["paths"]
    assert set(spec["components"]["schemas"]["SubmitRequest"]["properties"]) >= {"base", "detector", "data"}
    assert "DetectorIn" in spec["components"]["schemas"]


def test_submit_validates_and_queues(service) -> None:
    job = _submit(service, hyperparameters={"loop.steps": 4, "eval.n_showers": 20, "strategy.lora.rank": 2})
    assert job["status"] == "queued" and job["creator"] == "submitter" and job["attempts"] == 0
    spec = job["spec"]
    assert spec["detector"] == {"name": "lar-pb"} and spec["data"] == str(service.data)
    assert spec["config"].endswith("configs/adapt/full.yaml") and spec["strategy"] == "full"
    assert spec["plan"]["detector"] == "lar-pb" and spec["plan"]["registered_model"] == "caloforge-lar-pb"
    assert spec["plan"]["eval_showers"] == 20 and spec["registration"] == {
        "model_name": None,
        "alias": "candidate",
    }
    with client(service.url, service.tokens["reader"]) as c:
        got = c.get(f"/v1/adaptations/{job['id']}")
        assert got.status_code == 200 and got.json() == job
        events = c.get(f"/v1/adaptations/{job['id']}/events").json()
    assert [e["seq"] for e in events["data"]] == [1] and "queued" in events["data"][0]["message"]
    entry = service.store.audit_log(limit=1, actor="submitter")[0]
    assert (entry.action, entry.target, entry.status_code) == ("adaptation.submit", job["id"], 202)


def test_inline_detector_yaml_and_distillation(service) -> None:
    from caloforge.platform.geometry import DETECTORS_DIR

    text = (DETECTORS_DIR / "lar-pb.yaml").read_text()
    job = _submit(service, detector={"yaml": text}, distillation={"method": "bns", "steps": 4})
    assert job["spec"]["detector"] == {"yaml": text} and job["spec"]["plan"]["detector"] == "lar-pb"
    assert job["spec"]["distillation"]["method"] == "bns" and job["spec"]["distillation"]["steps"] == 4
    assert job["spec"]["distillation"]["config"].endswith("configs/distill/bns.yaml")


def test_idempotency_key(service) -> None:
    first = _submit(service, key="idem-1")
    body = request_body(service)
    raw = json.dumps(dict(reversed(list(body.items()))), indent=2)  # same request, other bytes
    with client(service.url, service.tokens["submitter"]) as c:
        again = c.post("/v1/adaptations", content=raw, headers={"Idempotency-Key": "idem-1"})
        assert again.status_code == 202 and again.json()["id"] == first["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        before = _count(service, db.jobs)
        other = c.post(
            "/v1/adaptations", json=request_body(service, seed=7), headers={"Idempotency-Key": "idem-1"}
        )
    assert other.status_code == 409
    assert (
        other.json()["error"]["code"] == "idempotency_conflict"
        and first["id"] in other.json()["error"]["message"]
    )
    assert other.json()["error"]["field"] == "Idempotency-Key"
    assert _count(service, db.jobs) == before
    # keys are per creator: another token's same key is another job
    with client(service.url, service.tokens["admin"]) as c:
        theirs = c.post("/v1/adaptations", json=request_body(service), headers={"Idempotency-Key": "idem-1"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first["id"]


def test_concurrent_same_key_makes_one_job(service) -> None:
    results: list[str] = []

    def post() -> None:
        with client(service.url, service.tokens["submitter"]) as c:
            r = c.post("/v1/adaptations", json=request_body(service), headers={"Idempotency-Key": "race-1"})
            assert r.status_code == 202, r.text
            results.append(r.json()["id"])

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and len(set(results)) == 1


def _malformed(service):
    """(description, token, method, path, kwargs, status, field)."""
    data_root = service.data.parent
    big_yaml = "name: big\n" + "# padding\n" * 500
    return [
        ("no token", None, "POST", "/v1/adaptations", {"json": request_body(service)}, 401, "Authorization"),
        (
            "bad token",
            "nope-not-a-token-123456",
            "POST",
            "/v1/adaptations",
            {"json": {}},
            401,
            "Authorization",
        ),
        ("read-only token", "reader", "POST", "/v1/adaptations", {"json": request_body(service)}, 403, None),
        ("submit-only lists", "other", "GET", "/v1/adaptations", {}, 403, None),
        ("no token lists", None, "GET", "/v1/adaptations", {}, 401, "Authorization"),
        ("not JSON", "submitter", "POST", "/v1/adaptations", {"content": b"{base: x"}, 422, "body"),
        (
            "no base",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": {"detector": {"name": "lar-pb"}, "data": "x"}},
            422,
            "base",
        ),
        (
            "unknown key",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, bogus=1)},
            422,
            "bogus",
        ),
        (
            "name and yaml",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, detector={"name": "lar-pb", "yaml": "name: x"})},
            422,
            "detector",
        ),
        (
            "unknown detector",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, detector={"name": "no-such-detector"})},
            422,
            "detector.name",
        ),
        (
            "broken detector YAML",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, detector={"yaml": "name: [unclosed"})},
            422,
            "detector.yaml",
        ),
        (
            "invalid detector",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, detector={"yaml": "name: odd\nlayers: 3\n"})},
            422,
            "detector.yaml",
        ),
        (
            "detector YAML too large",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, detector={"yaml": big_yaml})},
            413,
            "detector.yaml",
        ),
        (
            "data outside the roots",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, data="/etc")},
            422,
            "data",
        ),
        (
            "data escaping the roots",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, data=str(data_root / ".." / ".."))},
            422,
            "data",
        ),
        (
            "missing data",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, data=str(data_root / "nothing-here"))},
            422,
            "data",
        ),
        (
            "data of another detector",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, detector={"name": "pbwo4"})},
            422,
            "data",
        ),
        (
            "unknown strategy",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, strategy="magic")},
            422,
            "strategy",
        ),
        (
            "hyper-parameter type",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, hyperparameters={"loop.steps": "many"})},
            422,
            "hyperparameters.loop.steps",
        ),
        (
            "unknown hyper-parameter",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, hyperparameters={"loop.bogus": 1})},
            422,
            "hyperparameters.loop.bogus",
        ),
        (
            "impossible hyper-parameter",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, hyperparameters={"eval.n_showers": 5})},
            422,
            "hyperparameters.eval.n_showers",
        ),
        (
            "reserved hyper-parameter",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, hyperparameters={"strategy.kind": "lora"})},
            422,
            "hyperparameters.strategy.kind",
        ),
        (
            "unknown init_from",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, hyperparameters={"strategy.init_from": "atlas"})},
            422,
            "hyperparameters.strategy.init_from",
        ),
        (
            "distillation method",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, distillation={"method": "magic"})},
            422,
            "distillation.method",
        ),
        (
            "distillation steps",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, distillation={"method": "bns", "steps": 3})},
            422,
            "distillation.steps",
        ),
        (
            "negative seed",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, seed=-1)},
            422,
            "seed",
        ),
        (
            "string seed",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, seed="1")},
            422,
            "seed",
        ),
        (
            "reserved alias",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, registration={"alias": "latest"})},
            422,
            "registration.alias",
        ),
        (
            "relative base",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, base="caloforge-base")},
            422,
            "base",
        ),
        (
            "base not a bundle",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, base=str(service.data))},
            422,
            "base",
        ),
        (
            "body too large",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service, metadata={"blob": "x" * 20000})},
            413,
            "body",
        ),
        (
            "long Idempotency-Key",
            "submitter",
            "POST",
            "/v1/adaptations",
            {"json": request_body(service), "headers": {"Idempotency-Key": "k" * 300}},
            422,
            "Idempotency-Key",
        ),
        ("bad status filter", "reader", "GET", "/v1/adaptations?status=done", {}, 422, "status"),
        ("bad limit", "reader", "GET", "/v1/adaptations?limit=0", {}, 422, "limit"),
        ("bad cursor", "reader", "GET", "/v1/adaptations?cursor=%%%", {}, 422, "cursor"),
        ("unknown job", "reader", "GET", "/v1/adaptations/adapt-none", {}, 404, "job_id"),
        ("audit without admin", "submitter", "GET", "/v1/audit", {}, 403, None),
    ]


def test_malformed_and_unauthorised_requests(service) -> None:
    cases = _malformed(service)
    assert len(cases) >= 20
    jobs_before = _count(service, db.jobs)
    audit_before = _count(service, db.audit)
    for what, token, method, path, kwargs, status, field in cases:
        with client(service.url, service.tokens.get(token, token)) as c:
            r = c.request(method, path, **kwargs)
        assert r.status_code == status, (what, r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"code", "message", "field"} and error["message"], what
        assert error["field"] == field, (what, error)
        if status == 401:
            assert r.headers["WWW-Authenticate"] == "Bearer"
    assert _count(service, db.jobs) == jobs_before  # nothing stored ...
    entries = service.store.audit_log(limit=len(cases))
    assert _count(service, db.audit) == audit_before + len(cases)  # ... but the audit line
    assert [e.status_code for e in reversed(entries)] == [c[5] for c in cases]
    actors = {e.actor for e in entries}
    assert {"anonymous", "reader", "other", "submitter"} <= actors


def test_list_pagination_and_filters(service) -> None:
    from caloforge.adapt.service.auth import TokenStore

    token = TokenStore(service.store).create("pager", ["submit", "read"])
    service.tokens["pager"] = token
    ids = [_submit(service, token="pager")["id"] for _ in range(5)]
    seen, cursor, pages = [], None, 0
    with client(service.url, token) as c:
        while True:
            params = {"creator": "pager", "limit": 2, **({"cursor": cursor} if cursor else {})}
            body = c.get("/v1/adaptations", params=params).json()
            seen += [j["id"] for j in body["data"]]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert pages == 3 and seen == list(reversed(ids))  # newest first, each job once
        c.post(f"/v1/adaptations/{ids[0]}/cancel")
        cancelled = c.get("/v1/adaptations", params={"creator": "pager", "status": "cancelled"}).json()[
            "data"
        ]
        assert [j["id"] for j in cancelled] == [ids[0]]
        queued = c.get("/v1/adaptations", params={"creator": "pager", "status": "queued"}).json()["data"]
        assert len(queued) == 4
        assert c.get("/v1/adaptations", params={"creator": "pager", "detector": "pbwo4"}).json()["data"] == []
        assert (
            len(c.get("/v1/adaptations", params={"creator": "pager", "detector": "lar-pb"}).json()["data"])
            == 5
        )


def test_cancel(service) -> None:
    job = _submit(service)
    with client(service.url, service.tokens["other"]) as c:
        refused = c.post(f"/v1/adaptations/{job['id']}/cancel")
    assert refused.status_code == 403 and "belongs to" in refused.json()["error"]["message"]
    with client(service.url, service.tokens["submitter"]) as c:
        r = c.post(f"/v1/adaptations/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
        assert c.post(f"/v1/adaptations/{job['id']}/cancel").json()["status"] == "cancelled"  # idempotent
        running = _submit(service)
        service.store.transition(running["id"], "running", expect=["queued"])
        r = c.post(f"/v1/adaptations/{running['id']}/cancel")
        assert r.status_code == 202 and r.json()["status"] == "cancelling" and r.json()["cancel_requested"]
        done = _submit(service)
        service.store.transition(done["id"], "succeeded")
        r = c.post(f"/v1/adaptations/{done['id']}/cancel")
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        events = c.get(f"/v1/adaptations/{job['id']}/events", params={"after": 1}).json()
    assert [e["seq"] for e in events["data"]] == [2] and events["data"][0][
        "message"
    ] == "cancelled by submitter"
    assert events["last_seq"] == 2


def test_sse_stream_delivers_events(service) -> None:
    job = _submit(service)

    def later() -> None:
        service.store.add_event(job["id"], "stage", "adapting", stage="adapt")
        time.sleep(0.2)
        service.store.transition(job["id"], "cancelled")

    # the new event and the end come once the stream has delivered what was there (no race with its start)
    producer = threading.Thread(target=later)
    received = []
    with (
        client(service.url, service.tokens["reader"]) as c,
        c.stream("GET", f"/v1/adaptations/{job['id']}/events", headers={"Accept": "text/event-stream"}) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                received.append((name, json.loads(line[5:])))
                if name == "status" and not producer.is_alive() and producer.ident is None:
                    producer.start()
    producer.join()
    kinds = [n for n, _ in received]
    assert kinds[0] == "log" and kinds[-1] == "end"
    assert ("stage", "adapting") in [(n, d.get("message")) for n, d in received]
    assert [d["status"] for n, d in received if n == "status"] == ["queued", "cancelled"]
    # Last-Event-ID resumes after the events already seen
    from caloforge.adapt.service.client import AdaptationClient

    with AdaptationClient(service.url, service.tokens["reader"]) as cl:
        resumed = [d for n, d in cl.stream(job["id"], after=1) if "seq" in d]
    assert [d["seq"] for d in resumed] == [2]


def test_report_and_logs_from_the_job_dir(service) -> None:
    job = _submit(service)
    job_dir = service.config.job_dir(job["id"])
    with client(service.url, service.tokens["reader"]) as c:
        assert c.get(f"/v1/adaptations/{job['id']}/report").status_code == 404
        assert c.get(f"/v1/adaptations/{job['id']}/logs").status_code == 404
        report_dir = job_dir / "adapt" / "report"  # where the job entrypoint's adaptation run writes it
        (report_dir / "plots").mkdir(parents=True)
        (report_dir / "report.md").write_text("# lar-pb\nFPD 0.1\n")
        (report_dir / "plots" / "energy.png").write_bytes(b"\x89PNG fake plot bytes")
        (job_dir / "adapt" / "adapt.log").write_text("step 1 loss 0.5\n")
        (job_dir.parent / "secret.txt").write_text("not for you")
        report = c.get(f"/v1/adaptations/{job['id']}/report").json()
        assert report["markdown"].startswith("# lar-pb") and report["files"] == [
            "plots/energy.png",
            "report.md",
        ]
        plot = c.get(f"/v1/adaptations/{job['id']}/report/files/plots/energy.png")
        assert plot.status_code == 200 and plot.content == b"\x89PNG fake plot bytes"
        for name in ("..%2F..%2F..%2Fsecret.txt", "%2E%2E/%2E%2E/%2E%2E/secret.txt", "nothing.png"):
            r = c.get(f"/v1/adaptations/{job['id']}/report/files/{name}")
            assert r.status_code == 404 and "not for you" not in r.text
        logs = c.get(f"/v1/adaptations/{job['id']}/logs")
    assert logs.status_code == 200 and "step 1 loss 0.5" in logs.text and "adapt/adapt.log" in logs.text


def test_client_raises_clear_errors(service) -> None:
    from caloforge.adapt.service.client import AdaptationClient, ServiceError

    with AdaptationClient(service.url, service.tokens["submitter"]) as cl:
        with pytest.raises(ServiceError) as err:
            cl.submit(request_body(service, detector={"name": "no-such-detector"}))
        assert (err.value.status, err.value.code, err.value.field) == (
            422,
            "invalid_request",
            "detector.name",
        )
        assert "no-such-detector" in str(err.value) and "(field detector.name)" in str(err.value)
        job = cl.submit(request_body(service), idempotency_key="client-1")
        assert cl.get(job["id"])["status"] == "queued"
        assert cl.cancel(job["id"])["status"] == "cancelled"
        assert cl.wait(job["id"], timeout=5)["status"] == "cancelled"
        assert [e["seq"] for e in cl.events(job["id"])] == [1, 2]
    with AdaptationClient(service.url, "wrong-token-0123456789") as cl, pytest.raises(ServiceError) as err:
        cl.list()
    assert err.value.status == 401 and err.value.code == "unauthorized"
    with AdaptationClient("http://127.0.0.1:9", "x" * 20) as cl, pytest.raises(ServiceError) as err:
        cl.list()
    assert err.value.status == 0 and err.value.code == "unreachable"
