"""``caloforge.environment``: the local ports CaloForge chooses for what it starts."""

from __future__ import annotations

import socket

import pytest

from caloforge.environment import free_port, free_ports


def test_ports_chosen_together_are_distinct_and_free() -> None:
    """Ports chosen one socket at a time could repeat (the service's Ray head once got the same port for its
    dashboard and its metrics exporter and refused to start); chosen together they cannot."""
    for _ in range(50):
        ports = free_ports(9)
        assert len(set(ports)) == 9 and all(1024 <= p < 65536 for p in ports)
    for port in [*ports, free_port()]:  # released: each can be bound again
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_ports_needs_a_positive_count() -> None:
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        free_ports(0)
