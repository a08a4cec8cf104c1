"""``EvalConfig``: one frozen, typed config for an evaluation (YAML: ``configs/eval/*.yaml``).

Defaults reproduce the CaloChallenge 2022 recipe where it defines one (classifier: 2 hidden layers of 512,
lr 2·10⁻⁴, batch 1000, 50 epochs; FPD/KPD on the HLF vector; separation power on every HLF histogram);
``configs/eval/ci.yaml`` is a small, fast variant for tests and smoke runs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

MetricName = Literal["sep_power", "response", "fpd", "kpd", "prdc", "cls_low", "cls_high", "cls_groups"]
ALL_METRICS: tuple[MetricName, ...] = (
    "sep_power",
    "response",
    "fpd",
    "kpd",
    "prdc",
    "cls_low",
    "cls_high",
    "cls_groups",
)
CHEAP_METRICS: tuple[MetricName, ...] = ("sep_power", "response", "fpd", "kpd")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _unique(name: str, values: tuple) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: duplicate entries in {list(values)}")


@dataclass(frozen=True)
class FPDConfig:
    """FPD batch sizes (drawn with replacement) from ``min_samples`` to ``max_samples``, regular in 1/N.

    Defaults: the CaloChallenge call ``jetnet.evaluation.fpd(ref, gen, min_samples=10000)`` (jetnet
    defaults max_samples 50000, 10 points, 20 batches). Smaller values estimate the same quantity with a
    larger error."""

    min_samples: int = 10_000
    max_samples: int = 50_000
    num_points: int = 10
    num_batches: int = 20

    def __post_init__(self) -> None:
        _positive(self, "min_samples", "max_samples", "num_batches")
        if self.min_samples < 2:
            raise ValueError(f"min_samples must be >= 2, got {self.min_samples}")
        if self.num_points < 2:
            raise ValueError(f"num_points must be >= 2, got {self.num_points}")
        if self.min_samples > self.max_samples:
            raise ValueError(f"min_samples ({self.min_samples}) must be <= max_samples ({self.max_samples})")


@dataclass(frozen=True)
class KPDConfig:
    """KPD batches (drawn with replacement). Defaults: the CaloChallenge call
    ``jetnet.evaluation.kpd(ref, gen, batch_size=10000)`` (10 batches, polynomial kernel of degree 4)."""

    batch_size: int = 10_000
    num_batches: int = 10
    degree: int = 4

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "num_batches", "degree")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")


@dataclass(frozen=True)
class PRDCConfig:
    k: int = 5
    max_samples: int = 10000  # per set; larger sets are subsampled (seeded)

    def __post_init__(self) -> None:
        _positive(self, "k", "max_samples")


@dataclass(frozen=True)
class ClassifierConfig:
    """Classifier test (official ``--cls_*`` defaults); ``n_seeds`` repetitions give the AUC spread."""

    hidden: int = 512
    n_layers: int = 2
    dropout: float = 0.0
    lr: float = 2e-4
    epochs: int = 50
    batch_size: int = 1000
    patience: int = 10
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    n_seeds: int = 3
    max_showers_per_class: int | None = None
    device: str = "cpu"
    # CPU threads for training; None: 1 thread for small networks (first layer < 10⁶ weights, where
    # thread overhead dominates), torch's default otherwise
    num_threads: int | None = None

    def __post_init__(self) -> None:
        _positive(
            self,
            "hidden",
            "lr",
            "epochs",
            "batch_size",
            "patience",
            "n_seeds",
            "max_showers_per_class",
            "num_threads",
        )
        if self.n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {self.n_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if any(f <= 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"split must be three positive fractions summing to 1, got {self.split}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


@dataclass(frozen=True)
class GroupConfig:
    """Conditional evaluation: metrics per detector, per particle and per incident-energy bin.

    Groups are nested: ``group/<detector>``, ``group/<detector>/<particle>``,
    ``group/<detector>/<particle>/<energy bin>`` (levels that are switched off are skipped). Energy bins
    are ``energy_bin_edges_gev`` when given (showers outside go to ``E_out_of_range``), else ``energy_bins``
    log-spaced bins over the reference range whose first and last bins are open-ended.
    """

    enabled: bool = True
    by_detector: bool = True
    by_particle: bool = True
    energy_bins: int = 3
    energy_bin_edges_gev: tuple[float, ...] = ()
    min_showers: int = 100  # per side; smaller groups are reported with their sizes only
    metrics: tuple[MetricName, ...] = CHEAP_METRICS
    fpd_min_showers: int = 1000  # FPD only where both sides have at least this many showers

    def __post_init__(self) -> None:
        if self.energy_bins < 0:
            raise ValueError(f"energy_bins must be >= 0, got {self.energy_bins}")
        edges = self.energy_bin_edges_gev
        if edges and (len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)) or edges[0] <= 0):
            raise ValueError(f"energy_bin_edges_gev must be > 0 and strictly increasing, got {list(edges)}")
        _positive(self, "min_showers", "fpd_min_showers")
        _unique("groups.metrics", self.metrics)


@dataclass(frozen=True)
class GroupClassifierConfig:
    """The classifier per HLF group (``group_classifier.py``): scikit-learn's
    ``HistGradientBoostingClassifier`` with early stopping on 20 % of its training half."""

    max_iter: int = 200
    learning_rate: float = 0.1
    max_leaf_nodes: int = 31
    max_showers_per_class: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "max_iter", "learning_rate", "max_leaf_nodes", "max_showers_per_class")
        if self.max_leaf_nodes < 2:
            raise ValueError(f"group_classifier.max_leaf_nodes must be >= 2, got {self.max_leaf_nodes}")


@dataclass(frozen=True)
class PlotConfig:
    enabled: bool = True
    layers: tuple[int, ...] = ()  # layers shown for per-layer groups; () = 6 spread over the shower core
    dpi: int = 110

    def __post_init__(self) -> None:
        _positive(self, "dpi")
        if any(z < 0 for z in self.layers):
            raise ValueError(f"plots.layers must be >= 0, got {list(self.layers)}")


@dataclass(frozen=True)
class EvalConfig:
    """Everything an evaluation needs besides the two shower sets."""

    seed: int = 0
    metrics: tuple[MetricName, ...] = ALL_METRICS
    n_bins: int = 50  # per adaptive histogram (capped at max(10, sqrt(N_ref))); official ones: fixed bins
    voxel_bins: int = 49  # log bins of the voxel-energy spectrum (official: np.logspace(..., 50) edges)
    # voxels <= threshold are zeroed in both sets; None: per detector, readout threshold / sampling
    # fraction of caloforge/platform/detectors/<name>.yaml (CaloChallenge ds2: 0.5 keV / 0.033 = 15.15 keV)
    voxel_threshold_mev: float | None = None
    r_edges_mm: tuple[float, ...] | None = None  # mesh radial edges when detectors are not built-in
    # HLF vector of FPD/KPD (always, as the official evaluation), PRDC and the high-level classifier
    hlf_vector: Literal["calochallenge", "extended"] = "calochallenge"
    # PRDC and high-level classifier inputs; FPD/KPD always divide by the reference max |x| (jetnet)
    normalisation: Literal["standardise", "maxabs"] = "standardise"
    # "match": sample conditions must equal the reference's shower by shower (a model evaluated on the
    # reference conditions); "distribution": two independent samples of the same condition distribution
    conditions: Literal["match", "distribution"] = "distribution"
    max_showers: int | None = None  # subsample each set (seeded) before evaluating
    floor: bool = True  # data-vs-data floor: the same metrics between two halves of the reference
    floor_metrics: tuple[MetricName, ...] = ALL_METRICS
    fpd: FPDConfig = field(default_factory=FPDConfig)
    kpd: KPDConfig = field(default_factory=KPDConfig)
    prdc: PRDCConfig = field(default_factory=PRDCConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    group_classifier: GroupClassifierConfig = field(default_factory=GroupClassifierConfig)
    groups: GroupConfig = field(default_factory=GroupConfig)
    plots: PlotConfig = field(default_factory=PlotConfig)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.n_bins < 2 or self.voxel_bins < 2:
            raise ValueError(f"n_bins and voxel_bins must be >= 2, got {self.n_bins}, {self.voxel_bins}")
        if self.voxel_threshold_mev is not None and self.voxel_threshold_mev < 0:
            raise ValueError(f"voxel_threshold_mev must be >= 0, got {self.voxel_threshold_mev}")
        if self.r_edges_mm is not None:
            e = self.r_edges_mm
            if len(e) < 2 or e[0] != 0 or any(b <= a for a, b in itertools.pairwise(e)):
                raise ValueError(f"r_edges_mm must start at 0 and increase strictly, got {list(e)}")
        _positive(self, "max_showers")
        _unique("metrics", self.metrics)
        _unique("floor_metrics", self.floor_metrics)
