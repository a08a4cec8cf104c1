"""Which features give the model away: a classifier per HLF group (ours, not in the CaloChallenge code).

The high-level classifier answers *whether* generated showers can be told from the reference; this test
answers *by what*. For every group of the HLF vector (the 45 layer energies, the 45 radial widths, the 45
sparsities, …) and for the whole vector, a gradient-boosted-tree classifier (scikit-learn's
``HistGradientBoostingClassifier``) is trained on that group's columns plus the incident energy and the
other conditions, on one seeded half of equally many reference (label 1) and generated (label 0) showers,
and its ROC AUC is measured on the other half. An AUC near 0.5 means the group looks right *given the
conditions*, jointly over its columns: a group whose every histogram matches (small separation powers) can
still give the model away through correlations between its columns, which is what this test sees and the
one-dimensional histograms cannot.

Trees, not the official DNN: they need no input scaling, train in seconds on 10,000 showers per class, and
on HLF vectors they are at least as strong (on the CPU-budget fidelity model: 0.996 for the whole vector
where the official DNN reached 0.903), so they bound what a classifier can see from above.

Metrics: ``cls_groups/<group>`` (AUC) for each group of :func:`hlf_groups` and ``cls_groups/all``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from caloforge.evaluation.classifier import auc_score
from caloforge.evaluation.config import GroupClassifierConfig
from caloforge.platform.seeding import derive_seed, rng

log = logging.getLogger("caloforge.evaluation")

METRIC_PREFIX = "cls_groups/"
CONDITION_COLUMN = "log10_e_inc"  # the HLF vector's own condition column, given to every group
MIN_SHOWERS_PER_CLASS = 10
MIN_ROWS_EARLY_STOPPING = 200  # smaller training sets: all max_iter iterations, no validation split


def hlf_groups(names: Sequence[str]) -> dict[str, list[int]]:
    """Column indices of each HLF group, from ``ShowerFeatures.vector_names``: a name ``<group>_<layer>``
    belongs to ``<group>``, any other name (``log10_e_tot``, ``etot_einc``, …) is its own group; the
    condition column ``log10_e_inc`` is in none (every classifier gets it)."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name == CONDITION_COLUMN:
            continue
        stem, _, last = name.rpartition("_")
        key = stem if stem and last.isdigit() else name
        groups.setdefault(key.removeprefix("log10_"), []).append(i)
    return groups


def most_telling(metrics: Mapping[str, float]) -> list[tuple[str, float]]:
    """``(group, AUC)`` of every ``cls_groups/<group>`` in ``metrics`` (not the ``floor/`` ones), the most
    telling (highest AUC) first; ``[]`` when the evaluation did not run this test."""
    found = [(k.removeprefix(METRIC_PREFIX), v) for k, v in metrics.items() if k.startswith(METRIC_PREFIX)]
    return sorted(found, key=lambda item: -item[1])


def group_classifier_aucs(
    hlf_ref: np.ndarray,
    hlf_gen: np.ndarray,
    cond_ref: np.ndarray,
    cond_gen: np.ndarray,
    names: Sequence[str],
    config: GroupClassifierConfig,
    seed: int,
    purpose: str,
) -> dict[str, float]:
    """``{"cls_groups/<group>": AUC, ..., "cls_groups/all": AUC}`` of reference vs generated showers.

    ``hlf_*``: (N, D) HLF vectors with column ``names``; ``cond_*``: (N, C) extra condition columns (angles,
    particle, detector; may have C = 0). Equally many showers of each class (the larger set is subsampled,
    seeded by ``seed`` and ``purpose``), half for training, half for the AUC; reference = label 1, so the
    AUC is P(C(x_ref) > C(x_gen)) as for the DNN.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier  # ~1 s import: only when this runs

    for what, a, b in (("hlf", hlf_ref, hlf_gen), ("conditions", cond_ref, cond_gen)):
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"group classifier: {what} shapes {a.shape} and {b.shape} do not match")
    if hlf_ref.shape[1] != len(names):
        raise ValueError(f"group classifier: {hlf_ref.shape[1]} HLF columns but {len(names)} names")
    if len(hlf_ref) != len(cond_ref) or len(hlf_gen) != len(cond_gen):
        raise ValueError("group classifier: HLF and condition rows differ")
    g = rng(seed, f"cls_groups/{purpose}")
    n = min(len(hlf_ref), len(hlf_gen))
    if config.max_showers_per_class is not None:
        n = min(n, config.max_showers_per_class)
    if n < MIN_SHOWERS_PER_CLASS:
        raise ValueError(
            f"group classifier ({purpose}): {n} showers per class, need at least {MIN_SHOWERS_PER_CLASS}"
        )
    ir = g.permutation(len(hlf_ref))[:n]
    # Equal sets share one permutation and one split, as the DNN test does: for paired samples (shower i
    # of both from the same condition and noise) twins never straddle training and test.
    ig = ir if len(hlf_ref) == len(hlf_gen) else g.permutation(len(hlf_gen))[:n]
    rows = g.permutation(n)
    train_rows, test_rows = rows[: n // 2], rows[n // 2 :]

    def stack(a: np.ndarray, b: np.ndarray, part: np.ndarray) -> np.ndarray:
        return np.concatenate([a[ir[part]], b[ig[part]]]).astype(np.float32)

    x_train, x_test = stack(hlf_ref, hlf_gen, train_rows), stack(hlf_ref, hlf_gen, test_rows)
    c_train, c_test = stack(cond_ref, cond_gen, train_rows), stack(cond_ref, cond_gen, test_rows)
    y_train = np.r_[np.ones(len(train_rows)), np.zeros(len(train_rows))].astype(np.int64)
    y_test = np.r_[np.ones(len(test_rows)), np.zeros(len(test_rows))].astype(np.int64)
    base = [i for i, nm in enumerate(names) if nm == CONDITION_COLUMN]
    groups = {**hlf_groups(names), "all": [i for i, nm in enumerate(names) if nm != CONDITION_COLUMN]}
    out: dict[str, float] = {}
    for name, cols in groups.items():
        clf = HistGradientBoostingClassifier(
            max_iter=config.max_iter,
            learning_rate=config.learning_rate,
            max_leaf_nodes=config.max_leaf_nodes,
            early_stopping=len(y_train) >= MIN_ROWS_EARLY_STOPPING,
            validation_fraction=0.2,
            n_iter_no_change=10,
            random_state=derive_seed(seed, f"cls_groups/{purpose}/{name}") % 2**32,
        )
        clf.fit(np.concatenate([x_train[:, base + cols], c_train], axis=1), y_train)
        scores = clf.predict_proba(np.concatenate([x_test[:, base + cols], c_test], axis=1))[:, 1]
        out[f"{METRIC_PREFIX}{name}"] = auc_score(y_test, scores)
    log.debug("group classifier (%s): %s", purpose, {k: round(v, 3) for k, v in out.items()})
    return out
