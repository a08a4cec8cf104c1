"""``EvalReport``: the flat metrics of one evaluation plus what is needed to write it for people.

``EvalReport.write(out_dir)`` writes ``report.json`` (every number: metrics, per-histogram separation
powers, info, the resolved config), ``report.md`` (tables: model next to the data-vs-data floor) and the
PNG plots of :mod:`caloforge.evaluation.plots`. Files are written to a temporary name and renamed, so an
interrupted write never leaves a truncated report. ``EvalReport.read(out_dir)`` loads the JSON back
(without plot data).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import caloforge
from caloforge.config import from_dict, to_dict
from caloforge.evaluation import histograms as H
from caloforge.evaluation.config import EvalConfig
from caloforge.evaluation.group_classifier import METRIC_PREFIX, most_telling

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SCHEMA_VERSION = 1


@dataclass
class PlotData:
    """Arrays behind the plots (pooled comparison); not serialised."""

    binning: dict[str, np.ndarray]
    hist_ref: dict[str, np.ndarray]
    hist_gen: dict[str, np.ndarray]
    n_z: int
    classifier_weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    classifier_history: dict[str, list[list[tuple[float, float]]]] = field(default_factory=dict)
    sep: dict[str, float] = field(default_factory=dict)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def _num(v: float | None, digits: int = 4) -> str:
    """``digits`` significant digits, fixed-point for 1e-4 <= |v| < 1e6, scientific otherwise."""
    if v is None or not math.isfinite(v):
        return "–"
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if -4 <= mag < 6:
        return f"{v:.{max(digits - 1 - mag, 0)}f}"
    return f"{v:.{digits - 1}e}"


def _pm(v: float | None, e: float | None) -> str:
    """Value ± error, the value rounded to the error's second significant digit."""
    if v is None or not math.isfinite(v):
        return "–"
    if e is None or not math.isfinite(e) or e <= 0:
        return _num(v)
    decimals = max(1 - math.floor(math.log10(e)), 0)
    return f"{v:.{decimals}f} ± {e:.{decimals}f}"


@dataclass
class EvalReport:
    """Result of :func:`caloforge.evaluation.evaluate`.

    ``metrics``: flat ``dict[str, float]`` (keys in :mod:`caloforge.evaluation.api`; ``fpd``/``kpd`` ×10³);
    ``info``: sizes, sources, mesh, thresholds, group table, timings; ``hist_sep_power`` /
    ``floor_hist_sep_power``: separation power of every single HLF histogram.
    """

    metrics: dict[str, float]
    config: EvalConfig
    info: dict[str, Any] = field(default_factory=dict)
    hist_sep_power: dict[str, float] = field(default_factory=dict)
    floor_hist_sep_power: dict[str, float] = field(default_factory=dict)
    plot_data: PlotData | None = None

    def to_json(self) -> dict[str, Any]:
        return _clean(
            {
                "schema_version": SCHEMA_VERSION,
                "caloforge_version": caloforge.__version__,
                "metrics": dict(sorted(self.metrics.items())),
                "hist_sep_power": self.hist_sep_power,
                "floor_hist_sep_power": self.floor_hist_sep_power,
                "info": self.info,
                "config": to_dict(self.config),
            }
        )

    @classmethod
    def read(cls, out_dir: str | Path) -> EvalReport:
        path = Path(out_dir) / REPORT_JSON
        if not path.is_file():
            raise ValueError(f"{path}: no evaluation report found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON: {exc}") from exc
        for key in ("metrics", "config"):
            if key not in data:
                raise ValueError(f"{path}: missing key {key!r}")
        return cls(
            metrics={k: (float("nan") if v is None else float(v)) for k, v in data["metrics"].items()},
            config=from_dict(EvalConfig, data["config"], f"{path}: config"),
            info=data.get("info", {}),
            hist_sep_power={
                k: (float("nan") if v is None else v) for k, v in data.get("hist_sep_power", {}).items()
            },
            floor_hist_sep_power={
                k: (float("nan") if v is None else v) for k, v in data.get("floor_hist_sep_power", {}).items()
            },
        )

    # ------------------------------------------------------------------------------------- writing
    def write(self, out_dir: str | Path) -> Path:
        """Write report.json, report.md and (when enabled and available) the PNG plots into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pngs = self.write_plots(out) if self.config.plots.enabled and self.plot_data is not None else []
        self.info["plots"] = [p.name for p in pngs]
        _atomic_write(out / REPORT_JSON, (json.dumps(self.to_json(), indent=2) + "\n").encode())
        _atomic_write(out / REPORT_MD, self.to_markdown().encode())
        return out

    def write_plots(self, out: Path) -> list[Path]:
        from caloforge.evaluation import plots as P

        data = self.plot_data
        assert data is not None
        data.sep = self.hist_sep_power
        dpi = self.config.plots.dpi
        written: list[Path] = []

        def keep(path: Path | None) -> None:
            if path is not None:
                tmp = path
                final = out / tmp.name.removeprefix(".tmp-")
                tmp.replace(final)
                written.append(final)

        if data.hist_ref:
            layers = list(self.config.plots.layers) or P.default_layers(
                data.hist_ref.get("profile_z"), data.n_z
            )
            layers = [z for z in layers if z < data.n_z]
            for g in H.GROUPS:
                if g.startswith("profile_") or not any(k.split("/")[0] == g for k in data.hist_ref):
                    continue
                keep(P.plot_group(g, data, out / f".tmp-hist_{g}.png", layers, dpi))
            if any(g in data.hist_ref for g in ("profile_z", "profile_r", "profile_phi")):
                keep(P.plot_profiles(data, out / ".tmp-profiles.png", dpi))
        if data.classifier_weights:
            keep(P.plot_classifier_weights(data, out / ".tmp-classifier_weights.png", dpi))
        keep(P.plot_sep_power(self.metrics, out / ".tmp-sep_power.png", dpi))
        group_keys = [row["group"] for row in self.info.get("groups", [])]
        keep(P.plot_groups(self.metrics, group_keys, out / ".tmp-groups.png", dpi))
        return written

    def to_markdown(self) -> str:
        m = self.metrics
        i = self.info
        lines = [
            "# CaloForge evaluation report",
            "",
            f"- sample: `{i.get('sample_source', '?')}` ({i.get('n_sample', '?')} showers); reference: "
            f"`{i.get('reference_source', '?')}` ({i.get('n_reference', '?')} showers)",
            f"- mesh (n_z, n_phi, n_r): {tuple(i.get('mesh_shape', ()))}; "
            f"detectors: {', '.join(i.get('detectors', []))}; particles: {', '.join(i.get('particles', []))}",
            f"- voxel threshold (MeV): {i.get('voxel_threshold_mev', {})}; "
            f"HLF vector: `{i.get('hlf_vector')}` (dimension {i.get('hlf_dim')}), "
            f"FPD/KPD: divided by the reference max |x| (CaloChallenge/jetnet); PRDC and high-level "
            f"classifier: {self.config.normalisation} with reference statistics",
            f"- conditions: `{self.config.conditions}`; seed {self.config.seed}; "
            f"caloforge {caloforge.__version__}",
            "- floor = the same metric between two random halves of the reference (lower is better for all "
            "distances; AUC 0.5 = indistinguishable)",
            "",
            "## Summary: model vs data-vs-data floor",
            "",
            "| metric | model | floor |",
            "| --- | --- | --- |",
        ]

        def pm(key: str, err: str) -> tuple[str, str]:
            return _pm(m.get(key), m.get(err)), _pm(m.get(f"floor/{key}"), m.get(f"floor/{err}"))

        rows = [
            ("FPD ×10³ (CaloChallenge)", "fpd", "fpd_err"),
            ("KPD ×10³ (CaloChallenge)", "kpd", "kpd_err"),
            ("AUC low-level", "auc_low", "auc_low_std"),
            ("AUC high-level", "auc_high", "auc_high_std"),
        ]
        for label, key, err in rows:
            if key in m or f"floor/{key}" in m:
                a, b = pm(key, err)
                lines.append(f"| {label} | {a} | {b} |")
        for key in (
            "cls_low/jsd",
            "cls_high/jsd",
            "prdc/precision",
            "prdc/recall",
            "prdc/density",
            "prdc/coverage",
            "response/scale",
            "response/resolution",
            "response/depth_shift",
            "response/radial_width",
            "response/sparsity",
            "response/layer_hits_max_dev",
            "response/layer_width_r_max_dev",
            "sep_power/mean",
        ):
            if key in m or f"floor/{key}" in m:
                lines.append(f"| {key} | {_num(m.get(key))} | {_num(m.get('floor/' + key))} |")

        sep_groups = [g for g in H.GROUPS if f"sep_power/{g}" in m]
        if sep_groups:
            lines += [
                "",
                "## Separation power per HLF group (mean over its histograms)",
                "",
                "Groups named as in the CaloChallenge code use its binning and drop values outside it; "
                "`*_adaptive`, `depth` and `profile_*` are ours (reference-fitted bins; under/overflow "
                "count).",
                "",
                "| group | model | floor | histograms |",
                "| --- | --- | --- | --- |",
            ]
            for g in sep_groups:
                n_h = sum(1 for k in self.hist_sep_power if k.split("/")[0] == g)
                lines.append(
                    f"| {g} | {_num(m[f'sep_power/{g}'])} | {_num(m.get(f'floor/sep_power/{g}'))} | {n_h} |"
                )
            worst = sorted(
                ((v, k) for k, v in self.hist_sep_power.items() if math.isfinite(v)), reverse=True
            )[:10]
            if worst:
                lines += [
                    "",
                    "Largest single-histogram separation powers: "
                    + ", ".join(f"`{k}` {_num(v, 3)}" for v, k in worst),
                ]

        cls_groups = most_telling(m)
        if cls_groups:
            lines += [
                "",
                "## Which features give the model away: a classifier per HLF group (AUC)",
                "",
                "Gradient-boosted trees on each group's columns plus the conditions (`group_classifier.py`); "
                "0.5 = the group looks right given the conditions, jointly over its columns (correlations "
                "included, which the histograms above cannot show). `all`: the whole HLF vector.",
                "",
                "| group | model | floor |",
                "| --- | --- | --- |",
            ]
            for g, auc in cls_groups:
                lines.append(f"| {g} | {_num(auc, 3)} | {_num(m.get(f'floor/{METRIC_PREFIX}{g}'), 3)} |")

        for kind in ("low", "high"):
            qs = [k for k in m if k.startswith(f"cls_{kind}/w_gen_q")]
            if qs:
                lines += [
                    "",
                    f"## {kind.capitalize()}-level classifier weights w = C/(1−C) on generated test showers",
                    "",
                    "| quantile | " + " | ".join(k.rsplit("_q", 1)[1] + "%" for k in qs) + " |",
                    "| --- |" + " --- |" * len(qs),
                    "| w | " + " | ".join(_num(m[k], 3) for k in qs) + " |",
                    "",
                    "fraction with w outside [0.1, 10]: "
                    f"{_num(m.get(f'cls_{kind}/w_gen_frac_outside_0.1_10'), 3)}; "
                    f"best epoch (mean): {_num(m.get(f'cls_{kind}/best_epoch'), 3)}; "
                    f"showers per class in training: {int(m.get(f'cls_{kind}/n_train_per_class', 0))}",
                ]

        groups = i.get("groups", [])
        if groups:
            cols = [
                "sep_power/mean",
                "fpd",
                "kpd",
                "response/scale",
                "response/radial_width",
                "auc_low",
                "auc_high",
            ]
            cols = [c for c in cols if any(c in row for row in groups)]
            lines += [
                "",
                "## Conditional groups (model / floor)",
                "",
                "| group | n sample | n ref | " + " | ".join(cols) + " |",
                "| --- | --- | --- |" + " --- |" * len(cols),
            ]
            for row in groups:
                if "skipped" in row:
                    cells = ["skipped: " + row["skipped"]] + [""] * (len(cols) - 1)
                else:
                    cells = [f"{_num(row.get(c), 3)} / {_num(row.get('floor/' + c), 3)}" for c in cols]
                lines.append(
                    f"| {row['group']} | {row['n_sample']} | {row['n_reference']} | "
                    + " | ".join(cells)
                    + " |"
                )

        plots = i.get("plots", [])
        if plots:
            lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
        timings, cpu = i.get("timings_s", {}), i.get("cpu_timings_s", {})
        if timings:
            lines += ["", "## Timings", "", "| step | wall s | CPU s |", "| --- | --- | --- |"]
            lines += [f"| {k} | {_num(v, 3)} | {_num(cpu.get(k), 3)} |" for k, v in timings.items()]
        return "\n".join(lines) + "\n"
