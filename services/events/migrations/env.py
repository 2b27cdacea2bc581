"""Alembic environment of the events service; run through `bridgepost migrate` (shared.db.migrate)."""

from alembic import context

from services.events.store import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                  version_table="alembic_version")
with context.begin_transaction():
    context.run_migrations()
