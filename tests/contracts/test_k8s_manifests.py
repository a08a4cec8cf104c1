"""The KubeRay deployment in ``k8s/`` agrees with the package, its pretraining configs and ``k8s/Dockerfile``.

The overlays are rendered in-process by a small renderer that implements exactly the kustomize features
``k8s/`` uses (resources, namespace, configMapGenerator create/replace/merge, images, inline JSON 6902
patches) and fails on anything else rather than guess; when ``kubectl`` is on PATH its ``kubectl kustomize``
output is compared with the renderer's. Nothing here builds the image, pulls anything or talks to a cluster.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from caloforge.cli import build_parser, main
from caloforge.config import load_config
from caloforge.environment import DEFAULT_ENV
from caloforge.pretrain.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [BASE, *OVERLAYS]
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
@all_kustomizations
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


@all_kustomizations
def test_network_policy_admits_caloforge_and_the_operator_only(kdir: Path):
    """The policy selects every Ray pod (head, workers, submitter); it admits all ports from CaloForge's own
    pods and only the dashboard port from the KubeRay operator of one namespace (which polls the job's
    status there) — never an operator-labelled pod of any other namespace."""
    docs = render(kdir)
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    selector = policy["podSelector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/part-of": "caloforge"}
    for role, template in pod_templates(one(docs, "RayJob")).items():
        labels = template.get("metadata", {}).get("labels", {})
        assert selector.items() <= labels.items(), f"{role} pods are not covered by the NetworkPolicy"
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
    policy = one(render(kdir), "NetworkPolicy")["spec"]
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


@all_kustomizations
def test_pods_run_unprivileged_on_a_read_only_root(kdir: Path):
    """Every pod: non-root, seccomp RuntimeDefault; every container: no privilege escalation, read-only root
    filesystem, all capabilities dropped; TMPDIR is a size-limited emptyDir (ZeRO staging, Ray's session)."""
    job = one(render(kdir), "RayJob")
    for role, template in pod_templates(job).items():
        spec = template["spec"]
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, role
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, role
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
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


@overlays
def test_overlays_pin_the_image_by_digest(kdir: Path):
    """Deployments pull ``repository:tag@sha256:…``: a pushed-over tag cannot change what runs. Until the
    release image is pushed the digest is the documented all-zero placeholder (a pull fails closed)."""
    entries = kustomization(kdir).get("images", [])
    assert entries and all(re.fullmatch(r"sha256:[0-9a-f]{64}", e.get("digest", "")) for e in entries), (
        entries
    )
    for c in _containers(one(render(kdir), "RayJob")):
        assert re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", c["image"]), c["image"]
    text = (kdir / "kustomization.yaml").read_text()
    if "sha256:" + "0" * 64 in text:
        assert "PLACEHOLDER" in text and "docker buildx imagetools inspect" in text


@all_kustomizations
def test_no_public_exposure_of_ray_ports(kdir: Path):
    docs = render(kdir)
    job = one(docs, "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert {p["containerPort"] for p in container(head["template"]).get("ports", [])} >= RAY_PORTS
    exposed = [d["kind"] for d in docs if d["kind"] in ("Ingress", "Route", "Gateway", "HTTPRoute")]
    exposed += [
        f"Service/{d['metadata']['name']}"
        for d in docs
        if d["kind"] == "Service" and d["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort")
    ]
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        exposed.append("head service")
    for role, template in pod_templates(job).items():
        if template["spec"].get("hostNetwork"):
            exposed.append(f"{role}: hostNetwork")
        for c in _containers(template):
            exposed += [f"{role}: hostPort {p['hostPort']}" for p in c.get("ports", []) if "hostPort" in p]
    assert exposed == []


# -- cross-check of the renderer ---------------------------------------------------------------------------
@all_kustomizations
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
