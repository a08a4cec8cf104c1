"""The MLflow pyfunc flavour: load by alias with plain ``mlflow.pyfunc.load_model`` and predict showers."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from registry_helpers import MESH

from caloforge.platform.conditioning import Conditions
from caloforge.platform.shower_model import ShowerModel, derive_seeds
from caloforge.registry.card import ConditionRangeWarning
from caloforge.registry.store import RegistryStore

TABLE = {
    "energy_mev": [2e3, 5e4, 9e4],
    "theta_rad": [0.3, 0.5, 0.9],
    "phi_rad": [0.0, 1.0, -2.0],
    "pdg": [11, 211, 22],
    "detector": ["lar-pb", "pbwo4", "lar-pb"],
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path, bundle_dir: Path):
    import shutil

    db = tmp_path_factory.mktemp("pyfunc") / "mlflow.db"
    shutil.copyfile(empty_mlflow_db, db)
    store = RegistryStore(tracking_uri=f"sqlite:///{db}")
    v = store.register_bundle(bundle_dir, kind="base")
    store.promote(v.name, v.version, "champion", "first")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", store.tracking_uri)
    try:
        yield store, mlflow.pyfunc.load_model("models:/caloforge-base@champion")
    finally:
        mp.undo()


def _conditions(table: dict) -> Conditions:
    return Conditions.make(
        table["energy_mev"], table["theta_rad"], table["phi_rad"], table["pdg"], table["detector"]
    )


def test_predict_matches_generate_for_dict_and_dataframe(loaded, bundle_dir: Path) -> None:
    _, pyfunc = loaded
    model = ShowerModel.load(bundle_dir)
    expected = model.generate(_conditions(TABLE), seeds=derive_seeds(0, 3))
    out_dict = pyfunc.predict(TABLE)
    out_df = pyfunc.predict(pd.DataFrame(TABLE))
    assert out_dict.dtype == np.float32
    assert out_dict.shape == (3, int(np.prod(MESH)))
    np.testing.assert_array_equal(out_dict, expected.reshape(3, -1))
    np.testing.assert_array_equal(out_df, out_dict)
    assert (out_dict >= 0).all() and np.isfinite(out_dict).all()


def test_seed_column_and_params(loaded, bundle_dir: Path) -> None:
    _, pyfunc = loaded
    model = ShowerModel.load(bundle_dir)
    seeded = dict(TABLE, seed=[7, 8, 9])
    out = pyfunc.predict(seeded, params={"num_steps": 3, "sampler": "euler"})
    expected = model.generate(_conditions(TABLE), seeds=np.array([7, 8, 9]), num_steps=3, sampler="euler")
    np.testing.assert_array_equal(out, expected.reshape(3, -1))
    # row i depends only on its own seed (up to float rounding of batched kernels)
    single = pyfunc.predict(
        {k: v[1:2] for k, v in seeded.items()}, params={"num_steps": 3, "sampler": "euler"}
    )
    np.testing.assert_allclose(single[0], out[1], rtol=1e-4, atol=1e-6)
    other_seed = pyfunc.predict(TABLE, params={"seed": 1})
    assert not np.array_equal(other_seed, pyfunc.predict(TABLE))


def test_metadata_and_explicit_requirements(loaded) -> None:
    store, pyfunc = loaded
    meta = pyfunc.metadata.metadata["caloforge"]
    assert meta["mesh_shape"] == list(MESH)
    assert meta["detector_index"] == {"lar-pb": 0, "pbwo4": 1}
    assert meta["valid_ranges"]["energy_mev"] == [1000.0, 100000.0]
    root = Path(store.model_artifact_uri("caloforge-base@champion").removeprefix("file://"))
    reqs = (root / "requirements.txt").read_text().split()
    assert "caloforge==0.1.0" in reqs
    assert not any(r.startswith("torch==") for r in reqs)  # never the label-less pin of a local build
    assert (root / "caloforge_shower_model.py").is_file()  # models from code: no pickled python_model
    assert not list(root.rglob("*.pkl"))


def test_bad_input_is_a_clear_error(loaded) -> None:
    _, pyfunc = loaded
    with pytest.raises(mlflow.exceptions.MlflowException, match="detector"):  # MLflow enforces the signature
        pyfunc.predict({k: v for k, v in TABLE.items() if k != "detector"})
    with pytest.raises(ValueError, match=r"unknown detector\(s\) \['atlas-lar'\]"):
        pyfunc.predict(dict(TABLE, detector=["atlas-lar"] * 3))
    with pytest.raises(ValueError, match="energy_mev' must be > 0"):
        pyfunc.predict(dict(TABLE, energy_mev=[-1.0, 1e3, 1e3]))


def test_out_of_range_conditions_warn_or_refuse_with_strict(loaded) -> None:
    _, pyfunc = loaded
    far = dict(TABLE, energy_mev=[5e5, 5e4, 9e4], pdg=[11, 2112, 22])
    with pytest.warns(ConditionRangeWarning, match=r"energy_mev: 1 of 3 value\(s\) outside.*\['n'\]"):
        out = pyfunc.predict(far)
    assert out.shape == (3, int(np.prod(MESH)))
    with pytest.raises(ValueError, match="strict mode"):
        pyfunc.predict(far, params={"strict": True})
