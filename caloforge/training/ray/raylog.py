"""Ray log hygiene for CaloForge's embedded local Ray (no Ray import: this module loads in every Ray process).

``quiet_ray_internals`` is the ``worker_process_setup_hook`` of the embedded Ray (``launch.ray_session``): it
runs at the start of every Ray worker process, so it must stay cheap (stdlib only).
"""

from __future__ import annotations

import logging

__all__ = ["DropPrefixes", "quiet_ray_internals"]

_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_STATE_API_WARNING = "Failed to query Ray Train Controller actor state"


class DropPrefixes(logging.Filter):
    """Drop log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_ray_internals() -> None:
    """Drop one harmless, repetitive Ray line in the embedded local Ray.

    With the dashboard off (the embedded default: it costs CPU on small machines) Ray's State API is not
    served, so Ray Train's ``PlacementGroupCleaner`` logs "Failed to query Ray Train Controller actor
    state ... Continuing to monitor." about once a second for the whole run. Nothing is wrong: the cleaner
    only matters when the controller dies ungracefully, and ``ray.shutdown()`` of the embedded Ray removes
    everything anyway. Every other line is left alone.
    """
    logging.getLogger(_PG_CLEANER_LOGGER).addFilter(DropPrefixes(_STATE_API_WARNING))
