"""``benchmarks/distillation.py`` (the quality–speed study): the Pareto front and the goal checks on hand-made
rows, and the script end to end on a tiny budget (a real trained teacher, real consistency and bespoke
distillations, the evaluation module, ONNX export and onnxruntime timings, the adapted-model runs)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import distillation

        yield distillation
    finally:
        sys.path.remove(str(BENCH))


def _row(label: str, kind: str, nfe: int, ms: float, auc: float) -> dict:
    return {
        "label": label,
        "route": label.split()[0],
        "kind": kind,
        "nfe": nfe,
        "ms_per_shower": {"onnx_cpu1_b1": ms},
        "metrics": {"auc_high": auc},
    }


def test_front_and_goals_follow_their_definitions(bench) -> None:
    rows = [
        _row("euler 1", "teacher", 1, 1.0, 0.99),
        _row("midpoint 8", "teacher", 8, 8.0, 0.70),
        _row("heun 16", "teacher", 16, 16.0, 0.62),
        _row("heun 32", "teacher", 32, 32.0, 0.60),
        _row("euler 32", "teacher", 32, 31.0, 0.64),
        _row("cd 1", "student", 1, 1.2, 0.64),
        _row("cd 2", "student", 2, 2.5, 0.66),  # dominated by cd 1
    ]
    assert bench.pareto_front(rows) == ["euler 1", "cd 1", "heun 16", "heun 32"]
    goal = bench.goal_check(rows)
    assert goal["teacher_reference"] == "heun 32" and goal["auc_gap"] == pytest.approx(0.04)
    assert goal["auc_goal_met"]
    # equal quality: the fastest teacher row at least as good as 0.64 is heun 16 (euler 32 ties but is slower)
    assert goal["equal_quality_teacher"] == "heun 16" and goal["speedup"] == pytest.approx(16.0 / 1.2)
    assert goal["speedup_goal_met"] and not goal["speedup_lower_bound"]
    assert goal["teacher_samplers"] == ["euler", "heun", "midpoint"] and "solver_speedup" not in goal
    # a learned solver of the teacher as good as the student is shown beside the goal, not in it
    with_bns = [*rows, _row("bns 4", "solver", 4, 4.0, 0.63), _row("bns 2", "solver", 2, 2.0, 0.8)]
    goal = bench.goal_check(with_bns)
    assert goal["equal_quality_teacher"] == "heun 16" and goal["speedup"] == pytest.approx(16.0 / 1.2)
    assert goal["equal_quality_solver"] == "bns 4" and goal["solver_speedup"] == pytest.approx(4.0 / 1.2)
    # a student better than every teacher row: the speed-up against the best teacher row is a lower bound
    rows[5]["metrics"]["auc_high"] = 0.55
    goal = bench.goal_check(rows)
    assert goal["speedup_lower_bound"] and goal["speedup"] == pytest.approx(32.0 / 1.2)
    assert "status" in bench.goal_check([r for r in rows if r["kind"] == "teacher"])


def test_adapted_headline_counts_steps_to_the_scratch_runs_final_loss(bench) -> None:
    def run(name: str, steps: int, probes: list[float], wall: float, auc: float) -> dict:
        every = steps // (len(probes) - 1)
        curve = [{"step": i * every, "probe": p} for i, p in enumerate(probes)]
        return {
            "name": name,
            "steps": steps,
            "wall_s": wall,
            "curve": curve,
            "metrics_1step": {"auc_high": auc},
        }

    runs = [
        run("from-base-student", 40, [0.5, 0.3, 0.2, 0.15, 0.1], 40.0, 0.8),
        run("from-teacher", 40, [1.0, 0.6, 0.4, 0.3, 0.25], 40.0, 0.9),
        run("from-base-student-short", 10, [0.5, 0.35], 10.0, 0.85),
    ]
    head = bench.adapted_headline(runs, {"model_dir": "m", "steps": 5, "wall_s": 1.0}, {"auc_high": 0.7})
    assert head["scratch_final_probe"] == 0.25 and head["steps_to_scratch_final"] == 20
    assert head["step_ratio"] == pytest.approx(2.0) and head["wall_ratio"] == pytest.approx(2.0)
    assert not head["step_ratio_lower_bound"]
    assert head["initial_probe"] == {"from_base_student": 0.5, "from_teacher": 1.0}
    assert head["short_matches_scratch_auc"]


def test_routes_are_checked(bench) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--routes", "euler,meanflow"])
    assert bench.parse_args(["--routes", "heun, cd"]).route_list == ("heun", "cd")


def test_an_empty_layer_mode_keys_the_rows_but_not_the_teacher_or_students(bench) -> None:
    plain = bench.make_plan(bench.parse_args(["--teacher-recipe", "fidelity"]))
    plan = bench.make_plan(
        bench.parse_args(["--teacher-recipe", "fidelity", "--empty-layers", "hadron_tracks"])
    )
    assert plan.empty_layers == "hadron_tracks" and plain.empty_layers is None
    assert plan.teacher_key() == plain.teacher_key()  # the teacher and its students are reused
    row = bench.Candidate("shortcut 1", "shortcut", "student", "b", "euler", 1, 1)
    assert bench.row_key(plan, row) != bench.row_key(plain, row)
    voxel = bench.make_plan(
        bench.parse_args(["--teacher-recipe", "fidelity", "--empty-layers", "voxel_model"])
    )
    assert bench.row_key(voxel, row) not in (bench.row_key(plan, row), bench.row_key(plain, row))
    with pytest.raises(SystemExit):
        bench.parse_args(["--empty-layers", "all"])


def test_the_teacher_recipe_sets_model_and_loop_and_keys_the_teacher(bench) -> None:
    """``--teacher-recipe fidelity``: the fidelity recipe's 3x2x3 patch and logit-normal t; the data stay the
    study's; the recipe keys the teacher cache."""
    debug = bench.make_plan(bench.parse_args([]))
    fidelity = bench.make_plan(bench.parse_args(["--teacher-recipe", "fidelity"]))
    assert (debug.teacher_recipe, fidelity.teacher_recipe) == ("debug", "fidelity")
    assert bench.model_config(debug)["patch_size"] == [5, 4, 3]
    assert bench.model_config(fidelity)["patch_size"] == [3, 2, 3]
    assert bench.recipe(fidelity)[1]["objective"]["flow_matching"]["time_sampling"] == "logit_normal"
    assert fidelity.teacher_key() != debug.teacher_key()
    with pytest.raises(SystemExit):
        bench.parse_args(["--teacher-recipe", "huge"])


def test_a_voxel_model_that_reads_the_layer_energies_keys_another_teacher(bench) -> None:
    """The fidelity recipe conditions the voxel model on the layer energies: a teacher cached before that
    (same backbone) must not be reused; the debug recipe's key stays what it was."""
    from common import resolved_architecture

    fidelity = bench.make_plan(bench.parse_args(["--teacher-recipe", "fidelity"]))
    model = bench.model_config(fidelity)
    assert model["layer_energy"]["condition_voxels"] is True
    off = {**model, "layer_energy": {**model["layer_energy"], "condition_voxels": False}}
    assert resolved_architecture(model) == {**resolved_architecture(off), "layer_condition": True}
    assert "layer_condition" not in resolved_architecture(
        bench.model_config(bench.make_plan(bench.parse_args([])))
    )


def test_cd_overrides_reach_the_student_config_and_key_only_the_student(bench) -> None:
    """``--cd-set``: applied to the consistency student's config after the study's budget, part of the cd
    cache key (and of the adapted runs', which start from it), not of the teacher's; without it the key is
    the one it was before the option existed."""
    plain = bench.make_plan(bench.parse_args([]))
    distance = "objective.consistency_distillation.distance=pseudo_huber"
    huber = bench.make_plan(bench.parse_args(["--cd-set", distance, "--cd-set", "cd.target_decay=0"]))
    assert plain.cd_overrides == () and plain.cd_key() == plain.key(
        "cd_steps", "cd_batch_size", "cd_lr", teacher=plain.teacher_key()
    )
    assert huber.teacher_key() == plain.teacher_key() and huber.cd_key() != plain.cd_key()
    assert huber.shortcut_key() == plain.shortcut_key()
    config = bench.distill_config(huber, "cd", "cd-test")
    assert config.objective.consistency_distillation.distance == "pseudo_huber"
    assert config.cd.target_decay == 0.0 and config.loop.steps == huber.cd_steps
    assert bench.distill_config(plain, "cd", "cd-test").objective.consistency_distillation.distance == "l2"


def test_shortcut_overrides_reach_the_student_config_and_key_only_that_student(bench) -> None:
    """``--shortcut-set``: applied to the shortcut student's config after the study's budget (a longer run
    included), part of its cache key only; without it the key is the one it was before the option."""
    plain = bench.make_plan(bench.parse_args([]))
    long = bench.make_plan(
        bench.parse_args(
            ["--shortcut-set", "loop.steps=4000", "--shortcut-set", "shortcut.target_decay=0.99"]
        )
    )
    assert plain.shortcut_overrides == () and plain.shortcut_key() == plain.key(
        "cd_steps", "cd_batch_size", "cd_lr", method="shortcut", teacher=plain.teacher_key()
    )
    assert long.shortcut_key() != plain.shortcut_key()
    assert (long.teacher_key(), long.cd_key()) == (plain.teacher_key(), plain.cd_key())
    config = bench.distill_config(long, "shortcut", "shortcut-test")
    assert config.loop.steps == 4000 and config.shortcut.target_decay == 0.99
    plain_config = bench.distill_config(plain, "shortcut", "shortcut-test")
    assert plain_config.loop.steps == plain.cd_steps and plain_config.shortcut.target_decay is None


def test_teacher_overrides_reach_the_teacher_and_key_every_piece(bench) -> None:
    """``--teacher-set``: ``model.*`` keys change the teacher's model section (and so its resolved
    architecture), ``objective.*``/``loop.*`` keys its training config; every cache key follows the teacher
    (a new teacher has new students and rows); without it the teacher's key is the one it was before the
    option; a key outside those sections is refused."""
    from common import resolved_architecture

    plain = bench.make_plan(bench.parse_args(["--teacher-recipe", "fidelity"]))
    space = "model.layer_energy.space=log_below"
    changed = bench.make_plan(
        bench.parse_args(
            ["--teacher-recipe", "fidelity", "--teacher-set", space, "--teacher-set", "loop.optim.lr=1e-3"]
        )
    )
    assert plain.teacher_overrides == () and changed.teacher_overrides == (space, "loop.optim.lr=1e-3")
    assert bench.model_config(changed)["layer_energy"]["space"] == "log_below"
    assert bench.model_config(plain)["layer_energy"].get("space", "linear") == "linear"
    assert bench.teacher_overrides(changed, "loop") == ["loop.optim.lr=1e-3"]
    assert bench.teacher_overrides(changed, "objective") == []
    assert changed.teacher_key() != plain.teacher_key()
    assert changed.cd_key() != plain.cd_key() and changed.shortcut_key() != plain.shortcut_key()
    assert changed.bns_key() != plain.bns_key()
    before = plain.key(  # the teacher key as it was before the option: no extra field
        *bench.TEACHER_KEY_FIELDS, architecture=resolved_architecture(bench.model_config(plain))
    )
    assert plain.teacher_key() == before
    with pytest.raises(ValueError, match=r"data\.simulate\.seed=3"):
        bench.make_plan(bench.parse_args(["--teacher-set", "data.simulate.seed=3"]))
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        bench.make_plan(bench.parse_args(["--teacher-set", "model.layer_energy.space"]))


def test_classifier_seeds_reach_the_evaluation_and_key_only_the_rows(bench) -> None:
    """``--classifier-seeds``: the rows' classifiers train that many seeds; the rows' keys change, the
    teacher's and students' do not; without it the rows keep their keys; 0 is refused."""
    plain = bench.make_plan(bench.parse_args([]))
    seeded = bench.make_plan(bench.parse_args(["--classifier-seeds", "6"]))
    assert plain.classifier_seeds is None and seeded.classifier_seeds == 6
    assert bench.eval_config(1000).classifier.n_seeds == 2
    assert bench.eval_config(1000, seeded.classifier_seeds).classifier.n_seeds == 6
    assert seeded.teacher_key() == plain.teacher_key() and seeded.cd_key() == plain.cd_key()
    row = bench.Candidate("cd 1", "cd", "student", "x", "consistency", num_steps=1, nfe=1)
    assert bench.row_key(seeded, row) != bench.row_key(plain, row)
    before = plain.key("n_eval", "batch", "gpu_batches", c=dataclasses.asdict(row), t=plain.teacher_key(),
                       timing=bench.TIMING)  # fmt: skip
    assert bench.row_key(plain, row) == before
    with pytest.raises(ValueError, match="--classifier-seeds must be >= 1"):
        bench.make_plan(bench.parse_args(["--classifier-seeds", "0"]))


@pytest.mark.slow
def test_the_study_runs_end_to_end_on_a_tiny_budget(tmp_path: Path) -> None:
    out = tmp_path / "distillation.json"
    env = {
        **os.environ,
        "CALOFORGE_HOME": str(tmp_path / "home"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "ORT_DISABLE_TELEMETRY": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "distillation.py"),
            "--quick",
            "--routes",  # a teacher sampler (1 NFE is out of its reach) and every other route
            "midpoint,cd,shortcut,bns",
            "--work-dir",
            str(tmp_path / "w"),
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pareto front" in proc.stdout and "goal 1" in proc.stdout and "goal 2" in proc.stdout
    record = json.loads(out.read_text())
    # --retime: the cached row's timing again, its quality kept
    argv = proc.args
    again = subprocess.run(
        [*argv, "--routes", "cd", "--retime", "cd 1"], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cd 1: timed again" in again.stdout
    (retimed,) = json.loads(out.read_text())["rows"]
    (first,) = [r for r in record["rows"] if r["label"] == "cd 1"]
    assert retimed["metrics"] == first["metrics"] and "retimed" in retimed
    assert retimed["ms_per_shower"]["onnx_cpu1_b1"] > 0
    rows = record["rows"]
    labels = [r["label"] for r in rows]
    assert labels == ["midpoint 2", "cd 1", "shortcut 1", "bns 2"]
    for r in rows:
        for key in ("auc_high", "auc_low", "fpd", "floor/fpd", "kpd"):
            assert math.isfinite(r["metrics"][key]), (r["label"], key)
        assert 0.0 <= r["metrics"]["auc_high"] <= 1.0
        for key in ("onnx_cpu1_b1", "onnx_cpu1_b10"):
            assert math.isfinite(r["ms_per_shower"][key]) and r["ms_per_shower"][key] > 0, (r["label"], key)
        assert r["onnx"]["parity_max_rel_err"] >= 0
    assert {r["kind"] for r in rows} == {"teacher", "student", "solver"}
    by = {r["label"]: r for r in rows}
    assert [
        (by[k]["sampler"], by[k]["num_steps"]) for k in ("midpoint 2", "cd 1", "shortcut 1", "bns 2")
    ] == [
        ("midpoint", 1),
        ("consistency", 1),
        ("shortcut", 1),
        ("bespoke", 2),
    ]
    # every row on the front is non-dominated; every row off it is dominated by one on it
    pts = {r["label"]: (r["ms_per_shower"]["onnx_cpu1_b1"], r["metrics"]["auc_high"]) for r in rows}

    def dominates(a: str, b: str) -> bool:
        (xa, ya), (xb, yb) = pts[a], pts[b]
        return xa <= xb and ya <= yb and (xa < xb or ya < yb)

    front = record["front"]
    assert front and set(front) <= set(labels)
    for f in front:
        assert not any(dominates(o, f) for o in labels), f
    for other in set(labels) - set(front):
        assert any(dominates(f, other) for f in front), other
    goal = record["goal"]
    assert goal["student"] in ("cd 1", "shortcut 1") and set(goal["students"]) == {"cd 1", "shortcut 1"}
    assert math.isfinite(goal["auc_gap"]) and goal["speedup"] > 0
    assert record["distilled"]["bns"]["solvers"]["2"]["rmse_bespoke"] >= 0
    adapted = record["adapted"]
    # quick mode: no short run (its headline is the hand-made test above)
    assert [r["name"] for r in adapted["runs"]] == ["from-base-student", "from-teacher"]
    for r in adapted["runs"]:
        assert [p["step"] for p in r["curve"]] == list(range(0, r["steps"] + 1, 2))
        assert all(math.isfinite(p["probe"]) and p["probe"] >= 0 for p in r["curve"])
        assert math.isfinite(r["metrics_1step"]["auc_high"])
    assert adapted["initial_probe"]["from_teacher"] == adapted["runs"][1]["curve"][0]["probe"]
    png = Path(record["plot"])
    assert png.is_file() and png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_a_cached_student_trained_with_another_config_is_refused(bench, tmp_path: Path) -> None:
    """The cd key holds the study's settings, not configs/distill/cd.yaml: a cached student whose recorded
    config differs from what the rerun would train is refused with the keys named; how it ran (threads,
    progress) does not count, nor keys added since (at their defaults)."""
    from caloforge.config import to_dict

    plan = bench.make_plan(bench.parse_args([]))
    config = bench.distill_config(plan, "cd", "bench-cd")
    run_dir = tmp_path / "cd-0123456789"
    run_dir.mkdir()
    recorded = to_dict(config)
    recorded["torch_threads"] = 7
    del recorded["objective"]["consistency_distillation"]["moment_weight"]  # from before the option
    (run_dir / "request.json").write_text(json.dumps({"config": recorded}))
    bench.check_cached_config(run_dir, config)
    bench.check_cached_config(tmp_path / "never-started", config)
    other = bench.distill_config(
        dataclasses.replace(plan, cd_overrides=("objective.consistency_distillation.feature_weight=2",)),
        "cd",
        "bench-cd",
    )
    with pytest.raises(ValueError, match=r"cd-0123456789.*feature_weight: 0\.0 → 2\.0.*delete"):
        bench.check_cached_config(run_dir, other)


def test_retime_labels_no_row_has_are_named(bench) -> None:
    rows = [_row("cd 1", "student", 1, 5.0, 0.7), _row("heun 8", "teacher", 8, 28.0, 0.66)]
    bench.check_retime_labels(frozenset({"cd 1", "all"}), rows)
    with pytest.raises(ValueError, match=r"no row labelled \['cd 3'\] \(rows: \['cd 1', 'heun 8'\]\)"):
        bench.check_retime_labels(frozenset({"cd 3", "heun 8"}), rows)
