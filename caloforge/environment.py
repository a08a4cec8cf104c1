"""The process environment CaloForge sets for itself: quiet and local by default.

Every entry point (the CLI, Ray workers, tests) calls :func:`apply_default_env` first; users can still
override each variable in their environment. :func:`embedded_auth_mode`: the authentication of a local Ray
that CaloForge starts (shared by ``caloforge.pretrain.launch`` and ``caloforge.adapt.service.rayjobs``).
:func:`free_ports`: ports on 127.0.0.1 for what CaloForge starts locally (a Ray head, the embedded service,
a one-process ``torch.distributed`` group; tests' servers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

LOCALHOST = "127.0.0.1"

# Quiet and local by default (users can still override these in their environment).
DEFAULT_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "ORT_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_default_env() -> None:
    """Set each of ``DEFAULT_ENV`` unless the environment already has it."""
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1. Every socket stays bound until all are chosen, so the OS
    cannot hand out one port twice (closing each before binding the next let two Ray components of one head
    get the same port). A port is free when chosen; a caller binds it soon after."""
    if n < 1:
        raise ValueError(f"free_ports: n must be >= 1, got {n}")
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in sockets:
            s.bind((LOCALHOST, 0))
        return [int(s.getsockname()[1]) for s in sockets]


def free_port() -> int:
    """One free TCP port on 127.0.0.1 (:func:`free_ports`)."""
    return free_ports(1)[0]


ALLOW_UNAUTHENTICATED_ENV = "CALOFORGE_ALLOW_UNAUTHENTICATED_RAY"


def embedded_auth_mode(
    allow_unauthenticated: bool = False, setting: str = "cluster.allow_unauthenticated_ray"
) -> str:
    """Set (and return) the authentication mode of a local Ray that CaloForge starts (the embedded Ray of
    ``caloforge pretrain``, the adaptation service's own head): ``token`` unless ``RAY_AUTH_MODE`` already
    says otherwise, which is refused (``ValueError``) unless ``allow_unauthenticated`` (the caller's
    ``setting``, named in the messages) or ``$CALOFORGE_ALLOW_UNAUTHENTICATED_RAY`` (1/true/yes) opts out by
    name. Sets ``RAY_AUTH_MODE`` in this process's environment, so processes it starts inherit it."""
    current = os.environ.get("RAY_AUTH_MODE")
    if current is None or current.strip().lower() == "token":
        os.environ["RAY_AUTH_MODE"] = "token"
        # Ray caches its config at import: refresh it so this process (and ray.init, which then creates the
        # token in ~/.ray/auth_token when there is none) sees token mode, as Ray's own default does.
        from ray._raylet import AuthenticationMode, Config, get_authentication_mode

        Config.initialize("")
        if get_authentication_mode() != AuthenticationMode.TOKEN:
            raise RuntimeError("RAY_AUTH_MODE=token is set but Ray does not report token authentication")
        return "token"
    opted = allow_unauthenticated or os.environ.get(ALLOW_UNAUTHENTICATED_ENV, "").lower() in (
        "1",
        "true",
        "yes",
    )
    if not opted:
        raise ValueError(
            f"RAY_AUTH_MODE={current} is set: the embedded Ray would accept unauthenticated clients (anyone "
            "who reaches its ports can run code as you). Unset it (CaloForge starts Ray with "
            "RAY_AUTH_MODE=token), or opt out by name: "
            f"{setting}=true or "
            f"{ALLOW_UNAUTHENTICATED_ENV}=1"
        )
    logging.getLogger("caloforge.ray").warning(
        "embedded Ray WITHOUT authentication (RAY_AUTH_MODE=%s, allowed by %s); it listens on 127.0.0.1 only",
        current,
        setting if allow_unauthenticated else ALLOW_UNAUTHENTICATED_ENV,
    )
    return current


__all__ = ["ALLOW_UNAUTHENTICATED_ENV", "DEFAULT_ENV", "apply_default_env", "embedded_auth_mode"]
