"""The classifier per HLF group (``caloforge.evaluation.group_classifier``): grouping of the HLF vector's
columns, a distorted group found and the others left at 0.5, correlations seen where every marginal
matches, determinism and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from caloforge.evaluation.config import GroupClassifierConfig
from caloforge.evaluation.features import ShowerFeatures
from caloforge.evaluation.group_classifier import group_classifier_aucs, hlf_groups, most_telling

NAMES = ["log10_e_inc", "log10_e_layer_0", "log10_e_layer_1", "width_r_0", "width_r_1", "log10_e_tot"]
CFG = GroupClassifierConfig()


def _names_of_real_vector() -> list[str]:
    n, z = 2, 45
    zeros = np.zeros((n, z))
    f = ShowerFeatures(
        e_inc_mev=np.ones(n),
        e_layer_mev=zeros,
        e_r_mev=np.zeros((n, 9)),
        e_phi_mev=np.zeros((n, 16)),
        ec_x_mm=zeros,
        ec_y_mm=zeros,
        width_x_mm=zeros,
        width_y_mm=zeros,
        ec_r_mm=zeros,
        width_r_mm=zeros,
        sparsity=zeros,
        voxel_counts=np.zeros((n, 3), dtype=np.int32),
        voxel_edges_mev=np.array([0.0, 1.0]),
    )
    return f.vector_names()


def test_groups_of_the_calochallenge_hlf_vector() -> None:
    groups = hlf_groups(_names_of_real_vector())
    per_layer = {"e_layer", "ec_x", "ec_y", "width_x", "width_y", "sparsity", "ec_r", "width_r"}
    assert set(groups) == per_layer | {"e_tot"}
    assert all(len(cols) == 45 for g, cols in groups.items() if g != "e_tot") and len(groups["e_tot"]) == 1
    flat = sorted(c for cols in groups.values() for c in cols)
    assert flat == list(range(1, 2 + 8 * 45))  # every column but log10_e_inc (column 0), once
    assert hlf_groups(NAMES) == {"e_layer": [1, 2], "width_r": [3, 4], "e_tot": [5]}


def _pair(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    e = g.normal(size=(2 * n, 1))
    ref = np.c_[e[:n], g.normal(size=(n, 5))]
    gen = np.c_[e[n:], g.normal(size=(n, 5))]
    return ref, gen


def _no_cond(n: int) -> np.ndarray:
    return np.zeros((n, 0))


def test_a_distorted_group_is_found_and_the_others_stay_at_one_half() -> None:
    n = 4000
    ref, gen = _pair(n, 0)
    gen[:, 3] += gen[:, 0]  # width_r_0 depends on the incident energy in the sample only
    m = group_classifier_aucs(ref, gen, _no_cond(n), _no_cond(n), NAMES, CFG, 0, "test")
    assert set(m) == {"cls_groups/e_layer", "cls_groups/width_r", "cls_groups/e_tot", "cls_groups/all"}
    assert m["cls_groups/width_r"] > 0.68 and m["cls_groups/all"] > 0.65
    telling = most_telling({**m, "floor/cls_groups/e_tot": 0.99, "auc_high": 0.99})
    assert [g for g, _ in telling][:1] in (["width_r"], ["all"]) and len(telling) == 4
    assert [auc for _, auc in telling] == sorted(m.values(), reverse=True)
    for g in ("e_layer", "e_tot"):
        assert 0.45 < m[f"cls_groups/{g}"] < 0.55, (g, m)


def test_correlations_are_seen_where_every_marginal_matches() -> None:
    n = 4000
    ref, gen = _pair(n, 1)
    ref[:, 2] = 0.95 * ref[:, 1] + np.sqrt(1 - 0.95**2) * ref[:, 2]  # layers 0 and 1 move together in data
    assert abs(ref[:, 2].std() - gen[:, 2].std()) < 0.05  # same N(0, 1) marginals
    m = group_classifier_aucs(ref, gen, _no_cond(n), _no_cond(n), NAMES, CFG, 0, "test")
    assert m["cls_groups/e_layer"] > 0.75
    assert 0.45 < m["cls_groups/width_r"] < 0.55


def test_conditions_are_given_to_every_group() -> None:
    """A sample right on average but wrong per particle type is only found with the condition column."""
    n = 4000
    ref, gen = _pair(n, 2)
    g = np.random.default_rng(3)
    pid_ref, pid_gen = g.integers(0, 2, (n, 1)).astype(float), g.integers(0, 2, (n, 1)).astype(float)
    ref[:, 5] = np.where(pid_ref[:, 0] == 1, 1.0, -1.0) + 0.3 * ref[:, 5]
    gen[:, 5] = np.where(pid_gen[:, 0] == 1, -1.0, 1.0) + 0.3 * gen[:, 5]  # swapped between the types
    with_cond = group_classifier_aucs(ref, gen, pid_ref, pid_gen, NAMES, CFG, 0, "test")
    blind = group_classifier_aucs(ref, gen, _no_cond(n), _no_cond(n), NAMES, CFG, 0, "test")
    assert with_cond["cls_groups/e_tot"] > 0.95 and blind["cls_groups/e_tot"] < 0.56


def test_paired_identical_samples_give_one_half() -> None:
    """Shower i of both sets identical (an exported graph against its original): twins share a split."""
    n = 2000
    ref, _ = _pair(n, 5)
    m = group_classifier_aucs(ref, ref.copy(), _no_cond(n), _no_cond(n), NAMES, CFG, 0, "p")
    assert all(v == pytest.approx(0.5, abs=0.02) for v in m.values()), m


def test_same_seed_same_numbers_and_clear_errors() -> None:
    n = 600
    ref, gen = _pair(n, 4)
    a = group_classifier_aucs(ref, gen, _no_cond(n), _no_cond(n), NAMES, CFG, 5, "p")
    b = group_classifier_aucs(ref, gen, _no_cond(n), _no_cond(n), NAMES, CFG, 5, "p")
    assert a == b
    with pytest.raises(ValueError, match="6 HLF columns but 5 names"):
        group_classifier_aucs(ref, gen, _no_cond(n), _no_cond(n), NAMES[:5], CFG, 0, "p")
    with pytest.raises(ValueError, match="hlf shapes"):
        group_classifier_aucs(ref, gen[:, :4], _no_cond(n), _no_cond(n), NAMES, CFG, 0, "p")
    with pytest.raises(ValueError, match="need at least 10"):
        group_classifier_aucs(ref[:9], gen[:9], _no_cond(9), _no_cond(9), NAMES, CFG, 0, "p")
    small = group_classifier_aucs(ref[:12], gen[:12], _no_cond(12), _no_cond(12), NAMES, CFG, 0, "p")
    assert all(0.0 <= v <= 1.0 for v in small.values())  # tiny sets: no early stopping, still an AUC
    with pytest.raises(ValueError, match="max_leaf_nodes"):
        GroupClassifierConfig(max_leaf_nodes=1)
