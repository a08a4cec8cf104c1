"""The job entrypoint's errors are events, and its event lines parse only with their prefix. A whole run
(stages, events, result.json, registration once, a rerun that registers nothing new) is tested end to end
through the service in tests/service/test_service_acceptance.py."""

from __future__ import annotations

from pathlib import Path

from caloforge.adapt.service.jobmain import main, parse_event_line, read_events


def test_a_job_without_spec_fails_with_an_error_event(tmp_path: Path) -> None:
    assert main(["--job-id", "adapt-nospec", "--job-dir", str(tmp_path)]) == 1
    (event,) = read_events(tmp_path / "events.jsonl")
    assert event["kind"] == "error" and event["data"]["type"] == "ValueError"
    assert "spec.json: no job spec" in event["message"] and not (tmp_path / "result.json").exists()


def test_event_lines_parse_only_with_the_prefix() -> None:
    assert parse_event_line('CALOFORGE_EVENT {"seq": 3, "kind": "log"}') == {"seq": 3, "kind": "log"}
    assert parse_event_line('{"seq": 3}') is None and parse_event_line("CALOFORGE_EVENT {torn") is None
