"""Alembic environment of the service database: run on the connection ``db.upgrade`` passes in."""

from __future__ import annotations

from alembic import context

from caloforge.adapt.service.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "the service migrations run through caloforge.adapt.service.db.upgrade (JobStore opens do it)"
    )
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
