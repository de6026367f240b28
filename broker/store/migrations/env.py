"""Alembic environment: runs on the connection hoop hands it (see ``broker.store.migrate``)."""

from __future__ import annotations

from alembic import context

from broker.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `hoop db upgrade`, which supplies the connection")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
