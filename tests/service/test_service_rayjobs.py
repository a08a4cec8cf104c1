"""The service's own Ray head: the ports it asks ``ray start`` for."""

from __future__ import annotations

import socket

from caloforge.adapt.service.rayjobs import _free_ports


def test_the_heads_ports_are_distinct_and_free() -> None:
    """Nine ports chosen one socket at a time could repeat (a head once got the same port for its
    dashboard and its metrics exporter and refused to start); chosen together they cannot."""
    for _ in range(50):
        ports = _free_ports(9)
        assert len(set(ports)) == 9 and all(1024 <= p < 65536 for p in ports)
    for port in ports:  # released: each can be bound again
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
