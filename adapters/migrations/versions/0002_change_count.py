"""A change count: every write that replicas' caches must see (a head's new version or
deletion, a tenant's deletion or new key) adds one, and each process polls it.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    changes = op.create_table(
        "changes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("count", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(changes, [{"id": 1, "count": 0}])


def downgrade() -> None:
    op.drop_table("changes")
