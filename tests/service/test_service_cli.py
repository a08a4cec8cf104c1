"""``caloforge serve token ...`` and ``caloforge adapt submit|status|...`` against the real server
(``caloforge serve`` as a process, executing and ``--no-execute``: test_service_acceptance.py)."""

from __future__ import annotations

from service_helpers import client

from caloforge.cli import main


def test_token_cli_create_list_revoke(service, capsys) -> None:
    assert main(["serve", "token", "create", "carol", "--scope", "read", "--scope", "submit"]) == 0
    token = capsys.readouterr().out.strip()
    with client(service.url, token) as c:
        assert c.get("/v1/adaptations").status_code == 200
    assert main(["serve", "token", "list"]) == 0
    listing = capsys.readouterr().out
    assert "carol" in listing and "read,submit" in listing and token not in listing
    assert main(["serve", "token", "revoke", "carol"]) == 0
    with client(service.url, token) as c:
        r = c.get("/v1/adaptations")
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid or revoked token"
    assert main(["serve", "token", "revoke", "carol"]) == 2
    assert "no such active token" in capsys.readouterr().err
    assert main(["serve", "token", "create", "dave", "--scope", "write"]) == 2
    assert "scope" in capsys.readouterr().err


def test_adapt_client_cli(service, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CALOFORGE_TOKEN", service.tokens["submitter"])
    common = ["--server", service.url]
    args = ["adapt", "submit", *common, "--base", str(service.base_bundle), "--detector", "lar-pb"]
    args += ["--data", str(service.data), "--set", "loop.steps=4", "--set", "eval.n_showers=20"]
    assert main([*args, "--idempotency-key", "cli-1", "--metadata", "ticket=42"]) == 0
    out = capsys.readouterr().out
    job_id = out.split("job", 1)[1].split()[0]
    assert "queued" in out and "lar-pb" in out
    assert main(["adapt", "status", *common, job_id]) == 0 and job_id in capsys.readouterr().out
    assert main([*args, "--idempotency-key", "cli-2"]) == 0
    capsys.readouterr()
    assert main(["adapt", "list", *common, "--creator", "submitter", "--limit", "1"]) == 0
    assert "# more: --cursor" in capsys.readouterr().out
    assert main(["adapt", "cancel", *common, job_id]) == 0 and "cancelled" in capsys.readouterr().out
    assert main(["adapt", "events", *common, job_id]) == 0
    assert "cancelled by submitter" in capsys.readouterr().out
    assert main(["adapt", "events", *common, job_id, "--follow"]) == 0
    assert "status cancelled" in capsys.readouterr().out
    assert main(["adapt", "wait", *common, job_id]) == 1  # finished, but not succeeded
    # every API error is one clear line
    bad = ["adapt", "submit", *common, "--base", str(service.base_bundle), "--detector", "no-such"]
    assert main([*bad, "--data", str(service.data)]) == 1
    err = capsys.readouterr().err
    assert "caloforge: error: 422 invalid_request: detector.name" not in err  # message, then the field
    assert "422 invalid_request: unknown detector 'no-such'" in err and "(field detector.name)" in err
    monkeypatch.setenv("CALOFORGE_TOKEN", "not-a-valid-token-000")
    assert main(["adapt", "status", *common, job_id]) == 1
    assert "401 unauthorized: invalid or revoked token" in capsys.readouterr().err
    assert main(["adapt", "status", "--server", "http://127.0.0.1:9", job_id]) == 1
    assert "unreachable" in capsys.readouterr().err


def test_local_adapt_command_still_works(service, capsys) -> None:
    args = ["adapt", "--base", str(service.base_bundle), "--detector", "lar-pb", "--data", str(service.data)]
    assert main([*args, "--config", "configs/adapt/lora.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "kind: lora" in out and "#   detector: lar-pb" in out
    assert main(["adapt", "--detector", "lar-pb"]) == 2
    assert "required: --base, --data" in capsys.readouterr().err
