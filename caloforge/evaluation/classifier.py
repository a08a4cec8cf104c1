"""Classifier two-sample test (CaloChallenge 2022, arXiv:2410.21611 §4; official ``code/evaluate.py``).

A fully connected network is trained to tell reference showers (label 1) from generated ones (label 0).
Architecture and defaults follow the official recipe: ``Linear(D, H)`` then ``n_layers`` × ``Linear(H, H)``,
each followed by LeakyReLU (and dropout p), then ``Linear(H, 1)``; H = 512, n_layers = 2, Adam with
lr = 2·10⁻⁴, batch 1000, 50 epochs, BCE-with-logits loss, a 60/20/20 train/validation/test split of
equally many showers per class. Differences from the official script, each deliberate:

- the epoch is chosen on the *validation* split (lowest BCE; early stopping after ``patience`` epochs
  without improvement), and the AUC is measured on the untouched *test* split (the official code selects
  the epoch on the split it then reports on);
- the outputs are calibrated by Platt scaling fitted on the validation split (the official code uses
  isotonic regression); the AUC is invariant under this monotone map, the weights are not;
- the test is repeated over ``n_seeds`` seeds (split + initialisation) and the mean and standard deviation
  of the AUC are reported.

Reported per classifier: AUC = P(C(x_ref) > C(x_gen)) (Mann–Whitney U / (n₁ n₀), ties counted ½; 0.5 means
indistinguishable), the JSD estimate ``(ln 2 − BCE_test)/ln 2`` of the calibrated classifier (official), and
the weights ``w = C/(1 − C)`` ≈ p_ref(x)/p_gen(x) on the test split: the per-shower factor that would
reweight generated showers to the reference; showers with w far from 1 locate the failures.

Inputs (prepared by :func:`low_level_inputs` / :func:`high_level_inputs`): low level = voxel energies
divided by E_inc, ``log10(E/E_inc + 10⁻⁸)``, affinely scaled with one global mean/std of the reference
voxels (per-voxel scaling would blow up rarely hit voxels), plus the standardised conditions; high level =
the standardised HLF vector (it contains log10 E_inc).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from caloforge.evaluation.config import ClassifierConfig
from caloforge.platform.seeding import derive_seed

log = logging.getLogger("caloforge.evaluation")

WEIGHT_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
LOW_LEVEL_EPS = 1e-8


class DNN(nn.Module):
    """The official ``DNN``: input layer, ``n_layers`` hidden layers, scalar logit output."""

    def __init__(self, input_dim: int, hidden: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(input_dim, hidden), nn.LeakyReLU(), nn.Dropout(dropout)]
        for _ in range(n_layers):
            layers += [nn.Linear(hidden, hidden), nn.LeakyReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.layers(x_BD).squeeze(-1)


def auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the Mann–Whitney statistic: (Σ ranks of positives − n₁(n₁+1)/2) / (n₁ n₀)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"auc_score: labels {y.shape} and scores {s.shape} must be equal 1-D shapes")
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        raise ValueError(f"auc_score: need both classes, got {n1} positives and {n0} negatives")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


@dataclass
class ClassifierResult:
    """Outcome of one classifier test over ``n_seeds`` repetitions."""

    aucs: list[float]
    jsds: list[float]
    best_epochs: list[int]
    weights_gen: np.ndarray  # calibrated w on generated test showers (all seeds)
    weights_ref: np.ndarray  # calibrated w on reference test showers (all seeds)
    n_train: int
    history: list[list[tuple[float, float]]] = field(default_factory=list)  # per seed: (train, val) BCE

    @property
    def auc(self) -> float:
        return float(np.mean(self.aucs))

    @property
    def auc_std(self) -> float:
        return float(np.std(self.aucs, ddof=1)) if len(self.aucs) > 1 else 0.0

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metrics: ``auc_<prefix>``, ``auc_<prefix>_std`` and ``cls_<prefix>/...`` details."""
        out = {
            f"auc_{prefix}": self.auc,
            f"auc_{prefix}_std": self.auc_std,
            f"cls_{prefix}/jsd": float(np.mean(self.jsds)),
            f"cls_{prefix}/best_epoch": float(np.mean(self.best_epochs)),
            f"cls_{prefix}/n_train_per_class": float(self.n_train),
        }
        for q in WEIGHT_QUANTILES:
            out[f"cls_{prefix}/w_gen_q{round(q * 100):02d}"] = float(np.quantile(self.weights_gen, q))
        lw = np.abs(np.log10(self.weights_gen))
        out[f"cls_{prefix}/w_gen_frac_outside_0.1_10"] = float(np.mean(lw > 1.0))
        return out


def low_level_inputs(
    showers_NZPR: np.ndarray,
    energy_mev: np.ndarray,
    threshold_mev: np.ndarray | float,
    voxel_shift: float,
    voxel_scale: float,
) -> np.ndarray:
    """(N, V) float32: ``(log10(E_voxel/E_inc + 1e-8) − shift)/scale``, voxels < threshold set to 0
    (official ``np.where(voxel < threshold, 0, voxel)``)."""
    n = len(showers_NZPR)
    x = np.asarray(showers_NZPR, dtype=np.float32).reshape(n, -1)
    thr = np.broadcast_to(np.asarray(threshold_mev, dtype=np.float32), (n,))[:, None]
    e = np.asarray(energy_mev, dtype=np.float32).reshape(n, 1)
    u = np.where(x < thr, np.float32(0.0), x) / e
    u += np.float32(LOW_LEVEL_EPS)
    np.log10(u, out=u)
    u -= np.float32(voxel_shift)
    u /= np.float32(voxel_scale)
    return u


def low_level_scaling(
    showers_NZPR: np.ndarray, energy_mev: np.ndarray, threshold_mev: np.ndarray | float
) -> tuple[float, float]:
    """Global (shift, scale) of log10(E/E_inc + 1e-8) over all voxels of the reference."""
    u = low_level_inputs(showers_NZPR, energy_mev, threshold_mev, 0.0, 1.0)
    mean = float(u.mean(dtype=np.float64))
    std = float(u.std(dtype=np.float64))
    return mean, std if std > 0 else 1.0


def _platt(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> tuple[float, float]:
    """Fit σ(a z + b) to labels by maximum likelihood (LBFGS); returns (a, b)."""
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    z, y = logits.double(), labels.double()
    opt = torch.optim.LBFGS([ab], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(ab[0] * z + ab[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = (float(v) for v in ab.detach())
    if not (math.isfinite(a) and math.isfinite(b)):
        return 1.0, 0.0
    return a, b


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).cpu()


def _split(n: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n)
    n_train = round(fractions[0] * n)
    n_val = round(fractions[1] * n)
    return [perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]]


def _train_one(
    x_ref: np.ndarray, x_gen: np.ndarray, cfg: ClassifierConfig, seed: int, desc: str
) -> tuple[float, float, int, np.ndarray, np.ndarray, list[tuple[float, float]], int]:
    rng = np.random.default_rng(seed)
    n = min(len(x_ref), len(x_gen))
    if cfg.max_showers_per_class is not None:
        n = min(n, cfg.max_showers_per_class)
    ref_idx = rng.permutation(len(x_ref))[:n]
    parts_ref = _split(n, cfg.split, rng)
    if len(x_ref) == len(x_gen):
        # One permutation for both classes: for paired samples (shower i of each generated from the same
        # condition and noise, e.g. an ONNX graph against its fp32 original) the twins land in the same
        # split, so the classifier cannot memorise a shower in training and meet its twin, labelled as the
        # other class, in validation or test (an AUC far from 0.5 for identical samples). For independent
        # samples one permutation is as good as two.
        gen_idx, parts_gen = ref_idx, parts_ref
    else:
        gen_idx = rng.permutation(len(x_gen))[:n]
        parts_gen = _split(n, cfg.split, rng)
    if min(len(p) for p in parts_ref) < 2:
        raise ValueError(f"classifier {desc}: {n} showers per class are too few for the split {cfg.split}")
    device = torch.device(cfg.device)

    def stack(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        xr = x_ref[ref_idx[parts_ref[k]]]
        xg = x_gen[gen_idx[parts_gen[k]]]
        x = torch.from_numpy(np.concatenate([xr, xg]).astype(np.float32))
        y = torch.cat([torch.ones(len(xr)), torch.zeros(len(xg))])
        return x.to(device), y.to(device)

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = stack(0), stack(1), stack(2)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    # initialisation and dropout draw from torch's global RNG: fork it, so the run is seeded and the
    # caller's RNG state is untouched
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        model = DNN(x_tr.shape[1], cfg.hidden, cfg.n_layers, cfg.dropout).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(seed)
        loss_fn = nn.BCEWithLogitsLoss()
        best_val, best_state, best_epoch, bad = math.inf, copy.deepcopy(model.state_dict()), 0, 0
        history: list[tuple[float, float]] = []
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            perm = torch.randperm(len(x_tr), generator=gen).to(device)
            tot = 0.0
            for i in range(0, len(x_tr), cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                loss = loss_fn(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item() * len(idx)
            val = float(loss_fn(_logits(model, x_va, cfg.batch_size), y_va.cpu()))
            history.append((tot / len(x_tr), val))
            if val < best_val - 1e-6:
                best_val, best_state, best_epoch, bad = val, copy.deepcopy(model.state_dict()), epoch, 0
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    model.load_state_dict(best_state)
    a, b = _platt(_logits(model, x_va, cfg.batch_size), y_va.cpu())
    z_te = a * _logits(model, x_te, cfg.batch_size).double() + b
    y_np = y_te.cpu().numpy()
    auc = auc_score(y_np, z_te.numpy())
    bce = float(nn.functional.binary_cross_entropy_with_logits(z_te, y_te.cpu().double()))
    jsd = (math.log(2.0) - bce) / math.log(2.0)
    w = torch.exp(z_te.clamp(-30, 30)).numpy()  # C/(1−C) = exp(calibrated logit)
    log.info("classifier %s: AUC %.4f (best epoch %d of %d)", desc, auc, best_epoch, len(history))
    return auc, jsd, best_epoch, w[y_np == 0], w[y_np == 1], history, len(parts_ref[0])


SMALL_NET_WEIGHTS = 1_000_000


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def two_sample_classifier(
    x_ref: np.ndarray, x_gen: np.ndarray, cfg: ClassifierConfig, seed: int, purpose: str
) -> ClassifierResult:
    """Train ``cfg.n_seeds`` classifiers reference-vs-generated and collect AUC, JSD and weights."""
    if x_ref.ndim != 2 or x_gen.ndim != 2 or x_ref.shape[1] != x_gen.shape[1]:
        raise ValueError(
            f"classifier {purpose}: inputs must be (N, D) with equal D, got {x_ref.shape}, {x_gen.shape}"
        )
    threads = cfg.num_threads
    if threads is None and cfg.device == "cpu" and x_ref.shape[1] * cfg.hidden < SMALL_NET_WEIGHTS:
        threads = 1
    with _torch_threads(threads):
        runs = [
            _train_one(x_ref, x_gen, cfg, derive_seed(seed, f"classifier/{purpose}", i), f"{purpose}#{i}")
            for i in range(cfg.n_seeds)
        ]
    return ClassifierResult(
        aucs=[r[0] for r in runs],
        jsds=[r[1] for r in runs],
        best_epochs=[r[2] for r in runs],
        weights_gen=np.concatenate([r[3] for r in runs]),
        weights_ref=np.concatenate([r[4] for r in runs]),
        n_train=runs[0][6],
        history=[r[5] for r in runs],
    )
