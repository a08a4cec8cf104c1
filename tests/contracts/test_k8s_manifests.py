"""The Kubernetes deployment in ``k8s/`` agrees with the package, its configs and ``k8s/Dockerfile``: the
pretraining RayJob (``k8s/base``) and the adaptation service with MLflow, PostgreSQL and its RayCluster
(``k8s/service``), both rendered by the overlays. The NetworkPolicies are evaluated as Kubernetes does, so the
tests state who may reach whom on which port.

The overlays are rendered in-process by a small renderer that implements exactly the kustomize features
``k8s/`` uses (resources, namespace, configMapGenerator create/replace/merge, images, inline JSON 6902
patches) and fails on anything else rather than guess; when ``kubectl`` is on PATH its ``kubectl kustomize``
output is compared with the renderer's. Nothing here builds the image, pulls anything or talks to a cluster.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from caloforge.cli import build_parser, main
from caloforge.config import load_config
from caloforge.environment import DEFAULT_ENV, free_port
from caloforge.pretrain.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = K8S / "base"
SERVICE = K8S / "service"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [BASE, *OVERLAYS]  # those with the pretraining RayJob
RENDERED = [BASE, SERVICE, *OVERLAYS]  # every kustomization of k8s/
DOCKERFILE = K8S / "Dockerfile"
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard / job API, Ray client
DASHBOARD_PORT = 8265
OPERATOR_LABELS = {"app.kubernetes.io/component": "kuberay-operator"}
GPU = "nvidia.com/gpu"


def _id(kdir: Path) -> str:
    """``overlays/gpu``: a bare ``gpu`` id would count as the gpu marker (skipped without CUDA)."""
    return kdir.relative_to(K8S).as_posix()


overlays = pytest.mark.parametrize("kdir", OVERLAYS, ids=_id)
all_kustomizations = pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=_id)
everything = pytest.mark.parametrize("kdir", RENDERED, ids=_id)
with_service = pytest.mark.parametrize("kdir", [SERVICE, *OVERLAYS], ids=_id)


# -- a minimal kustomize ----------------------------------------------------------------------------------
SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "labels",  # not rendered: they reach metadata only; the RayJob's pod templates set theirs (checked below)
    "resources",
    "generatorOptions",
    "configMapGenerator",
    "images",
    "patches",
}


def kustomization(kdir: Path) -> dict[str, Any]:
    return yaml.safe_load((kdir / "kustomization.yaml").read_text())


def _plain(doc: Any) -> Any:
    """A copy without YAML aliases (rayjob.yaml shares env/mounts/volumes between head and workers)."""
    return json.loads(json.dumps(doc))


def _file_sources(kdir: Path, entry: dict[str, Any]) -> list[tuple[str, Path]]:
    out = []
    for spec in entry.get("files", []):
        key, sep, rel = spec.partition("=")
        if not sep:
            key, rel = Path(spec).name, spec
        out.append((key, kdir / rel))
    return out


def _configmap(kdir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    data = {key: path.read_text() for key, path in _file_sources(kdir, entry)}
    for literal in entry.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": entry["name"]}, "data": data}


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container anywhere in a resource (what kustomize's image transformer rewrites in a CR)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _containers(value)


def split_image(ref: str) -> tuple[str, str | None]:
    """``(name, tag)`` of an image reference (a ``@sha256:…`` digest is dropped: see :func:`image_digest`)."""
    ref = ref.partition("@")[0]
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return ref, None
    return name, tag


def image_digest(ref: str) -> str | None:
    return ref.partition("@")[2] or None


def _set_image(docs: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    """kustomize's ``images`` entry: newName, newTag, digest (rendered ``name:tag@digest``)."""
    for doc in docs:
        for container in _containers(doc):
            name, tag = split_image(container["image"])
            digest = image_digest(container["image"])
            if name == entry["name"]:
                tag = entry.get("newTag", tag)
                digest = entry.get("digest", digest)
                container["image"] = (
                    entry.get("newName", name) + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
                )


def _json_patch(doc: dict[str, Any], op: dict[str, Any]) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent: Any = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last, kind = parts[-1], op["op"]
    assert kind in ("add", "replace", "remove"), f"JSON patch op {kind!r} is not rendered by this test"
    if isinstance(parent, list):
        if kind == "add":
            parent.insert(len(parent) if last == "-" else int(last), op["value"])
            return
        index = int(last)
        assert index < len(parent), f"{op['path']}: no such element"
    else:
        index = last
        assert kind == "add" or index in parent, f"{op['path']}: no such field to {kind}"
    if kind == "remove":
        del parent[index]
    else:
        parent[index] = op["value"]


def _apply_patch(docs: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    assert set(patch) == {"target", "patch"}, f"only inline patches with a target are rendered here: {patch}"
    target = patch["target"]
    assert set(target) <= {"kind", "name"}, f"patch target {target}: only kind/name are rendered here"
    ops = yaml.safe_load(patch["patch"])
    assert isinstance(ops, list), "only JSON 6902 patches are rendered here (no strategic merge)"
    matched = [
        d
        for d in docs
        if d["kind"] == target.get("kind", d["kind"]) and d["metadata"]["name"] == target.get("name", "")
    ]
    assert len(matched) == 1, f"patch target {target} matches {len(matched)} resources"
    for op in ops:
        _json_patch(matched[0], op)


def render(kdir: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize --load-restrictor LoadRestrictionsNone kdir`` for the features k8s/ uses."""
    k = kustomization(kdir)
    assert set(k) <= SUPPORTED_KEYS, f"{kdir}: kustomize fields {set(k) - SUPPORTED_KEYS} not rendered here"
    docs: list[dict[str, Any]] = []
    for resource in k.get("resources", []):
        path = kdir / resource
        if path.is_dir():
            docs += render(path)
        else:
            docs += [_plain(d) for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in k.get("configMapGenerator", []):
        behavior = entry.get("behavior", "create")
        existing = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == entry["name"]]
        cm = _configmap(kdir, entry)
        if behavior == "create":
            assert not existing, f"{kdir}: ConfigMap {entry['name']} generated twice"
            docs.append(cm)
        else:
            assert existing, f"{kdir}: behavior {behavior} for ConfigMap {entry['name']} missing in the base"
            if behavior == "replace":
                docs[docs.index(existing[0])] = cm
            else:
                assert behavior == "merge", behavior
                existing[0]["data"].update(cm["data"])
    for entry in k.get("images", []):
        _set_image(docs, entry)
    for patch in k.get("patches", []):
        _apply_patch(docs, patch)
    if "namespace" in k:
        for d in docs:
            d["metadata"]["namespace"] = k["namespace"]
    return docs


# -- accessors ---------------------------------------------------------------------------------------------
def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_templates(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    out = {"head": cluster["headGroupSpec"]["template"], "submitter": job["spec"]["submitterPodTemplate"]}
    for group in cluster["workerGroupSpecs"]:
        out[f"worker:{group['groupName']}"] = group["template"]
    return out


def worker_group(job: dict[str, Any]) -> dict[str, Any]:
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert len(groups) == 1, "one worker group per RayJob"
    return groups[0]


def container(template: dict[str, Any]) -> dict[str, Any]:
    containers = template["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def workload_pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template of the rendering, by role (``Deployment/mlflow``, ``RayCluster/NAME:head``, ...);
    fails on a resource with containers that it does not know how to read."""
    out: dict[str, dict[str, Any]] = {}
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in WORKLOADS:
            out[f"{kind}/{name}"] = d["spec"]["template"]
        elif kind == "RayJob":
            out.update({f"RayJob/{name}:{role}": t for role, t in pod_templates(d).items()})
        elif kind == "RayCluster":
            out[f"RayCluster/{name}:head"] = d["spec"]["headGroupSpec"]["template"]
            for group in d["spec"]["workerGroupSpecs"]:
                out[f"RayCluster/{name}:worker:{group['groupName']}"] = group["template"]
        else:
            assert not list(_containers(d)), f"{kind}/{name}: pods of this kind are not checked here"
    return out


def service_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "caloforge-service")["spec"]["template"]


def container_ports(template: dict[str, Any]) -> dict[str | int, int]:
    """containerPort by name and by number."""
    ports: dict[str | int, int] = {}
    for c in _containers(template):
        for p in c.get("ports", []):
            ports[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                ports[p["name"]] = p["containerPort"]
    return ports


def resolve_port(template: dict[str, Any], port: str | int) -> int:
    ports = container_ports(template)
    assert port in ports, f"port {port!r} is not a container port ({sorted(map(str, ports))})"
    return ports[port]


def arg_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} once in {argv}"
    return argv[argv.index(flag) + 1]


def mounted_file(docs: list[dict[str, Any]], template: dict[str, Any], path: str) -> str:
    """The text of the ConfigMap key a container sees at ``path``."""
    mount, volume = mount_for(template, path)
    assert mount.get("readOnly") is True, f"{path}: configuration is mounted read-only"
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    return cm["data"][Path(path).relative_to(mount["mountPath"]).as_posix()]


def service_for(docs: list[dict[str, Any]], url_or_host: str) -> tuple[dict[str, Any], int]:
    """The Service a client URL (``http://name[.namespace.svc…]:port``) resolves to, and its port; a namespace
    in the name must be the rendering's."""
    host, _, port = (url_or_host.split("://", 1)[-1].split("/", 1)[0]).partition(":")
    name, *rest = host.split(".")
    if rest:
        namespace = {d["metadata"].get("namespace") for d in docs}
        assert rest[1:2] == ["svc"] and {rest[0]} == namespace, f"{host}: not a Service of {namespace}"
    svc = one(docs, "Service", name)
    ports = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
    assert len(ports) == 1, f"Service {name} has no port {port}"
    return svc, int(port)


def backing_pod(docs: list[dict[str, Any]], svc: dict[str, Any], port: int) -> tuple[str, int]:
    """The one workload a Service selects and the container port its ``port`` reaches."""
    pods = workload_pods(docs)
    selected = [r for r, t in pods.items() if svc["spec"]["selector"].items() <= labels_of(t).items()]
    assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {selected}"
    (entry,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    return selected[0], resolve_port(pods[selected[0]], entry.get("targetPort", port))


def labels_of(template: dict[str, Any]) -> dict[str, str]:
    return template.get("metadata", {}).get("labels", {})


def cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def entrypoint_args(job: dict[str, Any]) -> argparse.Namespace:
    """The RayJob's entrypoint parsed by the real ``caloforge`` CLI parser (flags must exist)."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "caloforge"
    return build_parser().parse_args(argv[1:])


def mount_for(template: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volumeMount of the template's container that holds ``path``, and its volume."""
    mounts = [m for m in container(template)["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    assert len(mounts) == 1, f"{path} is under {len(mounts)} mounts"
    volume = [v for v in template["spec"]["volumes"] if v["name"] == mounts[0]["name"]]
    assert len(volume) == 1
    return mounts[0], volume[0]


def mounted_config(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[argparse.Namespace, Path]:
    """The entrypoint's arguments and a copy of the config file the driver (on the head) reads."""
    job = one(docs, "RayJob")
    args = entrypoint_args(job)
    _, volume = mount_for(pod_templates(job)["head"], args.config)
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    path = tmp_path / "pretrain.yaml"
    path.write_text(cm["data"][Path(args.config).name])
    return args, path


def load_mounted(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[argparse.Namespace, PretrainConfig]:
    args, path = mounted_config(docs, tmp_path)
    return args, load_config(PretrainConfig, path, args.overrides)


def env_of(template: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(template).get("env", [])}


def dockerfile_args() -> dict[str, str]:
    """Global ``ARG NAME=default`` values (before the first FROM), defaults expanded."""
    values: dict[str, str] = {}
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("FROM "):
            break
        if m := re.match(r"ARG (\w+)=(\S+)$", line):
            values[m[1]] = expand(m[2], values)
    return values


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line[:-1] if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# -- the kustomizations ------------------------------------------------------------------------------------
@everything
def test_kustomization_sources_exist(kdir: Path):
    """Every resource is a file or a kustomization directory; every ConfigMap file source (relative to the
    kustomization, as kustomize resolves it) is a file of this repository."""
    k = kustomization(kdir)
    assert k["resources"], f"{kdir}: no resources"
    for resource in k["resources"]:
        path = kdir / resource
        assert path.is_file() or (path / "kustomization.yaml").is_file(), (
            f"{kdir}: missing resource {resource}"
        )
    for entry in k.get("configMapGenerator", []):
        for key, path in _file_sources(kdir, entry):
            assert path.is_file(), f"{kdir}: ConfigMap {entry['name']} key {key}: {path} does not exist"
            assert path.resolve().is_relative_to(ROOT)


def test_configmap_names_are_stable():
    """The RayJob is a custom resource: kustomize does not rewrite ConfigMap names inside it, so generated
    names must carry no hash suffix, and every ConfigMap the RayJob refers to must be generated, with the
    keys it reads."""
    assert kustomization(BASE)["generatorOptions"]["disableNameSuffixHash"] is True
    assert kustomization(SERVICE)["generatorOptions"]["disableNameSuffixHash"] is True  # the RayCluster
    for kdir in OVERLAYS:
        assert kustomization(kdir).get("generatorOptions", {}).get("disableNameSuffixHash", True) is True
    for kdir in KUSTOMIZATIONS:
        docs = render(kdir)
        generated = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
        refs = 0
        for role, template in pod_templates(one(docs, "RayJob")).items():
            for volume in template["spec"].get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in generated, f"{kdir} {role}: {volume}"
                    refs += 1
            for value in env_of(template).values():
                if isinstance(value, dict) and "configMapKeyRef" in value:
                    ref = value["configMapKeyRef"]
                    assert ref["key"] in generated.get(ref["name"], {}), f"{kdir} {role}: {ref}"
                    refs += 1
        assert refs >= 3, f"{kdir}: expected the config volume and the env ConfigMap to be referenced"


# -- the mounted pretraining config -----------------------------------------------------------------------
@overlays
def test_entrypoint_reads_the_mounted_config(kdir: Path, tmp_path: Path):
    """The entrypoint is a valid ``caloforge pretrain`` command whose --config is the file the head mounts
    from the generated ConfigMap (the driver runs on the head), carrying a config of configs/pretrain/."""
    docs = render(kdir)
    job = one(docs, "RayJob")
    args = entrypoint_args(job)
    assert args.command == "pretrain"
    assert args.config == "/etc/caloforge/pretrain.yaml"
    assert args.resume_if_exists, "a retried submitter must continue the run, not fail on it"
    for role, template in pod_templates(job).items():
        if role == "submitter":
            continue
        mount, volume = mount_for(template, args.config)
        assert mount["mountPath"] == "/etc/caloforge" and mount.get("readOnly") is True
        assert volume["configMap"]["name"] == "caloforge-pretrain-config"
    _, path = mounted_config(docs, tmp_path)
    sources = {p.name: p.read_text() for p in (ROOT / "configs" / "pretrain").glob("*.yaml")}
    assert path.read_text() in sources.values()
    expected = {"gpu": "s_6det.yaml", "cpu-debug": "debug.yaml"}.get(kdir.name)  # as docs/pretraining.md says
    if expected:
        assert path.read_text() == sources[expected]


@overlays
def test_mounted_config_passes_the_cli_dry_run(kdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """The entrypoint, run as ``--dry-run`` on the mounted config: strict loading with its --set overrides,
    the field checks and the DeepSpeed config generation pass (the checks that need the shard set or GPUs
    run in the driver on the cluster). Run and data paths resolve onto the shared volume."""
    docs = render(kdir)
    job = one(docs, "RayJob")
    args, path = mounted_config(docs, tmp_path)
    argv = shlex.split(job["spec"]["entrypoint"])[1:]
    i = argv.index("--config")
    argv[i + 1] = str(path)
    assert main([*argv, "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    cfg = load_config(PretrainConfig, path, args.overrides)
    assert resolved["cluster"]["num_workers"] == cfg.cluster.num_workers
    assert cfg.loop.micro_batch_size(cfg.cluster.num_workers) >= 1

    head = pod_templates(job)["head"]
    shared_mount, shared = mount_for(head, resolved["cluster"]["storage_path"])
    assert shared_mount["mountPath"] == "/mnt/caloforge"
    pvc = one(docs, "PersistentVolumeClaim", shared["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "head and every worker mount the run storage"
    # the run name is the config's: a re-applied RayJob resumes its own run, not another config's
    assert args.run_name == cfg.name
    # $CALOFORGE_HOME, where the driver caches a data.simulate shard set, is the shared volume on every Ray
    # pod, so the workers stream what the driver wrote; an explicit shard set lives there too
    ray_pods = [t for role, t in pod_templates(job).items() if role != "submitter"]
    assert {env_of(t)["CALOFORGE_HOME"] for t in ray_pods} == {shared_mount["mountPath"]}
    if cfg.data.shards is not None:
        assert Path(str(cfg.data.shards)).is_relative_to(shared_mount["mountPath"])


# -- Ray version and image ---------------------------------------------------------------------------------
def test_one_ray_version_everywhere():
    """rayVersion of the RayJob = the Ray this package is tested with = the Dockerfile's RAY_VERSION, and
    every rayproject/ray base image the Dockerfile can name carries that version."""
    import ray

    version = one(render(BASE), "RayJob")["spec"]["rayClusterSpec"]["rayVersion"]
    assert version == ray.__version__
    args = dockerfile_args()
    assert args["RAY_VERSION"] == version
    froms = [expand(rest, args) for word, rest in dockerfile_instructions() if word == "FROM"]
    assert froms and all(f.startswith(f"rayproject/ray:{version}-") for f in froms), froms
    for ray_tag in re.findall(r"rayproject/ray:(\S+)", expand(DOCKERFILE.read_text(), args)):
        assert ray_tag.startswith(f"{version}-"), ray_tag
    # the GPU build selects the base's CUDA variant and torch's wheel index with one build argument
    assert args["BASE"].endswith(f"-{args['ACCELERATOR']}")
    index = [rest for word, rest in dockerfile_instructions() if rest.startswith("TORCH_INDEX_URL=")]
    assert index == ["TORCH_INDEX_URL=https://download.pytorch.org/whl/${ACCELERATOR}"]


def test_dockerfile_builds_like_the_makefile():
    """torch, then DeepSpeed without prebuilt ops and without build isolation, then the package itself
    (not editable); telemetry off as in the CLI's defaults and the RayJob; a smoke check; user ray."""
    runs = [rest for word, rest in dockerfile_instructions() if word == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    ds_step = next(i for i, r in enumerate(runs) if "deepspeed==" in r)
    pkg_step = next(i for i, r in enumerate(runs) if re.search(r"pip install .* \.( |$)", r))
    assert torch_step < ds_step < pkg_step
    assert "DS_BUILD_OPS=0" in runs[ds_step] and "--no-build-isolation" in runs[ds_step]
    assert " -e " not in runs[pkg_step] and "--editable" not in runs[pkg_step]
    smoke = runs[-1]
    assert "caloforge --help" in smoke and "import caloforge, ray, deepspeed, torch" in smoke

    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in rest.split()))
    telemetry = {"MLFLOW_DISABLE_TELEMETRY", "ORT_DISABLE_TELEMETRY", "RAY_USAGE_STATS_ENABLED"}
    assert {k: env.get(k) for k in telemetry} == {k: DEFAULT_ENV[k] for k in telemetry}
    for role, template in pod_templates(one(render(BASE), "RayJob")).items():
        for key, value in env_of(template).items():
            if key in telemetry:
                assert value == env[key], f"{role}: {key}={value!r}, the image sets {env[key]!r}"

    users = [rest for word, rest in dockerfile_instructions() if word == "USER"]
    assert users and users[-1] == "ray"


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore matching (root-relative patterns, ``**/`` for any depth, a match excludes a whole
    directory); negations are not used in this repository's file."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pattern[3:]) for p in prefixes):
                return True
        elif any(fnmatch.fnmatchcase(p, pattern.strip("/")) for p in prefixes):
            return True
    return False


def test_dockerignore_keeps_the_sources_and_drops_local_state():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    sources = []
    for word, rest in dockerfile_instructions():
        if word == "COPY":
            words = [w for w in rest.split() if not w.startswith("--")]
            sources += words[:-1]
    assert set(sources) == {"pyproject.toml", "README.md", "caloforge", "configs"}
    for source in sources:
        assert (ROOT / source).exists(), source
        files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*")
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if f.is_file() and "__pycache__" not in rel:
                assert not _ignored(rel, patterns), f"{rel} is needed by the image but .dockerignore drops it"
    for local in (".venv", ".git", "tests", "benchmarks/results", "runs", "mlruns", "outputs", ".whl"):
        assert _ignored(local, patterns), local
    assert _ignored("caloforge/__pycache__/cli.cpython-312.pyc", patterns)


@overlays
def test_overlays_retag_the_base_image(kdir: Path, tmp_path: Path):
    """Every container of the RayJob names the base's image placeholder; the base maps it to the registry
    image tagged with the package version; an overlay only retags that image (-cudaNN for GPU configs)."""
    base_images = kustomization(BASE)["images"]
    names = {e["name"] for e in base_images}
    raw_job = next(yaml.safe_load_all((BASE / "rayjob.yaml").read_text()))
    assert {c["image"] for c in _containers(raw_job)} <= names
    (base_image,) = base_images
    repository = base_image["newName"]
    assert base_image["newTag"] == project_version()
    retags = kustomization(kdir).get("images", [])
    assert all(e["name"] == repository and "newName" not in e for e in retags), retags
    docs = render(kdir)
    images = {c["image"] for c in _containers(one(docs, "RayJob"))}
    assert len(images) == 1, images
    name, tag = split_image(images.pop())
    assert name == repository
    _, cfg = load_mounted(docs, tmp_path)
    m = re.fullmatch(rf"{re.escape(project_version())}(-cuda\d+)?", tag or "")
    assert m is not None, tag
    assert bool(m[1]) == cfg.cluster.use_gpu, f"{kdir.name}: tag {tag} for use_gpu={cfg.cluster.use_gpu}"


# -- cluster shape -----------------------------------------------------------------------------------------
@all_kustomizations
def test_head_runs_no_training(kdir: Path):
    job = one(render(kdir), "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    resources = container(head["template"])["resources"]
    assert GPU not in resources.get("requests", {}) and GPU not in resources.get("limits", {})


@overlays
def test_worker_group_matches_the_config(kdir: Path, tmp_path: Path):
    """Replicas × Ray Train workers per pod = cluster.num_workers; GPUs per pod = the workers' GPUs; the
    pod's CPU limit (Ray's num-cpus on the pod) covers its workers' cpus_per_worker."""
    docs = render(kdir)
    _, cfg = load_mounted(docs, tmp_path)
    c = cfg.cluster
    group = worker_group(one(docs, "RayJob"))
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], "a fixed-size training group"
    resources = container(group["template"])["resources"]
    gpus = int(resources["limits"].get(GPU, 0))
    assert int(resources["requests"].get(GPU, 0)) == gpus
    if c.use_gpu:
        assert gpus > 0 and gpus % c.gpus_per_worker == 0
        per_pod = int(gpus // c.gpus_per_worker)
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == GPU for t in tolerations)
    else:
        assert gpus == 0
        per_pod = 1
    assert group["replicas"] * per_pod == c.num_workers
    assert cpus(resources["limits"]["cpu"]) >= per_pod * c.cpus_per_worker
    if kdir.name == "gpu":  # the documented production shape: 4 pods × 1 GPU
        assert (group["replicas"], gpus) == (4, 1) == (c.num_workers, c.gpus_per_worker)


# -- network exposure --------------------------------------------------------------------------------------
OPERATOR_NAMESPACE = {"kubernetes.io/metadata.name": "kuberay-system"}
DNS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
MLFLOW_PEER = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}
PRETRAIN_LABELS = {"app.kubernetes.io/part-of": "caloforge", "app.kubernetes.io/component": "pretrain"}
PRETRAIN_POLICY = "caloforge-ray-internal"


@all_kustomizations
def test_network_policy_admits_caloforge_and_the_operator_only(kdir: Path):
    """The pretraining policy selects every pod of the RayJob (head, workers, submitter) and no other; it
    admits all ports from those pods and only the dashboard port from the KubeRay operator of one namespace
    (which polls the job's status there) — never an operator-labelled pod of any other namespace."""
    docs = render(kdir)
    policy = one(docs, "NetworkPolicy", PRETRAIN_POLICY)["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    selector = policy["podSelector"]["matchLabels"]
    assert selector == PRETRAIN_LABELS
    for role, template in workload_pods(docs).items():
        covered = selector.items() <= labels_of(template).items()
        assert covered == role.startswith("RayJob/"), f"{role}: covered by the pretraining policy: {covered}"
    own, operator = [], []
    for rule in policy["ingress"]:
        for peer in rule["from"]:
            if peer == {"podSelector": {"matchLabels": selector}}:
                own.append(rule)
            else:
                assert set(peer) == {"namespaceSelector", "podSelector"}, peer
                assert peer["namespaceSelector"] == {"matchLabels": OPERATOR_NAMESPACE}, peer
                assert peer["podSelector"]["matchLabels"] == OPERATOR_LABELS, peer
                assert rule.get("ports") == [{"protocol": "TCP", "port": DASHBOARD_PORT}], rule
                operator.append(rule)
    assert len(own) == 1 and "ports" not in own[0]
    assert len(operator) == 1


@all_kustomizations
def test_network_policy_egress_is_own_pods_dns_and_mlflow_only(kdir: Path):
    policy = one(render(kdir), "NetworkPolicy", PRETRAIN_POLICY)["spec"]
    rules = {json.dumps(r["to"], sort_keys=True): r.get("ports") for r in policy["egress"]}
    own = json.dumps([{"podSelector": {"matchLabels": policy["podSelector"]["matchLabels"]}}], sort_keys=True)
    assert rules.pop(own) is None  # all ports between CaloForge's own pods
    assert rules.pop(json.dumps([DNS_PEER], sort_keys=True)) == [
        {"protocol": "UDP", "port": 53},
        {"protocol": "TCP", "port": 53},
    ]
    assert rules.pop(json.dumps([MLFLOW_PEER], sort_keys=True)) == [{"protocol": "TCP", "port": 5000}]
    assert rules == {}, f"unexpected egress: {rules}"
    for rule in policy["egress"]:
        for peer in rule["to"]:
            assert "ipBlock" not in peer, "no egress to address blocks (the internet)"


@everything
def test_pods_run_unprivileged_on_a_read_only_root(kdir: Path):
    """Every pod of every workload (RayJob, RayCluster, the service, MLflow, PostgreSQL): non-root with an
    explicit uid, seccomp RuntimeDefault; every container: no privilege escalation, read-only root
    filesystem, all capabilities dropped; TMPDIR is a size-limited emptyDir (ZeRO staging, Ray's session);
    every writable emptyDir is bounded; no pod gets a service-account token it does not use."""
    docs = render(kdir)
    pods = workload_pods(docs)
    assert pods
    for role, template in pods.items():
        spec = template["spec"]
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, role
        assert isinstance(pod.get("runAsUser"), int) and pod["runAsUser"] > 0, role
        if not role.startswith("RayJob/"):  # the submitter's Job and KubeRay's pods are the operator's
            assert spec.get("automountServiceAccountToken") is False, role
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, role
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        kind, _, name = role.partition("/")
        if kind == "StatefulSet":  # its claim templates are volumes of each pod
            for claim in one(docs, kind, name)["spec"].get("volumeClaimTemplates", []):
                volumes[claim["metadata"]["name"]] = {"persistentVolumeClaim": claim["spec"]}
        for c in _containers(template):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (role, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (role, c["name"])
            assert sc.get("privileged", False) is False, (role, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (role, c["name"])
            assert not sc.get("capabilities", {}).get("add"), (role, c["name"])
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            tmp = env.get("TMPDIR", "/tmp")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert tmp in mounts, f"{role}: TMPDIR {tmp} is not a volume (read-only root)"
            volume = volumes[mounts[tmp]]
            assert "emptyDir" in volume and volume["emptyDir"].get("sizeLimit"), (role, volume)
            for path, name in mounts.items():  # every writable mount is bounded or the shared volume
                v = volumes[name]
                if "emptyDir" in v:
                    assert v["emptyDir"].get("sizeLimit"), (role, path)


THIRD_PARTY_TAG = r"\d+\.\d+(\.\d+)?(-[a-z0-9.]+)?"  # a release, never `latest` or a bare major version


@overlays
def test_overlays_pin_the_image_by_digest(kdir: Path):
    """Deployments pull ``repository:tag@sha256:…``: a pushed-over tag cannot change what runs. Until the
    release image is pushed the digest is the documented all-zero placeholder (a pull fails closed). Every
    container runs the CaloForge image so pinned, except third-party images pinned to a release tag."""
    entries = kustomization(kdir).get("images", [])
    assert entries and all(re.fullmatch(r"sha256:[0-9a-f]{64}", e.get("digest", "")) for e in entries), (
        entries
    )
    repository = kustomization(BASE)["images"][0]["newName"]
    third_party = set()
    for role, template in workload_pods(render(kdir)).items():
        for c in _containers(template):
            name, tag = split_image(c["image"])
            if name == repository:
                assert re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", c["image"]), (role, c["image"])
            else:
                assert "." in name.split("/")[0], f"{role}: {c['image']}: name the registry"
                assert tag and re.fullmatch(THIRD_PARTY_TAG, tag), f"{role}: {c['image']} is not pinned"
                third_party.add(name)
    assert third_party <= {"docker.io/library/postgres"}, third_party
    text = (kdir / "kustomization.yaml").read_text()
    if "sha256:" + "0" * 64 in text:
        assert "PLACEHOLDER" in text and "docker buildx imagetools inspect" in text


@everything
def test_no_public_exposure_of_ray_ports(kdir: Path):
    """No Ingress, LoadBalancer or NodePort Service, public Ray head service, host network or host port:
    everything is reached through ClusterIP Services (or kubectl port-forward)."""
    docs = render(kdir)
    heads = [d["spec"]["rayClusterSpec"]["headGroupSpec"] for d in docs if d["kind"] == "RayJob"]
    heads += [d["spec"]["headGroupSpec"] for d in docs if d["kind"] == "RayCluster"]
    assert heads
    exposed = [d["kind"] for d in docs if d["kind"] in ("Ingress", "Route", "Gateway", "HTTPRoute")]
    exposed += [
        f"Service/{d['metadata']['name']}"
        for d in docs
        if d["kind"] == "Service" and d["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort")
    ]
    for head in heads:
        assert {p["containerPort"] for p in container(head["template"]).get("ports", [])} >= RAY_PORTS
        if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
            exposed.append("head service")
    for role, template in workload_pods(docs).items():
        if template["spec"].get("hostNetwork"):
            exposed.append(f"{role}: hostNetwork")
        for c in _containers(template):
            exposed += [f"{role}: hostPort {p['hostPort']}" for p in c.get("ports", []) if "hostPort" in p]
    assert exposed == []


# -- NetworkPolicies, evaluated -----------------------------------------------------------------------------
OTHER_PORT = 12345  # "any other port" of a pod
DNS_LABELS = {"k8s-app": "kube-dns"}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector {selector}: only matchLabels is evaluated here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_admits(peer: dict[str, Any], policy_ns: str, pod: dict[str, Any]) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"peer {peer}: no ipBlock (no address ranges)"
    if "namespaceSelector" in peer:
        in_ns = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": pod["namespace"]})
    else:
        in_ns = pod["namespace"] == policy_ns
    return in_ns and _selects(peer.get("podSelector", {}), pod["labels"])


def _rule_admits(rule: dict[str, Any], side: str, policy_ns: str, peer: dict[str, Any], port: int) -> bool:
    peers = rule.get(side)
    if peers is not None and not any(_peer_admits(p, policy_ns, peer) for p in peers):
        return False
    ports = rule.get("ports")
    return ports is None or any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports)


def _direction_admits(
    policies: list[dict[str, Any]], pod: dict[str, Any], peer: dict[str, Any], port: int, direction: str
) -> bool:
    """Kubernetes' semantics: a pod no policy selects (for this direction) is open; a selected pod admits
    exactly the union of the rules of the policies that select it."""
    key, side = {"Ingress": ("ingress", "from"), "Egress": ("egress", "to")}[direction]
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod["namespace"]
        and _selects(p["spec"]["podSelector"], pod["labels"])
        and direction in p["spec"]["policyTypes"]
    ]
    return not selecting or any(
        _rule_admits(rule, side, p["metadata"]["namespace"], peer, port)
        for p in selecting
        for rule in p["spec"].get(key, [])
    )


def network_pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rendering's pods (by component label) and the outsiders that matter: a client in another
    namespace, an unlabelled pod of the namespace, the KubeRay operator and the cluster DNS."""
    (namespace,) = {d["metadata"]["namespace"] for d in docs}
    pods: dict[str, dict[str, Any]] = {}
    for role, template in workload_pods(docs).items():
        labels = labels_of(template)
        ports = {p for p in container_ports(template).values()} | {OTHER_PORT}
        pods[role] = {
            "namespace": namespace,
            "labels": labels,
            "ports": ports,
            "group": labels["app.kubernetes.io/component"],
        }
    pods["client in another namespace"] = {
        "namespace": "users",
        "labels": {},
        "ports": {OTHER_PORT},
        "group": "client",
    }
    pods["unlabelled pod of the namespace"] = {
        "namespace": namespace,
        "labels": {"run": "debug"},
        "ports": {OTHER_PORT},
        "group": "stranger",
    }
    pods["kuberay-operator"] = {
        "namespace": "kuberay-system",
        "labels": OPERATOR_LABELS,
        "ports": {OTHER_PORT},
        "group": "operator",
    }
    pods["kube-dns"] = {"namespace": "kube-system", "labels": DNS_LABELS, "ports": {53}, "group": "dns"}
    return pods


def reachable(docs: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
    """Every (source role, destination role, destination port) the NetworkPolicies let through."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = network_pods(docs)
    out = set()
    for src_role, src in pods.items():
        for dst_role, dst in pods.items():
            for port in dst["ports"]:
                if _direction_admits(policies, src, dst, port, "Egress") and _direction_admits(
                    policies, dst, src, port, "Ingress"
                ):
                    out.add((src_role, dst_role, port))
    return out


# Who may open a connection to whom (components by their app.kubernetes.io/component label); "*": any port.
NEEDED = {
    ("pretrain", "pretrain", "*"),  # the RayJob's head, workers and submitter
    ("adaptation-ray", "adaptation-ray", "*"),  # the RayCluster's head and workers
    ("operator", "pretrain", DASHBOARD_PORT),  # KubeRay polls the RayJob's job status
    *{(g, "adaptation-service", 8080) for g in ("client", "operator", "dns")},  # any pod of another namespace
    ("adaptation-service", "adaptation-ray", DASHBOARD_PORT),  # job submission API
    ("adaptation-service", "tracking", 5000),
    ("adaptation-service", "database", 5432),
    ("adaptation-ray", "tracking", 5000),
    ("pretrain", "tracking", 5000),
    ("tracking", "database", 5432),
    *{(g, "dns", 53) for g in ("pretrain", "adaptation-ray", "adaptation-service", "tracking")},
}


@overlays
def test_network_policies_admit_exactly_what_each_component_needs(kdir: Path):
    """The policies, evaluated as Kubernetes does for every pair of pods and every port they listen on (plus
    one port nobody uses), let through exactly NEEDED: clients reach only the API, the service reaches Ray
    only on the job API, PostgreSQL only answers the service and MLflow, and nothing leaves the namespace but
    DNS lookups (an unlabelled pod of the namespace reaches nothing: default deny)."""
    docs = render(kdir)
    pods = network_pods(docs)
    (namespace,) = {d["metadata"]["namespace"] for d in docs}
    allowed = {
        (pods[s]["group"], pods[d]["group"], port)
        for s, d, port in reachable(docs)
        if namespace in (pods[s]["namespace"], pods[d]["namespace"])  # other namespaces are not ours to rule
    }
    expected = set()
    for s, d, port in NEEDED:
        dst_ports = set().union(*(p["ports"] for p in pods.values() if p["group"] == d))
        expected |= {(s, d, q) for q in dst_ports} if port == "*" else {(s, d, port)}
    assert allowed == expected, f"admitted but not needed: {allowed - expected}; needed: {expected - allowed}"
    # the service's job API port is the head's, not a worker's (workers do not listen on it)
    head = f"RayCluster/{one(docs, 'RayCluster')['metadata']['name']}:head"
    assert ("Deployment/caloforge-service", head, DASHBOARD_PORT) in reachable(docs)


@overlays
def test_network_policies_select_real_pods_and_ports(kdir: Path):
    """A default-deny policy covers the namespace; every other policy and every same-namespace peer selects
    the labels of some pod of the rendering; every pod is selected by a policy of its own; every port a rule
    names is a container port of the pods it leads to (DNS aside)."""
    docs = render(kdir)
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    deny = policies.pop("caloforge-default-deny")
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    pods = workload_pods(docs)

    def matching(selector: dict[str, Any]) -> list[str]:
        return [r for r, t in pods.items() if _selects(selector, labels_of(t))]

    for role in pods:
        assert any(role in matching(p["podSelector"]) for p in policies.values()), f"{role}: no policy"
    for name, policy in policies.items():
        own = matching(policy["podSelector"])
        assert own, f"NetworkPolicy {name} selects no pod"
        own_ports = {p for r in own for p in container_ports(pods[r]).values()}
        for rule in policy.get("ingress", []):
            for port in rule.get("ports", []):
                assert port["port"] in own_ports, f"{name}: ingress port {port} is not a port of {own}"
        for rule in policy.get("egress", []):
            for peer in rule.get("to", []):
                if "namespaceSelector" in peer:
                    assert peer == DNS_PEER, f"{name}: egress out of the namespace only for DNS: {peer}"
                    assert rule["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
                    continue
                targets = matching(peer["podSelector"])
                assert targets, f"{name}: egress peer {peer} selects no pod"
                target_ports = {p for r in targets for p in container_ports(pods[r]).values()}
                for port in rule.get("ports", []):
                    assert port["port"] in target_ports, f"{name}: egress port {port} is not one of {targets}"
        for rule in policy.get("ingress", []):
            for peer in rule.get("from", []):
                if "namespaceSelector" not in peer:
                    assert matching(peer["podSelector"]), f"{name}: ingress peer {peer} selects no pod"


# -- the adaptation service ---------------------------------------------------------------------------------
SERVICE_COMMAND = [
    "caloforge",
    "serve",
    "--config",
    "/etc/caloforge/service.yaml",
    "--host",
    "0.0.0.0",
    "--port",
    "8080",
]  # SERVICE_CONTRACT / docs/service.md
SERVICE_CONFIG_KEYS = {
    "host",
    "port",
    "database_url",
    "ray_address",
    "max_concurrent",
    "data_roots",
    "configs_dir",
    "max_body_bytes",
    "max_detector_yaml_bytes",
    "poll_interval_s",
}
SERVICE_ENV_FROM_SECRETS = {"CALOFORGE_SERVICE_DATABASE_URL", "CALOFORGE_SERVICE_BOOTSTRAP_TOKEN"}
SERVICE_ENV = {"CALOFORGE_HOME", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", *SERVICE_ENV_FROM_SECRETS}
SERVICE_HOME = "/var/lib/caloforge"
IMAGE_CONFIGS = "/home/ray/configs"  # where k8s/Dockerfile copies configs/


def _serve_parser_exists() -> bool:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return any("serve" in a.choices for a in actions)


@with_service
def test_service_runs_caloforge_serve_with_probes(kdir: Path):
    """One replica, recreated (never two executors on one queue), running the contract's command line; its
    --port is the container port the Service and the probes use; liveness and startup probe /healthz,
    readiness /readyz; the config file is the ConfigMap's, mounted read-only."""
    docs = render(kdir)
    deployment = one(docs, "Deployment", "caloforge-service")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    template = service_pod(docs)
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels_of(template).items()
    c = container(template)
    argv = c["command"] + c.get("args", [])
    assert argv == SERVICE_COMMAND
    if _serve_parser_exists():  # the real CLI accepts it (once `caloforge serve` is merged)
        args = build_parser().parse_args(argv[1:])
        assert (args.config, args.host, int(args.port)) == ("/etc/caloforge/service.yaml", "0.0.0.0", 8080)
    port = int(arg_value(argv, "--port"))
    assert resolve_port(template, "http") == port
    probes = {kind: c[f"{kind}Probe"]["httpGet"] for kind in ("startup", "liveness", "readiness")}
    assert {k: p["path"] for k, p in probes.items()} == {
        "startup": "/healthz",
        "liveness": "/healthz",
        "readiness": "/readyz",
    }
    assert {resolve_port(template, p["port"]) for p in probes.values()} == {port}
    svc, svc_port = service_for(docs, "http://caloforge-service:8080")
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert backing_pod(docs, svc, svc_port) == ("Deployment/caloforge-service", port)
    text = mounted_file(docs, template, arg_value(argv, "--config"))
    assert text == (SERVICE / "service-config.yaml").read_text()


@with_service
def test_service_config_holds_the_contract_keys(kdir: Path, tmp_path: Path):
    """service.yaml names only ServiceConfig keys (the database URL and the Ray address come from the
    environment, never the ConfigMap); its port is the command line's; the data roots lie on the volume the
    Ray pods share; configs_dir is the image's configs/, whose adaptation configs the API resolves."""
    docs = render(kdir)
    text = one(docs, "ConfigMap", "caloforge-service-config")["data"]["service.yaml"]
    cfg = yaml.safe_load(text)
    assert set(cfg) <= SERVICE_CONFIG_KEYS, set(cfg) - SERVICE_CONFIG_KEYS
    assert "database_url" not in cfg and "ray_address" not in cfg
    assert cfg["port"] == int(arg_value(SERVICE_COMMAND, "--port"))
    assert cfg["data_roots"] and all(Path(r).is_relative_to(SERVICE_HOME) for r in cfg["data_roots"])
    assert cfg["configs_dir"] == IMAGE_CONFIGS
    copies = [rest.split() for word, rest in dockerfile_instructions() if word == "COPY"]
    assert any(words[-2:] == ["configs", IMAGE_CONFIGS] for words in copies)
    assert sorted((ROOT / "configs" / "adapt").glob("*.yaml")), "configs/adapt/ ships in the image"
    try:
        from caloforge.adapt.service import config as service_config  # service-api's module
    except ImportError:
        return  # checked by key name above until the service package is merged
    path = tmp_path / "service.yaml"
    path.write_text(text)
    loaded = load_config(service_config.ServiceConfig, path)
    assert loaded.port == cfg["port"] and loaded.max_concurrent == cfg["max_concurrent"]


@with_service
def test_service_env_is_what_the_service_reads(kdir: Path):
    """The service container sets the variables the service reads; credentials come from Secret keys, never
    literal values; RAY_ADDRESS is the job API of the RayCluster's head Service as KubeRay names it
    (<name>-head-svc); MLFLOW_TRACKING_URI reaches the MLflow server's port; CALOFORGE_HOME is the shared
    volume, which the RayCluster mounts at the same path with the same CALOFORGE_HOME."""
    docs = render(kdir)
    template = service_pod(docs)
    env = {e["name"]: e for e in container(template)["env"]}
    assert set(env) >= SERVICE_ENV
    for name in SERVICE_ENV_FROM_SECRETS:
        assert set(env[name]) == {"name", "valueFrom"} and "secretKeyRef" in env[name]["valueFrom"], name
    service_pkg = ROOT / "caloforge" / "adapt" / "service"
    if service_pkg.is_dir():  # the names are the ones the service's code reads
        code = "\n".join(p.read_text() for p in (ROOT / "caloforge").rglob("*.py"))
        for name in SERVICE_ENV:
            assert f'"{name}"' in code, f"{name} is set for the service but read nowhere in caloforge/"

    cluster = one(docs, "RayCluster")
    url = env["RAY_ADDRESS"]["value"]
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url)
    assert m is not None, url
    assert m[1] == f"{cluster['metadata']['name']}-head-svc", f"{url}: not the head Service KubeRay creates"
    head = cluster["spec"]["headGroupSpec"]
    assert int(m[2]) == resolve_port(head["template"], "dashboard") == DASHBOARD_PORT
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"

    svc, port = service_for(docs, env["MLFLOW_TRACKING_URI"]["value"])
    assert backing_pod(docs, svc, port)[0] == "Deployment/mlflow"

    home = env["CALOFORGE_HOME"]["value"]
    assert home == SERVICE_HOME
    mount, volume = mount_for(template, home)
    assert mount["mountPath"] == home and "persistentVolumeClaim" in volume
    for role, ray_pod in workload_pods([cluster]).items():
        ray_env = env_of(ray_pod)
        assert ray_env["CALOFORGE_HOME"] == home, role
        assert ray_env["MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]["value"], role
        ray_mount, ray_volume = mount_for(ray_pod, home)
        assert ray_mount["mountPath"] == home and ray_volume == volume, f"{role}: not the service's volume"
    if kdir.parent.name == "overlays":
        pvc = one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], "the service and every Ray pod mount it"


@with_service
def test_service_raycluster_matches_the_rayjob(kdir: Path):
    """The RayCluster runs the same Ray as the RayJob, a driver-only head (num-cpus 0) and one fixed CPU
    worker group; Ray authentication is handled as in the RayJob: no authOptions (older operators), the
    NetworkPolicy as the guard, and ~/.ray writable for a token file on every Ray container."""
    docs = render(kdir)
    cluster = one(docs, "RayCluster")["spec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] == "cpu"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] >= 1
    assert not cluster.get("enableInTreeAutoscaling")
    rayjobs = [d for d in docs if d["kind"] == "RayJob"]
    templates = workload_pods([one(docs, "RayCluster")])
    for job in rayjobs:
        assert cluster["rayVersion"] == job["spec"]["rayClusterSpec"]["rayVersion"]
        assert "authOptions" not in job["spec"]["rayClusterSpec"]
    assert "authOptions" not in cluster
    import ray

    assert cluster["rayVersion"] == ray.__version__ == dockerfile_args()["RAY_VERSION"]
    for role, template in templates.items():
        resources = container(template)["resources"]
        assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {}), role
        mount, volume = mount_for(template, "/home/ray/.ray/auth_token")
        assert mount["mountPath"] == "/home/ray/.ray" and "emptyDir" in volume, role
        assert "RAY_AUTH_MODE" not in env_of(template), role


# -- MLflow and PostgreSQL ----------------------------------------------------------------------------------
def mlflow_clients(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Every MLFLOW_TRACKING_URI a pod of the rendering uses (literal or from a ConfigMap)."""
    out = {}
    for role, template in workload_pods(docs).items():
        for c in _containers(template):
            for e in c.get("env", []):
                if e["name"] != "MLFLOW_TRACKING_URI":
                    continue
                if "value" in e:
                    out[role] = e["value"]
                else:
                    ref = e["valueFrom"]["configMapKeyRef"]
                    out[role] = one(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
    return out


def is_allowed_host_header(allowed: list[str], host: str) -> bool:
    """MLflow's rule for MLFLOW_SERVER_ALLOWED_HOSTS (mlflow.server.security_utils, which takes seconds to
    import): a pattern with ``*`` is an fnmatch pattern, any other must equal the Host header. The real server
    is asked in test_mlflow_server_runs_as_the_manifest_says."""
    return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


@overlays
def test_mlflow_server_serves_every_client(kdir: Path):
    """`mlflow server` listens on its container port on all interfaces, stores artifacts on its volume and
    reads the backend store URI from a Secret; every client URI of the rendering (service, RayCluster,
    pretraining) reaches the MLflow Service, and MLflow's own Host-header check admits it."""
    docs = render(kdir)
    template = one(docs, "Deployment", "mlflow")["spec"]["template"]
    c = container(template)
    argv = c["command"] + c["args"]
    assert argv[:2] == ["mlflow", "server"]
    port = int(arg_value(argv, "--port"))
    assert arg_value(argv, "--host") == "0.0.0.0" and resolve_port(template, "http") == port
    assert "--backend-store-uri" not in argv
    env = {e["name"]: e for e in c["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    artifacts = arg_value(argv, "--artifacts-destination")
    _, volume = mount_for(template, artifacts)
    pvc = one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert one(docs, "Deployment", "mlflow")["spec"]["strategy"] == {"type": "Recreate"}
    for kind in ("startup", "liveness", "readiness"):
        assert c[f"{kind}Probe"]["httpGet"] == {"path": "/health", "port": "http"}

    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")]
    clients = mlflow_clients(docs)
    assert {r.split("/")[0] for r in clients} == {"Deployment", "RayCluster", "RayJob"}, clients
    for role, uri in clients.items():
        svc, svc_port = service_for(docs, uri)
        assert backing_pod(docs, svc, svc_port) == ("Deployment/mlflow", port), (role, uri)
        host = uri.split("://", 1)[1].split("/", 1)[0]
        assert is_allowed_host_header(allowed, host), f"{role}: MLflow would refuse Host {host}"
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    assert "*" not in allowed


def _get(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_mlflow_server_runs_as_the_manifest_says(tmp_path: Path):
    """The MLflow container's command line and environment, run for real on 127.0.0.1 (its mounts mapped
    into tmp_path, SQLite standing in for the PostgreSQL URI of the Secret): the server starts writing
    nothing to its home or working directory (the image's read-only root), answers the Host headers of
    every client URI of the manifests, refuses a foreign one, and proxies artifacts onto its volume."""
    docs = render(OVERLAYS[0])
    template = one(docs, "Deployment", "mlflow")["spec"]["template"]
    c = container(template)
    mounts = [m["mountPath"] for m in c["volumeMounts"]]

    def local(value: str) -> str:
        for mount in mounts:
            if value == mount or value.startswith(mount + "/"):
                return str(tmp_path / value.lstrip("/"))
        return value

    for mount in mounts:
        (tmp_path / mount.lstrip("/")).mkdir(parents=True)
    port = free_port()
    argv = [local(a) for a in c["command"] + c["args"]]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--workers") + 1] = "1"
    argv[0] = str(Path(sys.executable).with_name("mlflow"))
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {e["name"]: local(e["value"]) for e in c["env"] if "value" in e}
    env |= {"HOME": str(home), "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        argv, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _status_or_none(f"{uri}/health") != 200:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        clients = mlflow_clients(docs)
        for role, client_uri in clients.items():
            host = client_uri.split("://", 1)[1].split("/", 1)[0]
            assert _get(search, host) == 200, f"{role}: Host {host} refused"
        assert _get(search, "attacker.example:5000") == 403
        upload = urllib.request.Request(
            f"{uri}/api/2.0/mlflow-artifacts/artifacts/0/probe.txt",
            data=b"artifact",
            method="PUT",
            headers={"Host": "mlflow:5000"},
        )
        with urllib.request.urlopen(upload, timeout=10) as resp:
            assert resp.status == 200
        artifacts = Path(local(arg_value(c["args"], "--artifacts-destination")))
        assert (artifacts / "0" / "probe.txt").read_bytes() == b"artifact"
        assert list(home.iterdir()) == [], "mlflow server wrote outside its volumes"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: our own process group
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def _status_or_none(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except OSError:
        return None


def _database_urls() -> dict[tuple[str, str], str]:
    docs = [d for d in yaml.safe_load_all((SERVICE / "secrets.template.yaml").read_text()) if d]
    return {
        (d["metadata"]["name"], key): value
        for d in docs
        for key, value in d["stringData"].items()
        if value.startswith("postgresql")
    }


@overlays
def test_postgres_serves_both_databases(kdir: Path):
    """The database URLs (service, MLflow) reach the PostgreSQL Service on its container port (a headless
    Service: the client's port is the pod's), with a role and database that the init script creates, owned
    by that role; the data directory is a subdirectory of the claim; every password comes from the Secret."""
    docs = render(kdir)
    sts = one(docs, "StatefulSet", "postgres")
    template = sts["spec"]["template"]
    svc = one(docs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    init = mounted_file(docs, template, "/docker-entrypoint-initdb.d/create-databases.sh")
    roles = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", init))
    assert set(re.findall(r"CREATE ROLE (\w+) LOGIN PASSWORD :'(\w+)'", init)) == {
        (role, f"{role}_password") for role in roles.values()
    }
    env = {e["name"]: e for e in container(template)["env"]}
    for var in re.findall(r'-v \w+_password="\$(\w+)"', init):
        assert "secretKeyRef" in env[var]["valueFrom"], var
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (data_mount,) = [m for m in container(template)["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    pgdata = Path(env["PGDATA"]["value"])
    assert pgdata.is_relative_to(data_mount["mountPath"]) and pgdata != Path(data_mount["mountPath"])
    urls = _database_urls()
    assert set(urls) == {("caloforge-service", "database-url"), ("caloforge-mlflow", "backend-store-uri")}
    for (secret, key), url in urls.items():
        m = re.fullmatch(r"postgresql://(\w+):<\w+>@([\w-]+):(\d+)/(\w+)", url)
        assert m is not None, f"{secret}/{key}: {url}"
        user, host, port, database = m.groups()
        assert roles.get(database) == user, f"{url}: the init script makes no database {database} for {user}"
        svc, svc_port = service_for(docs, f"{host}:{port}")
        assert backing_pod(docs, svc, svc_port) == ("StatefulSet/postgres", svc_port)


def _postgres_tools() -> tuple[list[str], dict[str, str]]:
    """The command prefix to run PostgreSQL's server tools (as `postgres` when we are root) and the tools."""
    tools = {t: shutil.which(t) for t in ("initdb", "pg_ctl", "psql")}
    if None in tools.values():
        pytest.skip(f"PostgreSQL tools not installed: {[t for t, p in tools.items() if p is None]}")
    if os.geteuid() != 0:
        return [], tools  # type: ignore[return-value]
    if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
        pytest.skip("running as root without a `postgres` user: initdb refuses root")
    return ["runuser", "-u", "postgres", "--"], tools  # type: ignore[return-value]


@pytest.mark.slow
def test_postgres_init_script_isolates_the_two_databases():
    """postgres-init.sh, sourced as the image's entrypoint does on a real (local) PostgreSQL with the
    passwords of generate-secrets.sh: the service's and MLflow's database URLs from the same run connect;
    the service's role can neither read MLflow's tables nor create any in MLflow's database; a wrong
    password is refused."""
    prefix, tools = _postgres_tools()
    secrets = _secrets(
        subprocess.run(
            ["sh", str(SERVICE / "generate-secrets.sh")], capture_output=True, text=True, check=True
        ).stdout
    )
    with tempfile.TemporaryDirectory(prefix="caloforge-pg-") as tmp:  # pytest's tmp is private to root
        tmp_path = Path(tmp)
        tmp_path.chmod(0o777)
        _run_postgres_init(tmp_path, prefix, tools, secrets)


def _run_postgres_init(
    tmp_path: Path, prefix: list[str], tools: dict[str, str], secrets: dict[str, dict[str, str]]
) -> None:
    pg = secrets["caloforge-postgres"]
    (tmp_path / "pw").write_text(pg["postgres-password"] + "\n")
    (tmp_path / "pw").chmod(0o644)
    data, port = tmp_path / "data", free_port()
    subprocess.run([*prefix, tools["initdb"], "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                    f"--pwfile={tmp_path / 'pw'}"], check=True, capture_output=True, timeout=120)  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={tmp_path}"
    ctl = [*prefix, tools["pg_ctl"], "-D", str(data), "-l", str(tmp_path / "log")]
    subprocess.run([*ctl, "-o", options, "-w", "start"], check=True, capture_output=True, timeout=120)
    try:
        env = {
            "PATH": os.environ["PATH"],
            "POSTGRES_USER": "postgres",
            "PGHOST": "127.0.0.1",
            "PGPORT": str(port),
            "PGPASSWORD": pg["postgres-password"],
            "CALOFORGE_DB_PASSWORD": pg["caloforge-password"],
            "MLFLOW_DB_PASSWORD": pg["mlflow-password"],
        }
        init = SERVICE / "postgres-init.sh"
        subprocess.run(["bash", "-c", f"set -Eeo pipefail; source {init}"], env=env, check=True,
                       capture_output=True, timeout=60)  # fmt: skip

        def psql(url: str, sql: str) -> subprocess.CompletedProcess[str]:
            local = url.replace("@postgres:5432/", f"@127.0.0.1:{port}/")
            return subprocess.run(
                [tools["psql"], local, "-v", "ON_ERROR_STOP=1", "-c", sql],
                capture_output=True,
                text=True,
                timeout=60,
                env={"PATH": os.environ["PATH"]},
            )

        service_url = secrets["caloforge-service"]["database-url"]
        mlflow_url = secrets["caloforge-mlflow"]["backend-store-uri"]
        assert psql(mlflow_url, "CREATE TABLE runs (x int); INSERT INTO runs VALUES (1);").returncode == 0
        assert psql(service_url, "CREATE TABLE jobs (x int);").returncode == 0
        cross = service_url.rsplit("/", 1)[0] + "/mlflow"
        read = psql(cross, "SELECT * FROM runs;")
        assert read.returncode != 0 and "permission denied" in read.stderr
        write = psql(cross, "CREATE TABLE evil (x int);")
        assert write.returncode != 0 and "permission denied" in write.stderr
        wrong = psql(service_url.replace(pg["caloforge-password"], "0" * 48), "SELECT 1;")
        assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
    finally:
        subprocess.run([*ctl, "-m", "fast", "-w", "stop"], capture_output=True, timeout=120)


# -- Secrets ------------------------------------------------------------------------------------------------
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")
CREDENTIAL_ENV = re.compile(r"PASSWORD|TOKEN|SECRET|DATABASE_URL|BACKEND_STORE_URI|ACCESS_KEY")


def secret_refs(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    refs = set()
    for template in workload_pods(docs).values():
        for c in _containers(template):
            assert "envFrom" not in c, "env from whole Secrets/ConfigMaps hides which keys a pod reads"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert not ref.get("optional"), e
                    refs.add((ref["name"], ref["key"]))
        for v in template["spec"].get("volumes", []):
            assert "secret" not in v, "Secrets reach the pods as env only"
    return refs


def _secrets(text: str) -> dict[str, dict[str, str]]:
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert all(
        d["kind"] == "Secret" and set(d) == {"apiVersion", "kind", "metadata", "type", "stringData"}
        for d in docs
    )
    return {d["metadata"]["name"]: d["stringData"] for d in docs}


@everything
def test_no_credentials_in_the_manifests(kdir: Path):
    """No Secret is rendered (applying k8s/ never deploys a known password or token); every Secret key a pod
    reads is one of the template's; credentials reach containers only through secretKeyRef."""
    docs = render(kdir)
    assert [d for d in docs if d["kind"] == "Secret"] == []
    template = _secrets((SERVICE / "secrets.template.yaml").read_text())
    keys = {(name, key) for name, data in template.items() for key in data}
    refs = secret_refs(docs)
    assert refs <= keys, refs - keys
    if kdir.parent.name == "overlays":
        assert refs == keys, f"template keys no pod reads: {keys - refs}"
    for role, pod in workload_pods(docs).items():
        for c in _containers(pod):
            for e in c.get("env", []):
                if CREDENTIAL_ENV.search(e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), (
                        f"{role}: {e['name']} is not from a Secret"
                    )


def test_secret_template_holds_placeholders_only():
    """Every value of the template is placeholders in an otherwise fixed shape (the URLs): no literal
    password, token or credential."""
    for name, data in _secrets((SERVICE / "secrets.template.yaml").read_text()).items():
        for key, value in data.items():
            assert PLACEHOLDER.search(value), f"{name}/{key}: no placeholder"
            rest = PLACEHOLDER.sub("", value)
            if value.startswith("postgresql://"):
                assert re.fullmatch(r"postgresql://\w+:@[\w-]+:\d+/\w+", rest), f"{name}/{key}: {value}"
            else:
                assert rest == "", f"{name}/{key}: {value} holds more than a placeholder"


def test_generated_secrets_fill_the_template_consistently():
    """k8s/service/generate-secrets.sh prints the template with every placeholder replaced by one fresh
    random value (the same password in caloforge-postgres and in the database URL), different on each run."""
    script = SERVICE / "generate-secrets.sh"
    runs = [
        _secrets(
            subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True, timeout=30).stdout
        )
        for _ in range(2)
    ]
    template = _secrets((SERVICE / "secrets.template.yaml").read_text())
    for generated in runs:
        assert {n: set(d) for n, d in generated.items()} == {n: set(d) for n, d in template.items()}
        values: dict[str, str] = {}
        for name, data in template.items():
            for key, value in data.items():
                if PLACEHOLDER.fullmatch(value):
                    values[value] = generated[name][key]
        assert set(values) == set(
            PLACEHOLDER.findall("".join(v for d in template.values() for v in d.values()))
        )
        assert len(set(values.values())) == len(values), "one value per placeholder"
        assert all(re.fullmatch(r"[0-9a-f]{48}", v) for v in values.values())
        for name, data in template.items():
            for key, value in data.items():
                filled = PLACEHOLDER.sub(lambda m, v=values: v[m[0]], value)
                assert filled == generated[name][key], (name, key)
    assert runs[0]["caloforge-service"]["bootstrap-token"] != runs[1]["caloforge-service"]["bootstrap-token"]


def test_image_serves_the_service_and_mlflow():
    """The image carries the PostgreSQL driver that the `postgresql://` URLs select (psycopg2, SQLAlchemy's
    and MLflow's default), checks it in the smoke step, and exposes the service's and MLflow's ports."""
    runs = [rest for word, rest in dockerfile_instructions() if word == "RUN"]
    assert any('"psycopg2-binary==${PSYCOPG2_VERSION}"' in r for r in runs)
    assert "psycopg2" in runs[-1] and "mlflow server --help" in runs[-1]
    assert all(url.startswith("postgresql://") for url in _database_urls().values())
    exposed = {int(p) for word, rest in dockerfile_instructions() if word == "EXPOSE" for p in rest.split()}
    docs = render(SERVICE)
    assert exposed == {
        resolve_port(service_pod(docs), "http"),
        resolve_port(one(docs, "Deployment", "mlflow")["spec"]["template"], "http"),
    }


# -- cross-check of the renderer ---------------------------------------------------------------------------
@everything
def test_renderer_agrees_with_kubectl_kustomize(kdir: Path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the in-test renderer is not cross-checked")
    out = subprocess.run(
        [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(kdir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in render(kdir)}
    assert set(theirs) == set(ours)
    for key, doc in ours.items():
        assert doc["metadata"].get("namespace") == theirs[key]["metadata"].get("namespace"), key
        for field in ("spec", "data"):
            assert doc.get(field) == theirs[key].get(field), f"{key}: {field} differs"
