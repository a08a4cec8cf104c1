"""One contract suite for every objective × sampler: what any caller of ``ShowerModel`` may rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_models import SMALL_MESH, make_model, toy_showers

from caloforge.platform.conditioning import Conditions
from caloforge.platform.denoisers import DENOISERS
from caloforge.platform.objectives import OBJECTIVES, make_objective
from caloforge.platform.samplers import SAMPLERS
from caloforge.platform.shower_model import ShowerModel

OBJECTIVE_NAMES = sorted(DENOISERS)  # model parametrisations (each objective trains one of them)
SAMPLER_NAMES = sorted(SAMPLERS)
STEPS = 3
LARGE_MESH = (45, 16, 9)

_models: dict[tuple[str, tuple[int, int, int]], ShowerModel] = {}


def model_for(objective: str, shape: tuple[int, int, int] = SMALL_MESH) -> ShowerModel:
    key = (objective, shape)
    if key not in _models:
        _models[key] = make_model(objective, shape=shape)
    return _models[key]


def conditions(n: int, seed: int = 5) -> Conditions:
    return toy_showers(n, SMALL_MESH, seed)[1]


def assert_same_showers(model: ShowerModel, a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float32 GEMM reduction order (which depends on the batch size on CPU): ≤ 1e-3
    relative in MeV (the inverse transform multiplies model-space differences by σ ≈ 5–10), and a voxel
    within rounding of the readout threshold may be cut in one run and kept in the other."""
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1.05 * model.config.threshold_mev)


class CallCounter:
    """Counts network evaluations through a forward hook on the backbone."""

    def __init__(self, model: ShowerModel) -> None:
        self.calls = 0
        self.handle = model.network.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *_exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("objective", OBJECTIVE_NAMES)
class TestGenerateContract:
    def test_shape_dtype_finite_and_evaluation_count(self, objective: str, sampler: str) -> None:
        model = model_for(objective)
        cond = conditions(5)
        with CallCounter(model) as counter:
            showers = model.generate(cond, num_steps=STEPS, sampler=sampler, seed=1, batch_size=5)
        assert showers.shape == (5, *SMALL_MESH)
        assert showers.dtype == np.float32
        assert np.isfinite(showers).all()
        assert (showers >= 0).all()
        nonzero = showers[showers > 0]
        assert nonzero.size > 0
        assert nonzero.min() >= model.config.threshold_mev * (1 - 1e-6)
        assert counter.calls == SAMPLERS[sampler].nfe(STEPS, model.denoiser.final_singular)

    def test_deterministic_given_seeds(self, objective: str, sampler: str) -> None:
        model = model_for(objective)
        cond = conditions(4)
        seeds = np.array([7, 8, 9, 10], dtype=np.int64)
        a = model.generate(cond, num_steps=STEPS, sampler=sampler, seeds=seeds)
        b = model.generate(cond, num_steps=STEPS, sampler=sampler, seeds=seeds)
        np.testing.assert_array_equal(a, b)
        c = model.generate(cond, num_steps=STEPS, sampler=sampler, seeds=seeds + 100)
        assert not np.allclose(a, c)
        # The default seeds depend on (seed, index) only.
        d = model.generate(cond, num_steps=STEPS, sampler=sampler, seed=3)
        e = model.generate(cond.subset(slice(0, 2)), num_steps=STEPS, sampler=sampler, seed=3)
        assert_same_showers(model, d[:2], e)

    def test_shower_depends_only_on_its_seed(self, objective: str, sampler: str) -> None:
        model = model_for(objective)
        cond = conditions(6)
        seeds = np.arange(100, 106, dtype=np.int64)
        full = model.generate(cond, num_steps=STEPS, sampler=sampler, seeds=seeds, batch_size=6)
        split = model.generate(cond, num_steps=STEPS, sampler=sampler, seeds=seeds, batch_size=4)
        order = np.array([5, 2, 0, 4, 1, 3])
        shuffled = model.generate(cond.subset(order), num_steps=STEPS, sampler=sampler, seeds=seeds[order])
        alone = model.generate(cond.subset(slice(3, 4)), num_steps=STEPS, sampler=sampler, seeds=seeds[3:4])
        for other in (split, shuffled[np.argsort(order)]):
            assert_same_showers(model, full, other)
        assert_same_showers(model, full[3:4], alone)
        # In model space (before the exponential) the agreement is at float32 rounding level.
        with torch.inference_mode():
            ct = model.encode_conditions(cond)
            x_all = model.sample(model.initial_noise(seeds), ct, sampler, STEPS)
            x_one = model.sample(model.initial_noise(seeds[3:4]), ct.index(slice(3, 4)), sampler, STEPS)
        torch.testing.assert_close(x_all[3:4], x_one, rtol=1e-4, atol=1e-4)

    def test_same_weights_serve_two_mesh_sizes(self, objective: str, sampler: str) -> None:
        small = model_for(objective, SMALL_MESH)
        large = model_for(objective, LARGE_MESH)
        large.network.load_state_dict(small.network.state_dict())
        cond = conditions(2)
        for model, shape in ((small, SMALL_MESH), (large, LARGE_MESH)):
            showers = model.generate(cond, num_steps=2, sampler=sampler, seed=0)
            assert showers.shape == (2, *shape)
            assert np.isfinite(showers).all() and (showers >= 0).all()
            assert (showers > 0).any()
        assert large.patch_coords_TC.shape == (15 * 8 * 3, 4)


@pytest.mark.parametrize("objective", sorted(o for o in OBJECTIVES if o in DENOISERS))  # no teacher needed
def test_objective_returns_per_sample_finite_loss_with_gradients(objective: str) -> None:
    model = model_for(objective)
    showers, cond = toy_showers(6, SMALL_MESH, seed=9)
    x1 = model.to_model_space(showers)
    ct = model.encode_conditions(cond)
    model.zero_grad()
    loss = make_objective(objective)(model, x1, ct, torch.Generator().manual_seed(0))
    assert loss.shape == (6,) and loss.dtype == torch.float32
    assert torch.isfinite(loss).all() and (loss > 0).all()
    loss.mean().backward()
    # The objective trains the voxel model (every parameter of it); the layer-energy head's loss is added
    # by the training task (``shower_loss_fn``), so the objective alone leaves the head without gradients.
    assert model.has_energy_head
    voxel = {n: p.grad for n, p in model.named_parameters() if not n.startswith("energy_head.")}
    head = {n: p.grad for n, p in model.named_parameters() if n.startswith("energy_head.")}
    assert voxel and all(g is not None and torch.isfinite(g).all() for g in voxel.values())
    assert head and all(g is None for g in head.values())
    again = make_objective(objective)(model, x1, ct, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss.detach(), again.detach(), rtol=0, atol=0)
    model.zero_grad()


def test_both_objectives_share_one_backbone_state_dict() -> None:
    fm, edm = model_for("flow_matching"), model_for("edm")
    assert fm.state_dict().keys() == edm.state_dict().keys()
    edm_copy = make_model("edm", scramble=False)
    edm_copy.load_state_dict(fm.state_dict(), strict=True)
    for name, tensor in fm.network.state_dict().items():
        torch.testing.assert_close(edm_copy.network.state_dict()[name], tensor, rtol=0, atol=0)
    cond = conditions(2)
    fm_out = fm.generate(cond, num_steps=2, sampler="euler")
    edm_out = edm_copy.generate(cond, num_steps=2, sampler="euler")
    assert fm_out.shape == edm_out.shape == (2, *SMALL_MESH)
