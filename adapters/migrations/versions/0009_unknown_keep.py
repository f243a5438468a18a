"""The share of its held-out rows a head's unknown threshold keeps (issue 29).

- `heads.unknown_keep`: as the head was created (new heads: 0.95 unless they ask for
  another). Heads created before it was settable keep 0.99, the share they were trained
  with, so their next versions flag inputs as they did.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("heads") as batch:
        batch.add_column(sa.Column("unknown_keep", sa.Float, nullable=False, server_default="0.99"))


def downgrade() -> None:
    with op.batch_alter_table("heads") as batch:
        batch.drop_column("unknown_keep")
