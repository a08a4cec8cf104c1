"""Reading the registry: one version by number, alias or URI, all versions of a model, the registered
models, and tag search — as ``RegisteredVersion`` / ``RegisteredModelSummary`` (``registry.versions``).

Every function takes the ``MlflowClient`` of the store (``RegistryStore.client``); an unknown name, version
or alias is a ValueError naming it. MLflow pages are followed to the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from caloforge.registry.bundle import parse_model_uri
from caloforge.registry.versions import SHORT_KEYS, TAG, RegisteredModelSummary, RegisteredVersion


def not_found(exc: MlflowException) -> bool:
    """Whether MLflow answered RESOURCE_DOES_NOT_EXIST."""
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def get_version(
    client: MlflowClient, name: str, version: int | str | None = None, alias: str | None = None
) -> RegisteredVersion:
    """One version by number or alias (neither: the latest). Unknown name/version/alias -> ValueError."""
    if version is not None and alias is not None:
        raise ValueError("get: give a version or an alias, not both")
    try:
        rm = client.get_registered_model(name)
    except MlflowException as exc:
        if not_found(exc) or "not found" in str(exc).lower():
            known = [m.name for m in list_models(client)]
            raise ValueError(f"unknown registered model {name!r} (known: {known})") from None
        raise
    aliases = alias_map(rm.aliases)
    try:
        if alias is not None:
            if alias not in aliases:
                raise ValueError(
                    f"registered model {name!r} has no alias {alias!r} (aliases: {sorted(aliases) or 'none'})"
                )
            mv = client.get_model_version_by_alias(name, alias)
        else:
            if version is None:
                versions = search_versions(client, f"name = '{quote(name)}'")
                if not versions:
                    raise ValueError(f"registered model {name!r} has no versions")
                version = max(v.version for v in versions)
            mv = client.get_model_version(name, str(int(version)))
    except MlflowException as exc:
        if not_found(exc) or "not found" in str(exc).lower():
            raise ValueError(f"registered model {name!r} has no version {version}") from None
        raise
    return to_version(mv, aliases)


def resolve(client: MlflowClient, uri: str) -> RegisteredVersion:
    """A version from ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``NAME@ALIAS`` or ``NAME``."""
    name, version, alias = parse_model_uri(uri)
    return get_version(client, name, version=version, alias=alias)


def model_versions(client: MlflowClient, name: str) -> list[RegisteredVersion]:
    """All versions of one registered model, oldest first."""
    get_model(client, name)
    return search_versions(client, f"name = '{quote(name)}'")


def get_model(client: MlflowClient, name: str) -> RegisteredModelSummary:
    """One registered model by name (ValueError listing the known ones when unknown)."""
    models = list_models(client)
    for m in models:
        if m.name == name:
            return m
    raise ValueError(f"unknown registered model {name!r} (known: {[m.name for m in models]})")


def list_models(client: MlflowClient) -> list[RegisteredModelSummary]:
    """All registered models, by name."""
    out = []
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        for rm in page:
            latest = [int(v.version) for v in (rm.latest_versions or [])]
            out.append(
                RegisteredModelSummary(
                    name=rm.name,
                    latest_version=max(latest) if latest else None,
                    aliases=alias_map(rm.aliases),
                    description=rm.description or "",
                    tags=dict(rm.tags or {}),
                )
            )
        token = page.token
        if not token:
            break
    return sorted(out, key=lambda m: m.name)


def search(
    client: MlflowClient, tags: Mapping[str, str] | None = None, name: str | None = None
) -> list[RegisteredVersion]:
    """Versions whose tags match all of ``tags`` (exact), optionally within one registered model (the key
    forms are those of ``RegistryStore.search``)."""
    from caloforge.platform.conditioning import pdg_of

    clauses = []
    if name is not None:
        clauses.append(f"name = '{quote(name)}'")
    for key, value in (tags or {}).items():
        value = str(value)
        if key == "detector":
            key, value = f"{TAG}detector.{value}", "true"
        elif key == "particle":
            key, value = f"{TAG}particle.{pdg_of(value)}", "true"
        elif key in SHORT_KEYS:
            key = TAG + key
        if "`" in key:
            raise ValueError(f"search: invalid tag key {key!r}")
        clauses.append(f"tags.`{key}` = '{quote(value)}'")
    return search_versions(client, " AND ".join(clauses) or None)


def search_versions(client: MlflowClient, filter_string: str | None) -> list[RegisteredVersion]:
    """Every version matching an MLflow ``search_model_versions`` filter (None: all), by name and version."""
    out: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(filter_string, max_results=10_000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            break
    alias_cache: dict[str, dict[str, int]] = {}
    result = []
    for mv in out:
        if mv.name not in alias_cache:
            alias_cache[mv.name] = alias_map(client.get_registered_model(mv.name).aliases)
        result.append(to_version(mv, alias_cache[mv.name]))
    return sorted(result, key=lambda v: (v.name, v.version))


def to_version(mv: ModelVersion, aliases: Mapping[str, int]) -> RegisteredVersion:
    """The ``RegisteredVersion`` of an MLflow model version, given its model's alias -> version map."""
    version = int(mv.version)
    return RegisteredVersion(
        name=mv.name,
        version=version,
        source=mv.source or "",
        run_id=mv.run_id or None,
        model_id=getattr(mv, "model_id", None) or (mv.tags or {}).get(TAG + "logged_model_id") or None,
        tags=dict(mv.tags or {}),
        aliases=tuple(sorted(a for a, v in aliases.items() if v == version)),
        description=mv.description or "",
        created_ms=int(mv.creation_timestamp or 0),
    )


def alias_map(aliases: Any) -> dict[str, int]:
    """alias -> version from MLflow's entity (a dict locally, a protobuf container over REST)."""
    if aliases is None:
        return {}
    if isinstance(aliases, Mapping):
        return {str(k): int(v) for k, v in aliases.items()}
    out = {}
    for item in list(aliases):
        out[str(item.alias)] = int(item.version)
    return out


def quote(value: str) -> str:
    """``value`` as the inside of a single-quoted MLflow filter string."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


__all__ = [
    "alias_map",
    "get_model",
    "get_version",
    "list_models",
    "model_versions",
    "not_found",
    "quote",
    "resolve",
    "search",
    "search_versions",
    "to_version",
]
