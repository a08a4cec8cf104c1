"""The process environment CaloForge sets for itself: quiet and local by default.

Every entry point (the CLI, Ray workers, tests) calls :func:`apply_default_env` first; users can still
override each variable in their environment.
"""

from __future__ import annotations

import os

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


__all__ = ["DEFAULT_ENV", "apply_default_env"]
