"""Aliases and promotion: pointing ``champion`` / ``candidate`` (or any valid alias) at a version.

``promote`` moves an alias and records who replaced whom, when and why: a version tag
``caloforge.promotion.<alias>`` (JSON ``{at, reason, previous_version}``) plus a line appended to the version
description. ``set_alias`` / ``delete_alias`` move or remove an alias without a record. Every function
takes the store's ``MlflowClient``; aliases are checked (``validate_alias``) before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import logging

from mlflow import MlflowClient

from caloforge.registry.lookup import get_version
from caloforge.registry.versions import TAG, RegisteredVersion, now_iso, validate_alias

log = logging.getLogger("caloforge.registry")


def set_alias(client: MlflowClient, name: str, version: int | str, alias: str) -> RegisteredVersion:
    """Point ``alias`` of ``name`` at ``version`` (moving it from any other version)."""
    validate_alias(alias)
    mv = get_version(client, name, version=int(version))
    client.set_registered_model_alias(name, alias, str(mv.version))
    return get_version(client, name, version=mv.version)


def delete_alias(client: MlflowClient, name: str, alias: str) -> None:
    """Remove ``alias`` from ``name`` (ValueError when the model or alias is unknown)."""
    get_version(client, name, alias=alias)  # clear error when unknown
    client.delete_registered_model_alias(name, alias)


def promote(
    client: MlflowClient, name: str, version: int | str, alias: str = "champion", reason: str = ""
) -> RegisteredVersion:
    """Move ``alias`` to ``version`` and record the promotion (a reason is required)."""
    validate_alias(alias)
    if not reason or not reason.strip():
        raise ValueError("promote: a reason is required (it is recorded with the promotion)")
    mv = get_version(client, name, version=int(version))
    previous: int | None = None
    with contextlib.suppress(ValueError):  # alias not set yet: nothing to replace
        previous = get_version(client, name, alias=alias).version
    if previous == mv.version:  # re-promotion: recorded again, nothing replaced
        previous = None
    at = now_iso()
    record = {"at": at, "reason": reason.strip(), "previous_version": previous}
    client.set_registered_model_alias(name, alias, str(mv.version))
    client.set_model_version_tag(name, str(mv.version), f"{TAG}promotion.{alias}", json.dumps(record))
    line = (
        f"[{at}] promoted to @{alias}"
        + (f" (replacing v{previous})" if previous else "")
        + f": {reason.strip()}"
    )
    desc = (mv.description + "\n" if mv.description else "") + line
    client.update_model_version(name, str(mv.version), description=desc)
    log.info("models:/%s/%s is now @%s (%s)", name, mv.version, alias, reason.strip())
    return get_version(client, name, version=mv.version)


__all__ = ["delete_alias", "promote", "set_alias"]
