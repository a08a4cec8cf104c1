"""The one loop on a real tiny network and a real in-memory stream: accumulation equivalence, resume
equivalence (weights, EMA, optimizer, scheduler, stream, RNG), hooks, metrics and input errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import InMemoryStream, TinyDenoiser, denoise_loss, deterministic_loss, make_showers

from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig, ScheduleConfig
from caloforge.training.hooks import ConsoleProgress, Hook, MetricsWriter, PeriodicEval, read_metrics
from caloforge.training.loop import Trainer, derive_seed
from caloforge.training.state import CheckpointManager
from caloforge.training.torch_backend import TorchBackend

SHOWERS, COND = make_showers(96, seed=1)


def _config(**kw) -> LoopConfig:
    base = dict(
        steps=8,
        batch_size=8,
        grad_accum=2,
        max_grad_norm=1.0,
        log_every=2,
        seed=3,
        optim=OptimConfig(lr=3e-3),
        schedule=ScheduleConfig(kind="wsd", warmup_frac=0.25, stable_frac=0.25),
        ema=EMAConfig(decay=0.9),
    )
    base.update(kw)
    return LoopConfig(**base)


def _trainer(cfg: LoopConfig, run_dir=None, hooks=(), loss=denoise_loss, dropout=0.1, **kw) -> Trainer:
    torch.manual_seed(0)  # the process's global RNGs at the start of a run (dropout uses torch's)
    random.seed(0)
    np.random.seed(0)
    model = TinyDenoiser(dropout=dropout)
    stream = InMemoryStream(SHOWERS, COND, cfg.micro_batch_size(), seed=5)
    checkpoints = CheckpointManager(Path(run_dir) / "checkpoints") if run_dir is not None else None
    return Trainer(model, loss, TorchBackend("cpu"), stream, cfg, hooks=hooks, checkpoints=checkpoints, **kw)


def test_derive_seed_is_stable_and_distinct() -> None:
    assert derive_seed(0, 1, 0, 0, 0) == derive_seed(0, 1, 0, 0, 0)
    seeds = {
        derive_seed(s, 1, r, st, m) for s in range(2) for r in range(2) for st in range(3) for m in range(2)
    }
    assert len(seeds) == 24 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError):
        derive_seed(-1)


def test_grad_accumulation_equals_one_big_batch() -> None:
    cfg_accum = _config(grad_accum=2, batch_size=8)
    cfg_big = _config(grad_accum=1, batch_size=8)
    a = _trainer(cfg_accum, loss=deterministic_loss, dropout=0.0)
    b = _trainer(cfg_big, loss=deterministic_loss, dropout=0.0)
    assert a.micro_batch_size == 4 and b.micro_batch_size == 8
    ra, rb = a.fit(), b.fit()
    for (n, pa), pb in zip(a.backend.model.named_parameters(), b.backend.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=n)
    for n in a.ema.shadow:
        torch.testing.assert_close(a.ema.shadow[n], b.ema.shadow[n], rtol=0, atol=1e-6)
    assert [r["loss"] for r in ra.history] == pytest.approx([r["loss"] for r in rb.history], abs=1e-6)


def _snapshot(trainer: Trainer) -> dict:
    backend = trainer.backend
    return {
        "params": {n: p.detach().clone() for n, p in backend.model.named_parameters()},
        "ema": {n: s.clone() for n, s in trainer.ema.shadow.items()},
        "ema_updates": trainer.ema.num_updates,
        "optim": backend.optimizer.state_dict(),
        "sched": backend.scheduler.state_dict(),
        "stream": (trainer.stream.epoch, trainer.stream.index),
        "next_batch": next(iter(trainer.stream)).showers_BZPR.clone(),
        "rng": (random.random(), float(np.random.random()), float(torch.rand(()))),
        "gen": trainer.generator.get_state().clone(),
    }


def _assert_same(x: dict, y: dict) -> None:
    for n in x["params"]:
        assert torch.equal(x["params"][n], y["params"][n]), n
    for n in x["ema"]:
        assert torch.equal(x["ema"][n], y["ema"][n]), n
    assert x["ema_updates"] == y["ema_updates"]
    for k, sx in x["optim"]["state"].items():
        sy = y["optim"]["state"][k]
        for f in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sx[f], sy[f]), (k, f)
    assert x["sched"] == y["sched"]
    assert x["stream"] == y["stream"]
    assert torch.equal(x["next_batch"], y["next_batch"])
    assert x["rng"] == y["rng"]
    assert torch.equal(x["gen"], y["gen"])


def test_resume_is_bitwise_identical(tmp_path) -> None:
    cfg = _config(steps=8, checkpoint_every=0)
    straight = _trainer(cfg)
    straight.fit()
    reference = _snapshot(straight)

    first = _trainer(cfg, run_dir=tmp_path)
    res = first.fit(max_steps=4)
    assert res.step == 4 and res.checkpoint == tmp_path / "checkpoints" / "step_00000004"
    # garble this process's global RNGs: the resumed run must restore them from the checkpoint
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    second = _trainer(cfg, run_dir=tmp_path)
    res2 = second.fit()
    assert res2.resumed_from == tmp_path / "checkpoints" / "step_00000004"
    assert res2.step == 8 and second.samples_seen == 8 * cfg.batch_size
    _assert_same(reference, _snapshot(second))
    # a finished run resumes to the end and does nothing more
    third = _trainer(cfg, run_dir=tmp_path)
    res3 = third.fit()
    assert res3.step == 8 and res3.history == [] and res3.resumed_from.name == "step_00000008"


def test_loss_decreases_and_metrics_are_logged(tmp_path) -> None:
    cfg = _config(steps=60, batch_size=16, grad_accum=1, log_every=10, optim=OptimConfig(lr=1e-2))
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    trainer = _trainer(cfg, hooks=[writer], dropout=0.0)
    result = trainer.fit()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 10, 20, 30, 40, 50, 60]
    assert rows == result.history
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert all(r["samples_per_s"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert rows[-1]["samples_seen"] == 60 * 16 and rows[-1]["skipped_updates"] == 0
    assert rows[-1]["ema_decay"] == pytest.approx(min(0.9, 60 / 69))


def test_metrics_file_is_cut_back_to_the_resumed_step(tmp_path) -> None:
    cfg = _config(steps=8, checkpoint_every=4, log_every=1)
    first = _trainer(cfg, run_dir=tmp_path, hooks=[MetricsWriter(tmp_path / "metrics.jsonl")])
    first.fit(max_steps=6)  # checkpoints at 4 and (at the stop) 6
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    # pretend the run died after step 6 but before its checkpoint: go back to the step-4 one
    import shutil

    shutil.rmtree(ckpt / "step_00000006")
    (ckpt / "latest").unlink()
    second = _trainer(cfg, run_dir=tmp_path, hooks=[MetricsWriter(tmp_path / "metrics.jsonl")])
    second.fit()
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 9))


class _Recorder(Hook):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_train_start(self, trainer: Trainer) -> None:
        self.calls.append(("start", trainer.step))

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.calls.append(("step", step, sorted(k for k in metrics if k.startswith("eval/"))))

    def on_checkpoint(self, step: int, path) -> None:
        self.calls.append(("checkpoint", step, path.name))

    def on_train_end(self, step: int, metrics: dict[str, float]) -> None:
        self.calls.append(("end", step))


def test_hooks_eval_on_ema_weights_without_perturbing_training(tmp_path) -> None:
    cfg = _config(steps=4, grad_accum=1, checkpoint_every=2)
    seen: list[torch.Tensor] = []

    def evaluation(model: torch.nn.Module) -> dict[str, float]:
        assert not model.training
        seen.append(model.out.weight.detach().clone())
        torch.rand(100)  # consumes the global RNG; the loop must restore it
        np.random.random(10)
        return {"weight_norm": float(model.out.weight.detach().norm())}

    recorder = _Recorder()
    trainer = _trainer(cfg, run_dir=tmp_path, hooks=[PeriodicEval(2, evaluation), recorder])
    row2 = next(r for r in trainer.fit().history if r["step"] == 2)
    # Periodic checkpoints are the loop's: saved after the step's hooks ran.
    assert recorder.calls == [
        ("start", 0),
        ("step", 1, []),
        ("step", 2, ["eval/weight_norm"]),
        ("checkpoint", 2, "step_00000002"),
        ("step", 3, []),
        ("step", 4, ["eval/weight_norm"]),
        ("checkpoint", 4, "step_00000004"),
        ("end", 4),
    ]
    # ... so the step's metrics, including what hooks added, reach the checkpoint manager explicitly.
    meta = json.loads((tmp_path / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["metrics"]["loss"] == pytest.approx(row2["loss"])
    assert meta["metrics"]["eval/weight_norm"] == pytest.approx(row2["eval/weight_norm"])
    assert torch.equal(seen[-1], trainer.ema.shadow["out.weight"])  # evaluated with the EMA weights
    assert trainer.backend.model.training
    plain = _trainer(cfg)
    plain.fit()
    for pa, pb in zip(trainer.backend.model.parameters(), plain.backend.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    averaged = trainer.averaged_model()
    assert not averaged.training and torch.equal(averaged.out.weight, trainer.ema.shadow["out.weight"])


def test_input_errors(tmp_path) -> None:
    cfg = _config()
    model = TinyDenoiser()
    wrong = InMemoryStream(SHOWERS, COND, batch_size=3)
    with pytest.raises(ValueError, match="batch_size=4"):
        Trainer(model, denoise_loss, TorchBackend("cpu"), wrong, cfg).fit()

    def mean_loss(module, batch, generator, ctx):
        return denoise_loss(module, batch, generator).mean()

    with pytest.raises(ValueError, match=r"per-sample losses of shape \(4,\)"):
        _trainer(cfg, loss=mean_loss).fit()
    finite = [b for b, _ in zip(InMemoryStream(SHOWERS, COND, 4), range(3), strict=False)]
    with pytest.raises(ValueError, match="stream ended at step 1"):
        Trainer(TinyDenoiser(), denoise_loss, TorchBackend("cpu"), finite, cfg).fit()
    with pytest.raises(ValueError, match="state_dict"):
        Trainer(
            TinyDenoiser(),
            denoise_loss,
            TorchBackend("cpu"),
            finite,
            cfg,
            checkpoints=CheckpointManager(tmp_path / "checkpoints"),
        )


@pytest.mark.parametrize("fused", [False, True])
def test_skipped_updates_are_counted_at_log_steps_and_in_checkpoints(tmp_path, fused: bool) -> None:
    """Steps whose loss is NaN are skipped by the backend (host-side, or on the device with fused AdamW);
    the loop folds the flags into ``skipped_updates`` at log steps and before saving a checkpoint."""
    poisoned = {3, 4, 7}

    def loss_fn(module, batch, generator, ctx):
        loss_B = denoise_loss(module, batch, generator, ctx)
        return loss_B * float("nan") if trainer.step + 1 in poisoned else loss_B

    cfg = _config(steps=8, batch_size=8, grad_accum=1, log_every=4)
    torch.manual_seed(0)
    stream = InMemoryStream(SHOWERS, COND, cfg.micro_batch_size(), seed=5)
    backend = TorchBackend("cpu", fused_adamw=fused)
    checkpoints = CheckpointManager(tmp_path / "checkpoints")
    trainer = Trainer(TinyDenoiser(dropout=0.0), loss_fn, backend, stream, cfg, checkpoints=checkpoints)
    rows = trainer.fit().history
    assert [(r["step"], r["skipped_updates"]) for r in rows] == [(1, 0), (4, 2), (8, 3)]
    assert trainer.train_state().extra["skipped_updates"] == 3


def test_loss_context_carries_step_teacher_and_target_network(tmp_path) -> None:
    """The loss sees the update index, a frozen teacher on the backend's device and the target network
    θ⁻ ← μ θ⁻ + (1 − μ) θ; θ⁻ is checkpointed, so a resumed run continues with the same one."""
    cfg = _config(steps=6, grad_accum=1, checkpoint_every=0)
    teacher = TinyDenoiser(dropout=0.0)
    seen: list[tuple[int, bool, bool]] = []

    def distill_like(module, batch, generator, ctx):
        assert ctx.teacher is teacher and ctx.device == torch.device("cpu")
        seen.append((ctx.step, ctx.teacher.training, ctx.target.training))
        with torch.no_grad():
            _ = ctx.teacher.out.weight.sum() + ctx.target.out.weight.sum()
        return denoise_loss(module, batch, generator, ctx)

    trainer = _trainer(cfg, loss=distill_like, dropout=0.0, teacher=teacher, target_decay=0.5)
    assert all(not p.requires_grad for p in teacher.parameters())
    start = {n: p.detach().clone() for n, p in trainer.backend.model.named_parameters()}
    expected = dict(start)
    weights_after: list[dict[str, torch.Tensor]] = []

    class _Follow(Hook):
        def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
            weights_after.append({n: p.detach().clone() for n, p in trainer.backend.model.named_parameters()})

    trainer.hooks.append(_Follow())
    trainer.fit()
    assert [s for s, _, _ in seen] == list(range(6)) and not any(t or g for _, t, g in seen)
    for current in weights_after:
        expected = {n: torch.lerp(expected[n], current[n], 0.5) for n in expected}
    for n, p in trainer.target.module.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=0, atol=1e-7, msg=n)
        assert not p.requires_grad

    straight = _trainer(cfg, loss=distill_like, dropout=0.0, teacher=teacher, target_decay=0.5)
    straight.fit()
    first = _trainer(cfg, run_dir=tmp_path, loss=distill_like, dropout=0.0, teacher=teacher, target_decay=0.5)
    first.fit(max_steps=3)
    second = _trainer(
        cfg, run_dir=tmp_path, loss=distill_like, dropout=0.0, teacher=teacher, target_decay=0.5
    )
    second.fit()
    for (n, a), b in zip(
        straight.target.module.named_parameters(), second.target.module.parameters(), strict=True
    ):
        assert torch.equal(a, b), n
    without = _trainer(cfg, run_dir=tmp_path, loss=distill_like, dropout=0.0, teacher=teacher)
    with pytest.raises(ValueError, match="target"):
        without.fit()  # a run without θ⁻ cannot pretend to resume one that had it (and vice versa)


def test_consecutive_skipped_updates_stop_the_run_with_a_clear_error(tmp_path) -> None:
    """NaN from step 3 on: updates are skipped, and after ``max_consecutive_skipped`` in a row the run
    stops at the next log step instead of skipping forever; isolated skips never stop it."""

    def loss_fn(module, batch, generator, ctx):
        loss_B = denoise_loss(module, batch, generator, ctx)
        return loss_B * float("nan") if trainer.step + 1 >= 3 else loss_B

    cfg = dataclasses.replace(
        _config(steps=20, batch_size=8, grad_accum=1, log_every=2), max_consecutive_skipped=4
    )
    torch.manual_seed(0)
    stream = InMemoryStream(SHOWERS, COND, cfg.micro_batch_size(), seed=5)
    trainer = Trainer(TinyDenoiser(dropout=0.0), loss_fn, TorchBackend("cpu"), stream, cfg)
    with pytest.raises(FloatingPointError, match=r"4 consecutive optimizer updates were skipped .* step 6"):
        trainer.fit()
    assert trainer.step == 6 and trainer.skipped_updates == 4
    with pytest.raises(ValueError, match="max_consecutive_skipped"):
        dataclasses.replace(cfg, max_consecutive_skipped=-1)


def test_recorded_loss_terms_are_logged_as_window_means(tmp_path, caplog) -> None:
    """What a loss records (``LossContext.record``) reaches the metrics as ``loss/<name>``: the mean over the
    micro-batches and the log window's steps, unweighted, beside the total; the log line names them."""
    cfg = _config(steps=4, grad_accum=2, log_every=2)

    def with_terms(module, batch, generator, ctx):
        loss_B = denoise_loss(module, batch, generator, ctx)
        ctx.record("fit", loss_B)
        ctx.record("clock", torch.full_like(loss_B, float(ctx.step)))  # 0, 1, 2, 3 by update
        ctx.record("scalar", torch.tensor(2.0))
        return loss_B + 0.0 * loss_B.detach()

    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    trainer = _trainer(cfg, hooks=[writer, ConsoleProgress(enabled=False)], loss=with_terms, dropout=0.0)
    with caplog.at_level(logging.INFO, logger="caloforge.training"):
        result = trainer.fit()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == result.history and [r["step"] for r in rows] == [1, 2, 4]
    assert re.search(r"step 4/4 loss \S+ \(fit \S+, clock 2\.5, scalar 2\) lr", caplog.text), caplog.text
    # step 1 alone (update 0); steps 2 (update 1) alone after the first log; steps 3-4 (updates 2, 3)
    assert [r["loss/clock"] for r in rows] == pytest.approx([0.0, 1.0, 2.5])
    assert all(r["loss/scalar"] == pytest.approx(2.0) for r in rows)
    for r in rows:
        assert r["loss/fit"] == pytest.approx(r["loss"], rel=1e-6)  # the only part of the total

    plain = _trainer(cfg, loss=denoise_loss, dropout=0.0).fit()
    assert not any(k.startswith("loss/") for r in plain.history for k in r)


def test_loss_terms_must_be_the_same_every_call(tmp_path) -> None:
    cfg = _config(steps=4, grad_accum=1, log_every=1)

    def flaky(module, batch, generator, ctx):
        loss_B = denoise_loss(module, batch, generator, ctx)
        if ctx.step != 2:
            ctx.record("fit", loss_B)
        return loss_B

    with pytest.raises(ValueError, match=r"recorded terms \[\] at step 3 after \['fit'\]"):
        _trainer(cfg, loss=flaky, dropout=0.0).fit()


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("Loss", torch.zeros(3), "lower-case"),
        ("a/b", torch.zeros(3), "lower-case"),
        ("ok", torch.zeros(3, 2), r"\(B,\) or scalar"),
        ("ok", 1.0, r"\(B,\) or scalar"),
    ],
)
def test_loss_context_record_names_bad_input(name, value, match) -> None:
    from caloforge.platform.objectives import LossContext

    ctx = LossContext()
    with pytest.raises(ValueError, match=match):
        ctx.record(name, value)
    ctx.record("ok_1", torch.tensor([1.0, 3.0], requires_grad=True))
    assert ctx.terms["ok_1"].item() == 2.0 and not ctx.terms["ok_1"].requires_grad
    with pytest.raises(ValueError, match="twice"):
        ctx.record("ok_1", torch.zeros(2))
