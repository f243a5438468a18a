"""Alembic's entry point: runs the revisions on the connection `upgrade()` passes in."""

from alembic import context

connection = context.config.attributes["connection"]
# The connection is already in upgrade()'s transaction: every revision runs inside it.
context.configure(connection=connection, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
