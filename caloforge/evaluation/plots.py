"""Evaluation plots (matplotlib, Agg backend): reference vs sample HLF histograms with ratio panels,
mean longitudinal / radial / azimuthal profiles, the classifier weight distributions, and separation power
of the model next to the data-vs-data floor (overall and per conditional group).

Figures are built as ``matplotlib.figure.Figure`` objects and saved with the Agg canvas, without pyplot, so
writing a report never changes a caller's matplotlib backend or global figure state."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from caloforge.evaluation import histograms as H

if TYPE_CHECKING:
    from caloforge.evaluation.report import PlotData

REF_STYLE = {"color": "0.35", "alpha": 0.35, "label": "reference"}
GEN_COLOR = "tab:blue"
FLOOR_COLOR = "0.6"
RATIO_LIMITS = (0.5, 1.5)


def default_layers(profile_z: np.ndarray | None, n_z: int, count: int = 6) -> list[int]:
    """``count`` layers spread over the layers holding the central 90 % of the mean reference energy."""
    if profile_z is None or np.sum(profile_z) <= 0:
        return sorted({round(v) for v in np.linspace(0, n_z - 1, min(count, n_z))})
    inner = np.asarray(profile_z[1:-1], dtype=np.float64)
    cdf = np.cumsum(inner) / inner.sum()
    lo = int(np.searchsorted(cdf, 0.05))
    hi = int(np.searchsorted(cdf, 0.95))
    return sorted({round(v) for v in np.linspace(lo, max(hi, lo), min(count, n_z))})


def _density(counts: np.ndarray, edges: np.ndarray, per_bin: bool) -> tuple[np.ndarray, float, float]:
    """Inner-bin density (fraction per unit x, or per bin for log bins; normalised over all bins incl.
    under/overflow), and the under- and overflow fractions."""
    total = float(np.sum(counts))
    if total <= 0:
        return np.zeros(len(edges) - 1), 0.0, 0.0
    inner = counts[1:-1] / total
    if not per_bin:
        inner = inner / np.diff(edges)
    return inner, float(counts[0] / total), float(counts[-1] / total)


def _hist_panel(ax: Axes, rax: Axes, defn: H.HistDef, data: PlotData) -> None:
    name = defn.name
    edges = data.binning[name]
    c_ref, c_gen = data.hist_ref[name], data.hist_gen[name]
    log_x = defn.log or defn.kind == "spectrum"
    d_ref, uf_r, of_r = _density(c_ref, edges, per_bin=log_x)
    d_gen, uf_g, of_g = _density(c_gen, edges, per_bin=log_x)
    ax.set_ylabel("fraction per bin" if log_x else "fraction / bin width", fontsize=7)
    ax.stairs(d_ref, edges, fill=True, **REF_STYLE)
    ax.stairs(d_gen, edges, color=GEN_COLOR, linewidth=1.4, label="sample")
    positive = np.concatenate([d_ref[d_ref > 0], d_gen[d_gen > 0]])
    if positive.size and positive.max() / positive.min() > 100:
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
        rax.xaxis.set_minor_formatter(NullFormatter())  # < 1 decade: minor labels would overlap
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d_ref > 0, d_gen / d_ref, np.nan)
        if defn.kind == "profile":
            rel = np.zeros_like(ratio)
        else:
            n_ref, n_gen = c_ref[1:-1], c_gen[1:-1]
            rel = np.sqrt(np.where(n_ref > 0, 1.0 / n_ref, 0.0) + np.where(n_gen > 0, 1.0 / n_gen, 0.0))
    centers = np.sqrt(edges[1:] * edges[:-1]) if log_x else 0.5 * (edges[1:] + edges[:-1])
    rax.stairs(np.clip(ratio, *RATIO_LIMITS), edges, color=GEN_COLOR, linewidth=1.2, baseline=None)
    if np.any(rel > 0):
        rax.errorbar(
            centers, np.clip(ratio, *RATIO_LIMITS), yerr=ratio * rel, fmt="none", ecolor=GEN_COLOR, lw=0.6
        )
    rax.axhline(1.0, color="k", lw=0.6)
    rax.set_ylim(*RATIO_LIMITS)
    rax.set_yticks([0.75, 1.0, 1.25])
    rax.set_ylabel("sample/ref", fontsize=7)
    rax.set_xlabel(defn.label, fontsize=8)
    sep = data.sep.get(name) if data.sep else None
    title = defn.name if sep is None or not math.isfinite(sep) else f"{defn.name}   S = {sep:.3g}"
    if max(uf_r, of_r, uf_g, of_g) > 0:
        title += f"\nunder/overflow: ref {uf_r:.1%}/{of_r:.1%}, sample {uf_g:.1%}/{of_g:.1%}"
    ax.set_title(title, fontsize=7.5)
    ax.tick_params(labelbottom=False, labelsize=7)
    rax.tick_params(labelsize=7)


def plot_group(group: str, data: PlotData, path: Path, layers: list[int], dpi: int) -> Path:
    """One PNG per HLF group: the scalar histogram, or a grid of the chosen layers, with ratio panels."""
    defs = [d for d in H.hist_defs(data.n_z, (group,)) if d.layer is None or d.layer in layers]
    ncols = min(3, len(defs))
    nrows = math.ceil(len(defs) / ncols)
    single = len(defs) == 1
    width, height = (5.6, 4.6) if single else (3.9 * ncols, 3.4 * nrows + 0.9)
    top = 1 - (0.5 if single else 0.85) / height
    fig = Figure(figsize=(width, height))
    outer = fig.add_gridspec(
        nrows,
        ncols,
        left=0.1 if single else 0.07,
        right=0.97,
        top=top,
        bottom=0.45 / height,
        hspace=0.5,
        wspace=0.28,
    )
    for i, d in enumerate(defs):
        r, c = divmod(i, ncols)
        inner = outer[r, c].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.0)
        ax = fig.add_subplot(inner[0])
        rax = fig.add_subplot(inner[1], sharex=ax)
        _hist_panel(ax, rax, d, data)
        if i == 0:
            ax.legend(fontsize=7, loc="best")
    if not single:
        fig.suptitle(f"{group}: reference vs sample", fontsize=10)
    fig.savefig(path, dpi=dpi)
    return path


def plot_profiles(data: PlotData, path: Path, dpi: int) -> Path:
    """Mean energy-weighted longitudinal, radial and azimuthal profiles with ratio panels."""
    groups = [g for g in ("profile_z", "profile_r", "profile_phi") if g in data.hist_ref]
    fig = Figure(figsize=(3.9 * len(groups), 4.0))
    outer = fig.add_gridspec(1, len(groups), left=0.07, right=0.98, top=0.84, bottom=0.12, wspace=0.3)
    for i, g in enumerate(groups):
        inner = outer[0, i].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.0)
        ax = fig.add_subplot(inner[0])
        rax = fig.add_subplot(inner[1], sharex=ax)
        _hist_panel(ax, rax, H.HistDef(g, None), data)
        ax.set_ylabel("energy fraction / bin width", fontsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle("mean shower profiles", fontsize=10)
    fig.savefig(path, dpi=dpi)
    return path


def plot_classifier_weights(data: PlotData, path: Path, dpi: int) -> Path:
    """Histograms of log10 w, w = C/(1−C), on the test split, per classifier and class."""
    kinds = [k for k in ("low", "high") if k in data.classifier_weights]
    fig = Figure(figsize=(4.2 * len(kinds), 3.4))
    axes = fig.subplots(1, len(kinds), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        w_ref, w_gen = data.classifier_weights[kind]
        lw_ref, lw_gen = np.log10(w_ref), np.log10(w_gen)
        lo = float(min(np.quantile(lw_ref, 0.001), np.quantile(lw_gen, 0.001), -0.5))
        hi = float(max(np.quantile(lw_ref, 0.999), np.quantile(lw_gen, 0.999), 0.5))
        bins = np.linspace(lo, hi, 51)
        ax.hist(np.clip(lw_ref, lo, hi), bins=bins, density=True, histtype="stepfilled", **REF_STYLE)
        ax.hist(
            np.clip(lw_gen, lo, hi),
            bins=bins,
            density=True,
            histtype="step",
            color=GEN_COLOR,
            lw=1.4,
            label="sample",
        )
        ax.axvline(0.0, color="k", lw=0.6)
        ax.set_yscale("log")
        ax.set_xlabel(r"$\log_{10} w$,  $w = C/(1-C) \approx p_\mathrm{ref}/p_\mathrm{sample}$", fontsize=8)
        ax.set_title(f"{kind}-level classifier, test split", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def plot_sep_power(metrics: dict[str, float], path: Path, dpi: int, prefix: str = "") -> Path | None:
    """Bar chart of separation power per HLF group: model vs the data-vs-data floor."""
    groups = [g for g in H.GROUPS if f"{prefix}sep_power/{g}" in metrics]
    if not groups:
        return None
    model = np.array([metrics[f"{prefix}sep_power/{g}"] for g in groups])
    floor = np.array([metrics.get(f"floor/{prefix}sep_power/{g}", np.nan) for g in groups])
    y = np.arange(len(groups))
    fig = Figure(figsize=(6.0, max(0.32 * len(groups) + 1.2, 3.0)))
    ax = fig.subplots()
    ax.barh(y + 0.2, model, height=0.4, color=GEN_COLOR, label="sample vs reference")
    ax.barh(y - 0.2, floor, height=0.4, color=FLOOR_COLOR, label="floor (reference halves)")
    ax.set_yticks(y, groups, fontsize=8)
    ax.invert_yaxis()
    positive = np.concatenate([model[model > 0], floor[np.isfinite(floor) & (floor > 0)]])
    if positive.size and positive.max() / positive.min() > 50:
        ax.set_xscale("log")
    ax.set_xlabel("separation power (mean over histograms)", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def plot_groups(metrics: dict[str, float], group_keys: list[str], path: Path, dpi: int) -> Path | None:
    """Mean separation power per conditional group, model vs floor."""
    keys = [k for k in group_keys if f"group/{k}/sep_power/mean" in metrics]
    if not keys:
        return None
    model = np.array([metrics[f"group/{k}/sep_power/mean"] for k in keys])
    floor = np.array([metrics.get(f"floor/group/{k}/sep_power/mean", np.nan) for k in keys])
    y = np.arange(len(keys))
    fig = Figure(figsize=(6.5, max(0.3 * len(keys) + 1.3, 3.0)))
    ax = fig.subplots()
    ax.barh(y + 0.2, model, height=0.4, color=GEN_COLOR, label="sample vs reference")
    ax.barh(y - 0.2, floor, height=0.4, color=FLOOR_COLOR, label="floor (reference halves)")
    ax.set_yticks(y, keys, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("mean separation power over HLF groups", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
