"""Alembic's entry: migrates on the connection the store hands over (``config.attributes["connection"]``),
inside the store's transaction."""

from alembic import context

from gateway.store.schema import metadata

context.configure(connection=context.config.attributes["connection"], target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
