"""``benchmarks/adaptation.py`` (the data-efficiency study): the headline ratios on hand-made rows, and the
script end to end on a tiny budget (real simulated data, a real pretrained base, real adaptation and
scratch runs, the evaluation module)."""

from __future__ import annotations

import json
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
        import adaptation

        yield adaptation
    finally:
        sys.path.remove(str(BENCH))


def _row(kind: str, method: str, n: int, steps: int, fpd: float) -> dict:
    return {
        "kind": kind,
        "method": method,
        "n_train": n,
        "steps": steps,
        "train_flops": 3 * 10 * steps * 32,
        "metrics": {"fpd": fpd},
    }


def test_headline_ratios_follow_their_definitions(bench) -> None:
    plan = bench.make_plan(bench.parse_args(["--sizes", "100,500,2500", "--steps", "40"]))
    rows = [
        _row("scratch", "scratch", 2500, 160, 1.0),  # the best scratch model: FPD* = 1.0
        _row("scratch", "scratch", 2500, 40, 3.0),
        _row("scratch", "scratch", 100, 160, 2.0),
        _row("adapt", "full", 100, 40, 1.2),  # does not match
        _row("adapt", "bias", 500, 10, 0.9),  # matches with 500 showers and 10 steps
        _row("adapt", "full", 2500, 40, 0.5),
    ]
    head = bench.headline(rows, base_flops=1e6, plan=plan)
    assert head["status"] == "reached" and head["best_scratch"]["fpd"] == 1.0
    assert head["data_needed"] == pytest.approx(2500 / 500) and not head["data_needed_lower_bound"]
    assert head["compute_needed"] == pytest.approx(160 / 10)
    assert head["compute_run"]["method"] == "bias" and not head["compute_needed_lower_bound"]
    assert head["compute_needed_with_pretraining"] == pytest.approx(
        3 * 10 * 160 * 32 / (3 * 10 * 10 * 32 + 1e6)
    )
    assert head["best_adaptation"]["fpd"] == 0.5 and head["n_matching_runs"] == 2 and not head["goal_met"]
    # at the smallest size and budget the ratios are lower bounds; no match is "not reached"
    rows.append(_row("adapt", "embedding", 100, 10, 1.0))
    head = bench.headline(rows, base_flops=0.0, plan=plan)
    assert head["data_needed"] == pytest.approx(25) and head["data_needed_lower_bound"]
    assert head["compute_needed_lower_bound"]
    assert bench.headline(rows[:4], 0.0, plan)["status"] == "not reached"


def test_headline_within_errors_counts_runs_level_with_the_best_scratch_model(bench) -> None:
    plan = bench.make_plan(bench.parse_args(["--sizes", "100,500,2500", "--steps", "40"]))

    def row(kind: str, n: int, steps: int, fpd: float, err: float) -> dict:
        return _row(kind, "full" if kind == "adapt" else "scratch", n, steps, fpd) | {
            "metrics": {"fpd": fpd, "fpd_err": err}
        }

    rows = [
        row("scratch", 2500, 160, 468.0, 89.0),
        row("adapt", 100, 10, 611.0, 87.0),  # 143 above, combined error hypot(87, 89) = 124.5: not level
        row("adapt", 500, 10, 489.0, 71.0),  # 21 above, within hypot(71, 89) = 113.9: level
        row("adapt", 2500, 10, 478.0, 68.0),
    ]
    assert bench.headline(rows, 0.0, plan)["status"] == "not reached"  # strictly, no run is as good
    head = bench.headline(rows, 0.0, plan, within_errors=True)
    assert head["status"] == "reached" and head["n_matching_runs"] == 2
    assert head["data_needed"] == pytest.approx(2500 / 500) and not head["data_needed_lower_bound"]
    assert head["compute_needed"] == pytest.approx(160 / 10)
    # a metric whose rows carry no error matches strictly, as without the option
    bare = [_row("scratch", "scratch", 2500, 160, 1.0), _row("adapt", "full", 100, 10, 1.01)]
    assert bench.headline(bare, 0.0, plan, within_errors=True)["status"] == "not reached"
    assert bench.combined_error(rows[1], rows[0], "fpd") == pytest.approx(124.5, abs=0.1)


def test_plan_rejects_unknown_strategies_and_bad_budgets(bench) -> None:
    with pytest.raises(ValueError, match="unknown"):
        bench.make_plan(bench.parse_args(["--strategies", "full,prefix"]))
    with pytest.raises(ValueError, match="fractions"):
        bench.make_plan(bench.parse_args(["--adapt-budgets", "2"]))
    with pytest.raises(ValueError, match=r"--patch \(3, 2\): .*three ints >= 1"):
        bench.make_plan(bench.parse_args(["--patch", "3,2"]))
    with pytest.raises(ValueError, match=r"--patch \(3, 0, 3\)"):
        bench.make_plan(bench.parse_args(["--patch", "3,0,3"]))
    with pytest.raises(ValueError, match=r"--patch: integers z,phi,r .*'3,x,3'"):
        bench.make_plan(bench.parse_args(["--patch", "3,x,3"]))
    # 9 divides the pretraining meshes' 45 layers but not lar-pb-coarse's 30: refused before any training
    with pytest.raises(ValueError, match=r"detector lar-pb-coarse: mesh \(30, 16, 6\) is not divisible"):
        bench.make_plan(bench.parse_args(["--patch", "9,2,3"]))
    held_out_only = bench.make_plan(bench.parse_args(["--patch", "9,2,3", "--targets", "lar-pb"]))
    assert held_out_only.patch_size == (9, 2, 3)
    # --mesh-layers: only for the strategies that have the option, which the recipe then sets
    with pytest.raises(ValueError, match=r"--mesh-layers applies to the strategies bias and embedding"):
        bench.make_plan(bench.parse_args(["--mesh-layers"]))
    mesh = bench.make_plan(bench.parse_args(["--mesh-layers", "--strategies", "bias,embedding"]))
    assert mesh.mesh_layers and bench.adapt_config(mesh, "embedding", 8, "x").strategy.mesh_layers
    plain = bench.make_plan(bench.parse_args(["--strategies", "embedding"]))
    assert not bench.adapt_config(plain, "embedding", 8, "x").strategy.mesh_layers
    # --lora-energy-head: lora only; the recipe sets strategy.lora.energy_head
    with pytest.raises(ValueError, match=r"--lora-energy-head applies to the strategy lora"):
        bench.make_plan(bench.parse_args(["--lora-energy-head"]))
    head = bench.make_plan(bench.parse_args(["--lora-energy-head", "--strategies", "lora"]))
    assert bench.adapt_config(head, "lora", 8, "x").strategy.lora.energy_head
    assert not bench.adapt_config(plain, "lora", 8, "x").strategy.lora.energy_head


def test_an_empty_layer_mode_re_evaluates_cached_runs_without_retraining(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = bench.make_plan(bench.parse_args(["--recipe", "fidelity"]))
    plan = bench.make_plan(bench.parse_args(["--recipe", "fidelity", "--empty-layers", "hadron_tracks"]))
    assert plan.empty_layers == "hadron_tracks" and plain.empty_layers is None
    # the training caches are shared: only the evaluation differs
    assert plan.base_key() == plain.base_key() and plan.runs_key() == plain.runs_key()
    with pytest.raises(SystemExit):
        bench.parse_args(["--empty-layers", "tracks"])
    calls: list[tuple[Path, str | None]] = []

    def fake_evaluate(model_dir: Path, heldout: object, spec: object, p: object) -> dict[str, float]:
        calls.append((model_dir, p.empty_layers))  # type: ignore[attr-defined]
        return {"fpd": 2.0}

    monkeypatch.setattr(bench, "evaluate", fake_evaluate)
    record = {"kind": "adapt", "steps": 10, "metrics": {"fpd": 9.0}}
    run_dir = tmp_path / "run"
    assert bench.evaluated(run_dir, record, None, None, plain) is record  # the bundle's own mode: as recorded
    out = bench.evaluated(run_dir, record, None, None, plan)
    assert out["metrics"] == {"fpd": 2.0} and out["empty_layers"] == "hadron_tracks" and out["steps"] == 10
    assert calls == [(run_dir / "model", "hadron_tracks")] and record["metrics"] == {"fpd": 9.0}
    kept = json.loads((run_dir / "bench-empty_layers-hadron_tracks.json").read_text())
    assert kept == {"empty_layers": "hadron_tracks", "metrics": {"fpd": 2.0}}
    assert bench.evaluated(run_dir, record, None, None, plan)["metrics"] == {"fpd": 2.0}
    assert len(calls) == 1  # the second time from the file


def test_the_cpu_study_uses_the_small_patch_and_patch_is_part_of_the_base_key(bench) -> None:
    plan = bench.make_plan(bench.parse_args([]))
    assert plan.patch_size == (3, 2, 3) and plan.base_steps == 2400
    coarse = bench.make_plan(bench.parse_args(["--patch", "5,4,3"]))
    assert coarse.patch_size == (5, 4, 3)
    assert coarse.base_key() != plan.base_key() and coarse.runs_key() != plan.runs_key()
    assert bench.model_config(coarse)["patch_size"] == [5, 4, 3]
    # the position-feature limit is the model's: it keys the base, and 32 (before schema 4) can be asked for
    legacy = bench.make_plan(bench.parse_args(["--pos-max-freq", "32"]))
    assert "pos_max_freq" not in bench.model_config(plan) and bench.model_config(legacy)["pos_max_freq"] == 32
    assert legacy.base_key() != plan.base_key()
    radius = bench.make_plan(bench.parse_args(["--pos-max-freq-r", "3"]))
    assert bench.model_config(radius)["pos_max_freq_r"] == 3
    assert "pos_max_freq_r" not in bench.model_config(plan)
    assert radius.base_key() not in (plan.base_key(), legacy.base_key())
    # a second training seed: initialisation and data order change, the data do not
    seed1 = bench.make_plan(bench.parse_args(["--train-seed", "1"]))
    assert bench.model_config(seed1)["init_seed"] == 1 and "init_seed" not in bench.model_config(plan)
    assert [bench.loop_config(p, 10, {}, {})["seed"] for p in (plan, seed1)] == [0, 1]
    assert seed1.base_key() != plan.base_key() and seed1.runs_key() != plan.runs_key()
    assert seed1.key("n_heldout", "energy_gev", "seed") == plan.key("n_heldout", "energy_gev", "seed")


def test_the_fidelity_recipe_trains_base_scratch_and_adaptations_alike(bench, tmp_path: Path) -> None:
    """``--recipe fidelity``: base and scratch runs take the fidelity recipe's model (the voxel model reading
    the layer energies) and objective (logit-normal t), with the backbone's position features (made for
    moving between meshes) and the study's data and patch; the adaptations train with the same objective;
    the recipe keys the base; the debug recipe's keys stay what they were."""
    from common import train_recipe

    debug = bench.make_plan(bench.parse_args([]))
    fidelity = bench.make_plan(bench.parse_args(["--recipe", "fidelity"]))
    model = bench.model_config(fidelity)
    assert model["layer_energy"]["condition_voxels"] is True and model["patch_size"] == [3, 2, 3]
    assert "pos_max_freq" not in model and "pos_max_freq_r" not in model
    assert train_recipe("fidelity")[1]["model"]["pos_max_freq"] == 32  # the recipe's own, not taken
    assert "layer_energy" not in bench.model_config(debug)
    assert fidelity.base_key() != debug.base_key() and fidelity.runs_key() != debug.runs_key()
    assert debug.base_key() == debug.key(
        "backbone", "patch_size", "base_detectors", "base_showers", "base_steps", "batch_size",
        "energy_gev", "seed", "train_seed", model=bench.model_config(debug),
        architecture=bench.resolved_architecture(bench.model_config(debug)),
    )  # fmt: skip
    scratch = bench.scratch_config(fidelity, tmp_path, 10, "scratch-test")
    assert scratch.objective.flow_matching.time_sampling == "logit_normal"
    assert scratch.model.layer_energy.condition_voxels and scratch.loop.steps == 10
    assert bench.scratch_config(debug, tmp_path, 10, "x").objective.flow_matching.time_sampling == "uniform"
    adapt = bench.adapt_config(fidelity, "lora", 10, "lora-test")
    assert adapt.objective.flow_matching.time_sampling == "logit_normal"
    assert bench.adapt_config(debug, "lora", 10, "x").objective.flow_matching.time_sampling == "uniform"
    with pytest.raises(SystemExit):
        bench.parse_args(["--recipe", "huge"])


def test_user_defined_targets_are_written_from_lar_pb(bench, tmp_path: Path) -> None:
    from caloforge.platform.geometry import load_detector
    from caloforge.platform.transfer import place_mesh

    plan = bench.make_plan(bench.parse_args(["--targets", "lar-pb-thick,lar-pb-coarse"]))
    assert plan.targets == ("lar-pb-thick", "lar-pb-coarse")
    with pytest.raises(ValueError, match=r"--targets: unknown \['lar-pb-fine'\]"):
        bench.make_plan(bench.parse_args(["--targets", "lar-pb-fine"]))
    lar_pb = load_detector("lar-pb")
    thick = load_detector(bench.detector_arg(tmp_path, "lar-pb-thick"))
    coarse = load_detector(bench.detector_arg(tmp_path, "lar-pb-coarse"))
    assert thick.geometry.shape == (30, 16, 9) and thick.geometry.r_edges_mm == lar_pb.geometry.r_edges_mm
    assert coarse.geometry.shape == (30, 16, 6) and coarse.absorber == lar_pb.absorber
    # thick's layers are deeper than any pretraining detector's pitch allows: scaled physically, its
    # depth tokens fall between the base's (coarse's sit on them)
    sources = [load_detector(d) for d in plan.base_detectors]
    assert thick.depth_x0 / 30 > max(d.depth_x0 for d in sources) / 45
    pitch = {}  # of the 10 depth tokens (patch 3 on 30 layers) in the base's position frame
    for name, spec in (("thick", thick), ("coarse", coarse)):
        (extent_z, _), frame, _ = place_mesh(None, 45, spec, sources)
        assert frame is not None
        pitch[name] = extent_z / 10
    assert pitch["coarse"] == pytest.approx(1 / 15)  # the base's 15 depth tokens
    assert pitch["thick"] == pytest.approx(0.0948, abs=1e-3)


@pytest.mark.slow
def test_the_study_runs_end_to_end_on_a_tiny_budget(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {**os.environ, "CALOFORGE_HOME": str(tmp_path / "home"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    args = [
        "--quick",
        "--strategies",
        "full,embedding",
        "--work-dir",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "adaptation.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "headline" in proc.stdout
    record = json.loads(out.read_text())
    rows = record["rows"]
    # per target: 2 strategies at S, scratch at 1x and 4x S, all on 40 showers
    assert len(rows) == 8 and {r["target"] for r in rows} == {"lar-pb", "lar-pb-coarse"}
    for r in rows:
        m = r["metrics"]
        for key in ("fpd", "floor/fpd", "kpd", "floor/kpd", "auc_high", "auc_low", "response/scale"):
            assert key in m, key
        # the high-level AUC of each particle alone, without a classifier floor (floor_metrics: fpd, kpd)
        assert all(0.0 <= m[f"group/{p}/auc_high"] <= 1.0 for p in ("e-", "piplus"))
        assert not any(k.startswith("floor/group/") for k in m)
        assert r["train_flops"] == 3 * r["forward_flops_per_shower"] * r["steps"] * 8
        assert r["wall_s"] > 0 and r["n_train"] == 40
    by = {(r["target"], r["method"], r["steps"]): r for r in rows}
    assert by[("lar-pb", "scratch", 16)]["train_flops"] == 4 * by[("lar-pb", "scratch", 4)]["train_flops"]
    emb, full = by[("lar-pb", "embedding", 4)], by[("lar-pb", "full", 4)]
    assert emb["trainable_parameters"] == 64 and full["trainable_parameters"] == full["total_parameters"]
    # the user-defined detector's mesh (30 x 16 x 6) has fewer tokens than lar-pb's 45 x 16 x 9
    coarse = by[("lar-pb-coarse", "full", 4)]
    assert coarse["forward_flops_per_shower"] < full["forward_flops_per_shower"]
    # every run of a target is evaluated on the same held-out showers: the same floor
    for target in ("lar-pb", "lar-pb-coarse"):
        floors = {r["metrics"]["floor/fpd"] for r in rows if r["target"] == target}
        assert len(floors) == 1
    assert set(record["headline"]) == {"lar-pb", "lar-pb-coarse"}
    within = record["headline_within_errors"]
    assert set(within) == {"lar-pb", "lar-pb-coarse"}
    assert all(set(by) == {"fpd", "kpd", "auc_high", "auc_low"} for by in within.values())
    assert "within errors" in proc.stdout
    assert record["base"]["detectors"] == ["par04-siw", "pbwo4"] and record["base"]["train_flops"] > 0
    assert all(Path(p).is_file() for p in record["plots"])
    # one plot per headline quality against data and against compute
    qualities, axes = ("fpd", "kpd", "auc_high", "auc_low"), ("data", "compute")
    assert sorted(Path(p).name for p in record["plots"]) == sorted(
        f"adaptation_{q}_vs_{x}.png" for q in qualities for x in axes
    )
    assert (tmp_path / "work" / "detectors" / "lar-pb-coarse.yaml").is_file()
