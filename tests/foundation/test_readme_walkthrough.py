"""README.md, "The CLI": the walkthrough's commands run as written, in order, on a fresh working directory.

The ```bash block under ``## The CLI`` is parsed (backslash continuations joined, comments and blank lines
skipped) and every command runs through the real CLI (``caloforge.cli.main``, in this process: one import of
torch/Ray/MLflow instead of one per command) in a temporary working directory holding a copy of ``configs/``,
with ``CALOFORGE_HOME`` (./caloforge-home, the README's default) and ``MLFLOW_TRACKING_URI`` (a sqlite file)
inside it. Only sizes change: ``TINY`` appends arguments to each command, keyed by its leading words (later
``--n``/``--steps``/``--set`` win over the README's). A README command that no row covers fails the test, so
a new step (``caloforge adapt ...``) needs a row here: add ``Tiny(("adapt",), (...))``.

The block under ``## Requesting an adaptation from the service`` runs next, on the state the first left (the
champion base, the lar-pb shards). Its shell forms are played by ``ServiceBlock``: ``[export ]VAR=$(caloforge
...)`` runs the command and keeps its output in ``VAR`` (``"$VAR"`` in later commands), ``caloforge serve &``
starts a real ``caloforge serve`` subprocess, ``until curl -sf URL ...`` polls the URL, ``kill %1`` stops the
service (and the test then stops the Ray head it left, as the README says it stays). Port 8080 becomes a
free port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from caloforge.cli import main
from caloforge.environment import free_port

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SECTION = "## The CLI"
SERVICE_SECTION = "## Requesting an adaptation from the service"


@dataclass(frozen=True)
class Tiny:
    """Arguments appended to every README command whose words after ``caloforge`` start with ``lead``."""

    lead: tuple[str, ...]
    extra: tuple[str, ...] = ()
    having: tuple[str, ...] = ()  # only for commands that also hold these words (e.g. "--resume")

    def matches(self, args: list[str]) -> bool:
        return tuple(args[: len(self.lead)]) == self.lead and all(w in args for w in self.having)

    @property
    def specificity(self) -> int:
        return len(self.lead) + len(self.having)


def sets(*overrides: str) -> tuple[str, ...]:
    """``--set`` arguments: ``sets("a=1", "b=2")`` → ``("--set", "a=1", "--set", "b=2")``."""
    return tuple(word for kv in overrides for word in ("--set", kv))


# Tiny sizes that keep each step valid: 4 detectors × 3 particles at 160 showers per detector give every
# detector several train shards (2 Ray workers need disjoint ones) and test showers enough for the
# evaluation's data-vs-data floor and classifier splits. Models: one Euler step for the showers and for the
# layer-energy head (the ONNX graphs unroll them); exports with the legacy exporter (seconds, not a minute;
# the default dynamo exporter is covered by tests/registry).
_MODEL = sets(
    "model.sampler=euler",
    "model.num_steps=1",
    "model.layer_energy.depth=1",
    "model.layer_energy.sampler=euler",
    "model.layer_energy.num_steps=1",
)
_PRETRAIN = _MODEL + sets(
    "loop.steps=2",
    "loop.batch_size=8",
    "loop.log_every=1",
    "loop.checkpoint_every=2",
    "data.stream.shuffle_buffer=8",
    "validation.enabled=false",
)
_EXPORT = ("--steps", "1", "--exporter", "legacy", "--gate-config", "configs/export/fidelity_gate_ci.yaml")
_ADAPT = sets(
    "loop.steps=2",
    "loop.batch_size=8",
    "loop.log_every=1",
    "loop.checkpoint_every=2",
    "stream.shuffle_buffer=8",
    "eval.n_showers=20",
    "eval.metrics.classifier.epochs=1",
    "eval.metrics.classifier.n_seeds=1",
    "eval.metrics.fpd.min_samples=10",
    "eval.metrics.fpd.max_samples=10",
    "eval.metrics.kpd.batch_size=10",
    "eval.metrics.plots.enabled=false",
    "progress=false",
)
TINY: tuple[Tiny, ...] = (
    Tiny(("data", "simulate"), ("--n", "160", "--no-progress")),
    # the adaptation target: enough held-out showers for its evaluation (>= 20 test showers)
    Tiny(("data", "simulate"), ("--n", "300", "--no-progress"), having=("lar-pb",)),
    Tiny(("data", "shard"), sets("shards.showers_per_shard=16")),
    Tiny(("data", "inspect")),
    Tiny(
        ("train",),
        _MODEL
        + sets(
            "data.simulate.n_per_detector=40",
            "data.simulate.shards.showers_per_shard=20",
            "loop.steps=2",
            "loop.batch_size=8",
            "loop.checkpoint_every=2",
            "eval.every=0",
        ),
    ),
    Tiny(("pretrain",), _PRETRAIN),
    Tiny(("pretrain",), _PRETRAIN + sets("loop.steps=3"), having=("--resume",)),  # train longer: 2 → 3
    Tiny(
        ("evaluate",),
        (
            *("--n", "24", "--config", "configs/eval/ci.yaml"),
            *sets("classifier.epochs=1", "classifier.n_seeds=1", "plots.enabled=false"),
        ),
    ),
    Tiny(("registry", "list")),
    Tiny(("registry", "show")),
    Tiny(("registry", "promote")),
    Tiny(("registry", "pull"), _EXPORT),
    Tiny(("export",), _EXPORT),
    Tiny(("adapt",), _ADAPT),
    # the service block: the request's hyper-parameters are the same --set overrides
    Tiny(("serve", "token", "create")),
    Tiny(("serve",), sets("poll_interval_s=0.5")),
    Tiny(("serve", "stop-head")),
    Tiny(("adapt", "submit"), _ADAPT),
    Tiny(("adapt", "events")),
    Tiny(("adapt", "wait"), ("--timeout", "900")),
)


def readme_commands(text: str, section: str = SECTION) -> list[str]:
    """The shell commands of the first ```bash block after ``section``: continuations joined, comments and
    blank lines dropped."""
    start = text.index(section)
    match = re.search(r"^```bash\n(.*?)^```", text[start:], flags=re.S | re.M)
    if match is None:
        raise ValueError(f"{README}: no ```bash block under {section!r}")
    commands: list[str] = []
    pending = ""
    for line in match.group(1).splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        commands.append(pending + stripped)
        pending = ""
    if pending:
        raise ValueError(f"{README}: a continuation line ends the block: {pending!r}")
    return commands


def tiny_argv(command: str) -> list[str]:
    """The command's arguments (after ``caloforge``) with the matching ``TINY`` row appended."""
    words = shlex.split(command, comments=True)
    assert words and words[0] == "caloforge", f"README command does not start with caloforge: {command!r}"
    args = words[1:]
    rows = [row for row in TINY if row.matches(args)]
    assert rows, (
        f"README command {command!r} has no row in TINY (tests/foundation/test_readme_walkthrough.py)"
    )
    return args + list(max(rows, key=lambda r: r.specificity).extra)


_CAPTURE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=\$\((caloforge\s.*)\)$")
_UNTIL_CURL = re.compile(r"^until curl -sf (\S+) > /dev/null; do sleep 1; done$")


def service_steps(commands: list[str]) -> list[tuple[str, str, str]]:
    """(kind, variable or URL, command) of each line of the service block: ``capture``, ``background``,
    ``wait_http``, ``kill`` or ``run``; any other shell form is a ValueError (teach ``ServiceBlock`` it)."""
    steps = []
    for command in commands:
        line = command.split(" #", 1)[0].strip()
        if m := _CAPTURE.match(line):
            steps.append(("capture", m.group(1), m.group(2)))
        elif line.startswith("caloforge ") and line.endswith(" &"):
            steps.append(("background", "", line[:-2].strip()))
        elif m := _UNTIL_CURL.match(line):
            steps.append(("wait_http", m.group(1), ""))
        elif line == "kill %1":
            steps.append(("kill", "", ""))
        elif line.startswith("caloforge "):
            steps.append(("run", "", line))
        else:
            raise ValueError(f"{README}: the service block has a line the test cannot play: {command!r}")
    return steps


@dataclass
class ServiceBlock:
    """Plays the service block (module docstring); ``close()`` stops what it started."""

    cwd: Path
    port: int = field(default_factory=free_port)
    variables: dict[str, str] = field(default_factory=dict)
    server: subprocess.Popen | None = None

    def command(self, command: str) -> list[str]:
        command = command.replace("127.0.0.1:8080", f"127.0.0.1:{self.port}")
        argv = tiny_argv(command)
        return [self.variables.get(w[1:], w) if w.startswith("$") else w for w in argv]

    def start(self, command: str, log: Path) -> None:
        argv = [*self.command(command), "--port", str(self.port)]
        with log.open("w") as out:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "caloforge.cli", *argv],
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_http(self, url: str, log: Path, timeout_s: float = 600.0) -> None:
        url = url.replace("127.0.0.1:8080", f"127.0.0.1:{self.port}")
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.server is not None and self.server.poll() is None, log.read_text()[-5000:]
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (
                f"{url} not ready after {timeout_s} s\n{log.read_text()[-5000:]}"
            )
            time.sleep(1.0)

    def kill(self) -> int:
        assert self.server is not None
        self.server.send_signal(signal.SIGTERM)
        return self.server.wait(60)

    def close(self, home: Path) -> None:
        from caloforge.adapt.service.embedded import EmbeddedService

        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait(30)
        EmbeddedService.stop_leftovers(home)  # the Ray head the service started (it outlives the service)


def test_readme_commands_parse() -> None:
    text = "## The CLI\n\n```bash\n# c\ncaloforge a \\\n    --b 1\n\ncaloforge c  # d\n```\n```bash\nx\n```\n"
    assert readme_commands(text) == ["caloforge a --b 1", "caloforge c  # d"]
    commands = readme_commands(README.read_text())
    assert len(commands) >= 8
    for command in commands:
        tiny_argv(command)  # every command is covered by a TINY row
    steps = service_steps(readme_commands(README.read_text(), SERVICE_SECTION))
    assert [kind for kind, _, _ in steps] == [
        "capture",
        "background",
        "wait_http",
        "capture",
        "run",
        "run",
        "run",
        "kill",
        "run",
    ]
    block = ServiceBlock(Path("."), port=1234)
    for _, _, command in steps:
        if command:
            block.command(command)  # covered by a TINY row
    assert "http://127.0.0.1:1234" in block.command(steps[3][2])


@pytest.mark.slow
def test_readme_walkthrough_runs_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CALOFORGE_HOME", str(tmp_path / "caloforge-home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Ray workers import caloforge from this checkout whatever the installed copy is
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    outputs: dict[str, str] = {}
    for command in readme_commands(README.read_text()):
        argv = tiny_argv(command)
        t0 = time.perf_counter()
        rc = main(argv)
        out = capsys.readouterr()
        assert rc == 0, (
            f"README command failed (rc {rc}, {time.perf_counter() - t0:.1f} s): {command}\n  ran: {argv}\n"
            f"{out.out}\n{out.err}"
        )
        outputs[" ".join(argv[:2])] = out.out

    home = tmp_path / "caloforge-home"
    block = ServiceBlock(tmp_path)
    log = tmp_path / "serve.log"
    t_service = time.perf_counter()
    try:
        for kind, name, command in service_steps(readme_commands(README.read_text(), SERVICE_SECTION)):
            if kind == "background":
                block.start(command, log)
            elif kind == "wait_http":
                block.wait_http(name, log)
            elif kind == "kill":
                assert block.kill() in (0, -signal.SIGTERM), log.read_text()[-5000:]
            else:
                argv = block.command(command)
                rc = main(argv)
                out = capsys.readouterr()
                assert rc == 0, (
                    f"README command failed (rc {rc}): {command}\n  ran: {argv}\n{out.out}\n{out.err}"
                )
                outputs[" ".join(argv[:2])] = out.out
                if kind == "capture":
                    block.variables[name] = out.out.strip()
                    monkeypatch.setenv(name, out.out.strip())
    finally:
        block.close(home)
    print(f"service block: {time.perf_counter() - t_service:.0f} s")

    assert (home / "data" / "shards" / "pretrain-4det" / "manifest.json").is_file()
    assert (home / "runs" / "train-debug" / "model" / "config.json").is_file()
    assert (home / "runs" / "debug" / "bundle" / "config.json").is_file()
    assert json.loads((home / "runs" / "debug" / "final_metrics.json").read_text())["step"] == 3  # resumed
    assert "@candidate=v2" in outputs["registry list"]  # both pretraining runs registered a version
    assert "is now @champion" in outputs["registry promote"]
    assert next(tmp_path.glob("reports/*/report.json")).is_file()
    for out_dir in ("pulled", "exported"):
        assert (tmp_path / out_dir / "model.onnx").is_file()
    card = json.loads((tmp_path / "pulled" / "model_card.json").read_text())
    assert "champion" in json.dumps(card["registry"]["promotions"])
    # the adaptation: a version of caloforge-lar-pb, child of the promoted base version, pulled as ONNX
    assert "caloforge-lar-pb/1" in outputs["adapt --base"]
    adapted = json.loads((tmp_path / "pulled-lar-pb" / "model_card.json").read_text())
    assert adapted["model"]["kind"] == "adapted" and (tmp_path / "pulled-lar-pb" / "model.onnx").is_file()
    assert adapted["lineage"]["parent_uri"] == "models:/caloforge-base/2"
    assert adapted["lineage"]["strategy"] == "lora" and adapted["lineage"]["target_detector"] == "lar-pb"
    # the service block: a job that succeeded and registered caloforge-lar-pb version 2, pulled as ONNX
    job = block.variables["JOB"]
    assert job.startswith("adapt-") and "succeeded" in outputs["adapt wait"]
    assert "[register]" in outputs["adapt events"] and "caloforge-lar-pb/2" in outputs["adapt wait"]
    served = json.loads((tmp_path / "pulled-lar-pb-service" / "model_card.json").read_text())
    assert (
        served["registry"]["tags"]["caloforge.service_job"] == job and served["lineage"]["strategy"] == "lora"
    )
    assert "stopped the service's Ray head" in outputs["serve stop-head"]  # by the README's last line
    assert not (home / "service" / "ray-head.json").exists()
