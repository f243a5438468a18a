"""How many of the deepest depths of the backbone's pass a head version reads beside the
embedding (issue 29; adapters/depth_choice.py).

- `heads.depths`: 0 for every version trained before, which read the embedding alone.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("heads") as batch:
        batch.add_column(sa.Column("depths", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("heads") as batch:
        batch.drop_column("depths")
