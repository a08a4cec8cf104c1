"""The velocity of both denoisers exports to ONNX at opset 18 and matches eager torch in onnxruntime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_models import SMALL_MESH, make_model, toy_showers

from caloforge.platform.conditioning import ConditionTensors
from caloforge.platform.shower_model import ShowerModel

INPUTS = ["x", "t", "energy_mev", "theta_rad", "phi_rad", "particle_idx", "detector_idx"]


class VelocityGraph(torch.nn.Module):
    """What an exporter wraps: plain tensors in, ``ShowerModel.velocity`` out."""

    def __init__(self, model: ShowerModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, t, energy_mev, theta_rad, phi_rad, particle_idx, detector_idx):
        cond = ConditionTensors(energy_mev, theta_rad, phi_rad, particle_idx, detector_idx)
        return self.model.velocity(x, t, cond)


def example(model: ShowerModel, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    showers, cond = toy_showers(n, SMALL_MESH, seed=seed)
    ct = model.encode_conditions(cond)
    t = (
        torch.linspace(0.1, 0.9, n)
        if model.config.parametrisation == "flow_matching"
        else torch.logspace(-2, 1.5, n)
    )
    return (model.to_model_space(showers), t, *(getattr(ct, f) for f in ct.fields()))


def export_and_compare(model: ShowerModel, path: Path, dynamo: bool) -> None:
    import onnx
    import onnxruntime as ort

    graph = VelocityGraph(model).eval()
    args = example(model, 3, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            shapes = {"x": {0: batch}, **{name: {0: batch} for name in INPUTS[1:]}}
            torch.onnx.export(
                graph, args, str(path), opset_version=18, dynamo=True, input_names=INPUTS,
                output_names=["velocity"], dynamic_shapes=shapes, verbose=False,
            )  # fmt: skip
        else:
            axes = {name: {0: "batch"} for name in [*INPUTS, "velocity"]}
            torch.onnx.export(
                graph, args, str(path), opset_version=18, dynamo=False, input_names=INPUTS,
                output_names=["velocity"], dynamic_axes=axes,
            )  # fmt: skip
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) == 18
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, seed in ((3, 1), (5, 2)):  # a different batch size than the export example
        feed_args = example(model, n, seed)
        with torch.no_grad():
            expected = graph(*feed_args).numpy()
        (got,) = session.run(None, {name: a.numpy() for name, a in zip(INPUTS, feed_args, strict=True)})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("objective", ["flow_matching", "edm"])
def test_velocity_exports_with_the_legacy_exporter(objective: str, tmp_path: Path) -> None:
    export_and_compare(make_model(objective), tmp_path / "velocity.onnx", dynamo=False)


@pytest.mark.slow
def test_velocity_exports_with_the_dynamo_exporter(tmp_path: Path) -> None:
    export_and_compare(make_model("edm"), tmp_path / "velocity.onnx", dynamo=True)
