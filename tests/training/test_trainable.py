"""Training a subset of rows of a parameter (``training/trainable.py``): a new detector's embedding row of a
tiny debug ShowerModel trains, every other row of the embedding stays bitwise unchanged (weights, AdamW
moments, EMA) while a whole matrix trained alongside still gets its weight decay; with gradient clipping,
a skipped non-finite update, fused AdamW, DDP (2 gloo ranks) and DeepSpeed ZeRO 0/1/2 (one process)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from train_helpers import InMemoryStream

from caloforge.datasets.stats import compute_stats
from caloforge.platform.conditioning import Conditions, ConditionVocab
from caloforge.platform.objectives import LossContext
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig
from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig, ScheduleConfig
from caloforge.training.ema import EMA
from caloforge.training.loop import Trainer
from caloforge.training.optim import build_optimizer
from caloforge.training.state import CheckpointManager
from caloforge.training.tasks import shower_loss_fn
from caloforge.training.torch_backend import DDPBackend, TorchBackend
from caloforge.training.trainable import Trainable, count, resolve, select

MESH = (6, 4, 3)
LR, WD = 1e-2, 0.1
CFG = LoopConfig(
    steps=5,
    batch_size=8,
    log_every=1,
    seed=2,
    max_grad_norm=None,
    optim=OptimConfig(lr=LR, weight_decay=WD),
    schedule=ScheduleConfig(kind="constant", warmup_frac=0.0),
    ema=EMAConfig(decay=0.9),
)


def _data(n: int = 48, seed: int = 0) -> tuple[np.ndarray, Conditions]:
    """Showers of the two pretrained detectors and of the new one, mixed in every batch: without the mask
    the known detectors' rows would get gradients too."""
    rng = np.random.default_rng(seed)
    energy = rng.uniform(2e3, 2e4, n)
    showers = rng.exponential(1.0, (n, *MESH)) * (energy / 72.0)[:, None, None, None]
    showers[rng.random(showers.shape) < 0.3] = 0.0
    det = np.asarray(["det-a", "det-b", "det-new"])[np.arange(n) % 3]
    return showers.astype(np.float32), Conditions.make(energy, 0.1, 0.0, 11, det)


def _name(model: nn.Module, param: nn.Parameter) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


def _model() -> ShowerModel:
    """A debug model pretrained on det-a/det-b (4 slots) that has just learned of det-new (slot 2)."""
    showers, cond = _data()
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)
    cfg = ShowerModelConfig(backbone="debug")
    vocab = ConditionVocab.create(["det-a", "det-b"], spare_slots=2)
    model = ShowerModel.build(cfg, vocab, stats, MESH).with_detector("det-new")
    with torch.no_grad():  # non-zero adaLN/output layers: gradients reach the embedding from step 1
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05, generator=gen)
    return model


_PROBE = _model()
EMBED = _name(_PROBE, _PROBE.network.detector_embed.weight)
MATRIX = _name(_PROBE, _PROBE.network.patch_embed.weight)  # a whole matrix trained alongside (decayed)
del _PROBE


def _stream(micro: int, rank: int = 0, world: int = 1) -> InMemoryStream:
    showers, cond = _data()
    return InMemoryStream(showers, cond, micro, seed=5, rank=rank, world_size=world)


def _row_selection(model: nn.Module) -> Trainable:
    k = model.vocab.detector_index("det-new")
    return select(model, names=[MATRIX], rows={EMBED: [k]})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.int32)


def _assert_rows_frozen(before: torch.Tensor, after: torch.Tensor, k: int, what: str) -> None:
    others = [i for i in range(before.shape[0]) if i != k]
    assert torch.equal(_bits(before[others]), _bits(after[others])), f"{what}: frozen rows changed"
    assert not torch.equal(before[k], after[k]), f"{what}: the trained row {k} did not change"


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- the selection ---------------------------------------------------------------------------------------


def test_select_count_and_validation() -> None:
    model = _model()
    k = model.vocab.detector_index("det-new")
    emb = model.network.detector_embed.weight
    only_row = select(model, names=[], rows={EMBED: [k]})
    assert only_row.names == (EMBED,) and only_row.rows == {EMBED: (k,)}
    total = sum(p.numel() for p in model.parameters())
    assert count(only_row) == (emb.shape[1], total)  # one row of width 64
    both = _row_selection(model)
    assert both.names == (MATRIX, EMBED)  # model order
    assert count(both) == (model.network.patch_embed.weight.numel() + emb.shape[1], total)
    # names=None: everything with requires_grad, with the embedding restricted to two rows
    all_but = select(model, rows={EMBED: [3, k, 3]})
    assert all_but.rows[EMBED] == (k, 3) and len(all_but.names) == len(list(model.parameters()))
    assert count(all_but) == (total - (emb.shape[0] - 2) * emb.shape[1], total)
    assert count(resolve(model, None)) == (total, total)
    assert only_row.to_dict() == {
        "names": [EMBED],
        "rows": {EMBED: [k]},
        "trained": emb.shape[1],
        "total": total,
    }
    assert resolve(model, [emb]).names == (EMBED,) and resolve(model, both) is both

    with pytest.raises(ValueError, match="no parameter"):
        select(model, names=["network.nope"])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        select(model, names=[], rows={EMBED: [4]})
    with pytest.raises(ValueError, match="empty"):
        select(model, names=[], rows={EMBED: []})
    with pytest.raises(ValueError, match="do not belong"):
        resolve(model, [nn.Parameter(torch.zeros(2))])
    emb.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        select(model, names=[], rows={EMBED: [k]})
    emb.requires_grad_(True)
    showers, cond = _data()
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)
    vocab = ConditionVocab.create(["det-a"], spare_slots=0)
    other = ShowerModel.build(ShowerModelConfig(backbone="debug"), vocab, stats, MESH)
    with pytest.raises(ValueError, match="shape"):
        resolve(other, only_row)  # one detector slot, not four
    sparse = nn.ModuleDict({"emb": nn.Embedding(3, 2, sparse=True)})
    with pytest.raises(ValueError, match="sparse"):
        select(sparse, rows={"emb.weight": [0]})


def test_optimizer_groups_and_ema_rows() -> None:
    model = _model()
    selection = _row_selection(model)
    opt = build_optimizer(model, OptimConfig(weight_decay=WD), selection)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == WD and decayed["params"] == [model.network.patch_embed.weight]
    assert plain["weight_decay"] == 0.0 and plain["params"] == [model.network.detector_embed.weight]
    # only the row group: the empty decayed group is left out
    (group,) = build_optimizer(
        model, OptimConfig(weight_decay=WD), select(model, [], {EMBED: [1]})
    ).param_groups
    assert group["weight_decay"] == 0.0
    ema = EMA(model, EMAConfig(decay=0.5, warmup=False), selection)
    assert set(ema.shadow) == {MATRIX, EMBED}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = ema.shadow[EMBED].clone()
    ema.update(model)
    k = selection.rows[EMBED][0]
    _assert_rows_frozen(before, ema.shadow[EMBED], k, "ema")
    torch.testing.assert_close(ema.shadow[EMBED][k], before[k] + 0.5, rtol=0, atol=1e-7)


def test_masks_follow_the_latest_selection() -> None:
    model = _model()
    emb = model.network.detector_embed.weight

    def grad_rows() -> list[bool]:
        emb.grad = None
        (emb * torch.arange(1.0, 5.0)[:, None]).sum().backward()
        return [bool(r.any()) for r in emb.grad]

    select(model, names=[], rows={EMBED: [1, 2]}).mask_gradients(model)
    assert grad_rows() == [False, True, True, False]
    select(model, names=[], rows={EMBED: [1, 2]}).mask_gradients(model)  # idempotent
    assert grad_rows() == [False, True, True, False]
    select(model, names=[], rows={EMBED: [3]}).mask_gradients(model)  # replaces, not intersects
    assert grad_rows() == [False, False, False, True]
    select(model).mask_gradients(model)  # a whole-parameter selection removes the mask
    assert grad_rows() == [True, True, True, True]
    # an inf gradient of a trained row does not leak into the frozen ones (copied, not multiplied)
    select(model, names=[], rows={EMBED: [0]}).mask_gradients(model)
    emb.grad = None
    (emb * torch.tensor([[float("inf")], [1.0], [1.0], [1.0]])).sum().backward()
    assert torch.isinf(emb.grad[0]).all() and (emb.grad[1:] == 0).all()


# -- through the loop ------------------------------------------------------------------------------------


def _trainer(model: ShowerModel, trainable, cfg: LoopConfig = CFG, backend=None, loss_fn=None) -> Trainer:
    backend = backend if backend is not None else TorchBackend("cpu")
    loss = loss_fn if loss_fn is not None else shower_loss_fn(model)
    return Trainer(
        model, loss, backend, _stream(cfg.micro_batch_size(backend.world_size)), cfg, trainable=trainable
    )


def _check_trained(trainer: Trainer, start: dict[str, torch.Tensor], k: int) -> None:
    model = trainer.backend.model
    after = _snapshot(model)
    _assert_rows_frozen(start[EMBED], after[EMBED], k, "weights")
    _assert_rows_frozen(start[EMBED], trainer.ema.shadow[EMBED], k, "EMA")
    assert not torch.equal(start[MATRIX], after[MATRIX])
    for name, value in start.items():  # everything outside the selection is untouched
        if name not in (EMBED, MATRIX):
            assert torch.equal(_bits(value), _bits(after[name])), name


def test_only_the_new_row_trains_and_the_matrix_is_decayed() -> None:
    model = _model()
    k = model.vocab.detector_index("det-new")
    start = _snapshot(model)
    trainer = _trainer(model, _row_selection(model))
    no_decay = _model()
    reference = _trainer(
        no_decay,
        _row_selection(no_decay),
        dataclasses.replace(CFG, optim=OptimConfig(lr=LR, weight_decay=0.0)),
    )
    # Update 1 sees the same gradients in both runs: AdamW's decoupled decay is the whole difference of the
    # matrix (lr·wd·θ₀), and the embedding (no decay: some of its rows are frozen) is bitwise the same.
    trainer.fit(max_steps=1)
    reference.fit(max_steps=1)
    w_decay, w_plain = trainer.backend.model.network.patch_embed.weight, no_decay.network.patch_embed.weight
    decay = LR * WD * start[MATRIX]
    assert decay.abs().max() > 1e-4  # three orders above the float32 rounding of the update (~1e-8)
    torch.testing.assert_close(w_plain - w_decay, decay, rtol=0, atol=1e-7)
    assert torch.equal(model.network.detector_embed.weight, no_decay.network.detector_embed.weight)

    result = trainer.fit()
    assert result.step == CFG.steps and trainer.skipped_updates == 0
    _check_trained(trainer, start, k)
    state = trainer.backend.optimizer.state[model.network.detector_embed.weight]
    others = [i for i in range(4) if i != k]
    assert not state["exp_avg"][others].any() and not state["exp_avg_sq"][others].any()
    assert state["exp_avg"][k].any()


def test_without_the_row_mask_the_other_rows_move() -> None:
    """Control: the same run training the whole embedding changes the known detectors' rows (gradients)
    and the unused spare row (weight decay) — what the selection prevents."""
    model = _model()
    start = _snapshot(model)
    _trainer(model, [model.network.patch_embed.weight, model.network.detector_embed.weight]).fit()
    changed = [not torch.equal(start[EMBED][i], model.network.detector_embed.weight[i]) for i in range(4)]
    assert changed == [True, True, True, True]


def test_a_resumed_run_equals_the_straight_one(tmp_path: Path) -> None:
    """Checkpoint at step 2 and resume: the mask is installed again by the new backend, and the weights
    and EMA end bit-identical to the straight run."""
    straight = _model()
    start = _snapshot(straight)
    reference = _trainer(straight, _row_selection(straight))
    reference.fit()

    def split() -> tuple[ShowerModel, Trainer]:
        model = _model()
        stream = _stream(CFG.micro_batch_size(1))
        trainer = Trainer(
            model,
            shower_loss_fn(model),
            TorchBackend("cpu"),
            stream,
            CFG,
            checkpoints=CheckpointManager(tmp_path / "checkpoints"),
            trainable=_row_selection(model),
        )
        return model, trainer

    split()[1].fit(max_steps=2)
    model, resumed = split()
    assert resumed.fit().resumed_from.name == "step_00000002"
    for name, p in model.named_parameters():
        assert torch.equal(_bits(p), _bits(straight.get_parameter(name))), name
    for name, shadow in resumed.ema.shadow.items():
        assert torch.equal(_bits(shadow), _bits(reference.ema.shadow[name])), name
    _check_trained(resumed, start, model.vocab.detector_index("det-new"))


@pytest.mark.parametrize("fused", [False, True])
def test_clipping_and_a_skipped_non_finite_update_keep_the_rows(fused: bool) -> None:
    model = _model()
    k = model.vocab.detector_index("det-new")
    start = _snapshot(model)
    inner = shower_loss_fn(model)
    calls = {"n": 0}

    def loss_fn(module: nn.Module, batch, generator: torch.Generator, ctx: LossContext) -> torch.Tensor:
        calls["n"] += 1
        loss_B = inner(module, batch, generator, ctx)
        return loss_B * float("inf") if calls["n"] == 3 else loss_B  # update 3: inf/nan gradients

    cfg = dataclasses.replace(CFG, max_grad_norm=1e-3)
    trainer = _trainer(model, _row_selection(model), cfg, TorchBackend("cpu", fused_adamw=fused), loss_fn)
    history = trainer.fit().history
    assert trainer.skipped_updates == 1
    assert all(row["grad_norm"] > cfg.max_grad_norm for i, row in enumerate(history) if i != 2)
    _check_trained(trainer, start, k)


# -- DDP (2 gloo ranks) and DeepSpeed (one process) ------------------------------------------------------


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        model = _model()
        start = _snapshot(model)
        trainer = _trainer(model, _row_selection(model), backend=DDPBackend("cpu"))
        trainer.fit()
        _check_trained(trainer, start, model.vocab.detector_index("det-new"))
        torch.save({"params": _snapshot(model), "ema": dict(trainer.ema.shadow)}, Path(tmp) / f"r{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_trains_only_the_row(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2))
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), name
    start = _snapshot(_model())
    _assert_rows_frozen(start[EMBED], r0["params"][EMBED], 2, "DDP weights")
    _assert_rows_frozen(start[EMBED], r0["ema"][EMBED], 2, "DDP EMA")


def _deepspeed_worker(_: int, tmp: str) -> None:
    """One process (DeepSpeedBackend starts its own single-rank gloo group), ZeRO stages 0, 1 and 2."""
    from caloforge.pretrain.config import DeepSpeedOptions
    from caloforge.training.deepspeed_backend import DeepSpeedBackend

    torch.set_num_threads(1)
    cfg = dataclasses.replace(CFG, max_grad_norm=1e-3)
    for stage in (0, 1, 2):
        model = _model()
        start = _snapshot(model)
        backend = DeepSpeedBackend(DeepSpeedOptions(zero_stage=stage, reduce_bucket_size=1000), "cpu")
        trainer = _trainer(model, _row_selection(model), cfg, backend)
        assert backend.engine.zero_optimization_stage() == stage
        trainer.fit()
        _check_trained(trainer, start, model.vocab.detector_index("det-new"))
    (Path(tmp) / "ok").write_text("ok")


@pytest.mark.slow
def test_deepspeed_zero_stages_train_only_the_row(tmp_path: Path) -> None:
    mp.spawn(_deepspeed_worker, args=(str(tmp_path),), nprocs=1, join=True)
    assert (tmp_path / "ok").read_text() == "ok"


def test_the_target_network_follows_only_the_selected_rows() -> None:
    """A consistency-style job's target network θ⁻ averages the same selection as the EMA: frozen rows stay
    bitwise the start, the trained row moves."""
    model = _model()
    k = model.vocab.detector_index("det-new")
    start = _snapshot(model)
    trainer = Trainer(
        model,
        shower_loss_fn(model),
        TorchBackend("cpu"),
        _stream(CFG.micro_batch_size(1)),
        CFG,
        trainable=_row_selection(model),
        target_decay=0.5,
    )
    trainer.fit()
    target = dict(trainer.target.module.named_parameters())
    _assert_rows_frozen(start[EMBED], target[EMBED], k, "target network")
    assert not torch.equal(start[MATRIX], target[MATRIX])
