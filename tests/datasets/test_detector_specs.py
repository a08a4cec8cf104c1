"""A user's detector (a YAML with a mesh unlike the built-ins') keeps its full DetectorSpec from the native
HDF5 file through sharding: ``detectors_json`` in the file, ``Manifest.detector_spec``/``geometry``/
``model_mesh``, and loud errors for conflicting specs or a detector whose geometry is unknown."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import pytest

from caloforge.config import to_dict
from caloforge.datasets.formats import native, read_any
from caloforge.datasets.shards import ShardConfig, SourceSpec, write_shards
from caloforge.platform.geometry import Layer, Mesh, load_detector

CUSTOM_MESH = (10, 8, 4)


def test_native_file_records_and_returns_the_spec(tmp_path: Path, showers_factory, detector_yaml) -> None:
    spec = load_detector(detector_yaml("my-calo", CUSTOM_MESH))
    data = showers_factory(12, CUSTOM_MESH, detector="my-calo")
    path = native.write(tmp_path / "a.h5", data, detectors=[spec])
    with h5py.File(path) as f:
        assert json.loads(f.attrs["detectors_json"]) == {"my-calo": to_dict(spec)}
    assert native.read_detector_specs(path) == {"my-calo": spec}
    # declaring the same YAML when reading is a check; a different spec under that name is an error
    assert len(read_any(path, detector=detector_yaml("my-calo", CUSTOM_MESH))) == 12
    other = tmp_path / "other"
    other.mkdir()
    changed = other / "my-calo.yaml"
    changed.write_text(
        detector_yaml("my-calo", CUSTOM_MESH).read_text().replace("thickness_mm: 1.4", "thickness_mm: 2.0")
    )
    with pytest.raises(ValueError, match=r"records a different DetectorSpec for 'my-calo'"):
        read_any(path, detector=changed)
    # no spec: nothing recorded; a spec of another mesh is refused at writing
    assert native.read_detector_specs(native.write(tmp_path / "b.h5", data, detectors=[])) == {}
    with pytest.raises(ValueError, match=r"detector 'my-calo' has mesh \(10, 8, 4\), the file \(6, 4, 3\)"):
        native.write(tmp_path / "c.h5", showers_factory(4, detector="my-calo"), detectors=[spec])
    assert not (tmp_path / "c.h5").exists()


def test_simulator_metadata_spec_is_recorded_and_read_from_older_files(
    tmp_path: Path, showers_factory, detector_yaml
) -> None:
    spec = load_detector(detector_yaml("my-calo", CUSTOM_MESH))
    data = showers_factory(6, CUSTOM_MESH, detector="my-calo")
    data = type(data)(data.showers_NZPR, data.conditions, "sim", 1, {"detector_spec": to_dict(spec)})
    path = native.write(tmp_path / "sim.h5", data)  # detectors=None: the simulator's metadata spec
    assert native.read_detector_specs(path) == {"my-calo": spec}
    with h5py.File(path, "r+") as f:  # a file written before detectors_json existed
        del f.attrs["detectors_json"]
    assert native.read_detector_specs(path) == {"my-calo": spec}


def test_shard_manifest_records_the_native_files_spec(tmp_path: Path, showers_factory, detector_yaml) -> None:
    spec = load_detector(detector_yaml("my-calo", CUSTOM_MESH))
    path = native.write(tmp_path / "my.h5", showers_factory(40, CUSTOM_MESH, detector="my-calo"), [spec])
    m = write_shards([str(path)], tmp_path / "shards", ShardConfig(showers_per_shard=16))
    assert m.data["detectors"]["my-calo"] == to_dict(spec)
    assert m.detector_spec("my-calo") == spec and m.detector_specs() == {"my-calo": spec}
    assert m.geometry("my-calo") == spec.geometry and m.model_mesh() == spec.geometry
    assert m.model_mesh().r_edges_mm == (0.0, 4.65, 9.3, 13.95, 18.6)


def test_conflicting_specs_and_unknown_geometry_are_errors(
    tmp_path: Path, showers_factory, detector_yaml
) -> None:
    spec = load_detector(detector_yaml("my-calo", CUSTOM_MESH))
    a = native.write(tmp_path / "a.h5", showers_factory(20, CUSTOM_MESH, detector="my-calo"), [spec])
    other = replace(spec, absorber=Layer("W", 2.0))
    b = native.write(tmp_path / "b.h5", showers_factory(20, CUSTOM_MESH, detector="my-calo", seed=1), [other])
    with pytest.raises(ValueError, match=r"b\.h5: detector 'my-calo' comes with a different DetectorSpec"):
        write_shards([str(a), str(b)], tmp_path / "shards")
    assert not (tmp_path / "shards").exists()
    # a custom detector known by name only (no spec): the manifest has its shape, not its geometry
    bare = native.write(tmp_path / "bare.h5", showers_factory(20, detector="det-x"), detectors=[])
    sib = native.write(
        tmp_path / "sib.h5", showers_factory(20, detector="det-y"), [load_detector(detector_yaml("det-y"))]
    )
    m = write_shards([str(bare), str(sib)], tmp_path / "shards2")
    assert m.detector_spec("det-x") is None and list(m.detector_specs()) == ["det-y"]
    with pytest.raises(ValueError, match=r"manifest\.json: detector 'det-x' has no recorded DetectorSpec"):
        m.model_mesh()
    assert m.model_mesh(["det-y"]).shape == (6, 4, 3)


def test_model_mesh_of_detectors_with_different_radial_edges_uses_bin_index(
    tmp_path: Path, showers_factory, detector_yaml
) -> None:
    fesci = load_detector("fe-sci")
    mine = load_detector(detector_yaml("my-calo", fesci.geometry.shape))
    assert mine.geometry.r_edges_mm != fesci.geometry.r_edges_mm
    sources = [
        SourceSpec(native.write(tmp_path / "a.h5", showers_factory(8, fesci.geometry.shape, "fe-sci"), [])),
        SourceSpec(
            native.write(tmp_path / "b.h5", showers_factory(8, mine.geometry.shape, "my-calo"), [mine])
        ),
    ]
    m = write_shards(sources, tmp_path / "shards")
    assert m.detector_spec("fe-sci") == fesci  # built-ins are recorded by name
    assert m.model_mesh() == Mesh(45, 16, tuple(float(i) for i in range(10)))
    assert m.model_mesh(["my-calo"]) == mine.geometry


def test_convert_keeps_or_adds_the_spec(tmp_path: Path, showers_factory, detector_yaml) -> None:
    from caloforge.cli import main
    from caloforge.datasets.formats import calochallenge

    yaml_path = detector_yaml("my-calo", CUSTOM_MESH)
    spec = load_detector(yaml_path)
    data = showers_factory(10, CUSTOM_MESH, detector="my-calo")
    src = native.write(tmp_path / "a.h5", data, [spec])
    assert main(["data", "convert", str(src), str(tmp_path / "b.h5"), "--to", "native"]) == 0
    assert native.read_detector_specs(tmp_path / "b.h5") == {"my-calo": spec}
    cc = calochallenge.write(tmp_path / "cc.h5", data, include_conditions=True)
    args = [
        "data",
        "convert",
        str(cc),
        str(tmp_path / "c.h5"),
        "--detector",
        str(yaml_path),
        "--to",
        "native",
    ]
    assert main(args) == 0
    assert native.read_detector_specs(tmp_path / "c.h5") == {"my-calo": spec}
