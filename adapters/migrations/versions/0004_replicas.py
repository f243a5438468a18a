"""The replicas alive: each replica's API workers write its heartbeat here, and count
the replicas to take their share of the fleet-wide rate limits.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("seen_at", sa.Float, nullable=False),  # Unix time
    )


def downgrade() -> None:
    op.drop_table("replicas")
