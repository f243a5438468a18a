"""Baseline: tenants, heads, embeddings and head examples as Graft stored them before Alembic.

A data directory written by an older Graft has these tables already, without Alembic's
version table: they are kept, and the columns `heads` gained since its first release
are added in place.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def added_head_columns() -> list[sa.Column]:
    """Columns `heads` gained after its first release, before there were migrations."""
    return [
        sa.Column("prototypes", sa.LargeBinary),
        sa.Column("unknown_threshold", sa.Float),
        sa.Column("label_descriptions", sa.Text, nullable=False, server_default="{}"),
    ]


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "tenants" not in existing:
        op.create_table(
            "tenants",
            sa.Column("id", sa.Text, primary_key=True),
            sa.Column("name", sa.Text, nullable=False),
            sa.Column("key_salt", sa.LargeBinary, nullable=False),
            sa.Column("key_hash", sa.LargeBinary, nullable=False),
            sa.Column("created_at", sa.Text, nullable=False),
        )
    if "heads" not in existing:
        op.create_table(
            "heads",
            sa.Column("id", sa.Text, primary_key=True),
            sa.Column(
                "tenant_id",
                sa.Text,
                sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                nullable=False,
            ),
            sa.Column("name", sa.Text, nullable=False),
            sa.Column("backbone", sa.Text, nullable=False),
            sa.Column("status", sa.Text, nullable=False),
            sa.Column("version", sa.Integer, nullable=False, server_default="0"),
            sa.Column("labels", sa.Text, nullable=False, server_default="[]"),
            sa.Column("weights", sa.LargeBinary),
            sa.Column("bias", sa.LargeBinary),
            *added_head_columns(),
            sa.Column("metrics", sa.Text),
            sa.Column("error", sa.Text),
            sa.Column("created_at", sa.Text, nullable=False),
            sa.Column("updated_at", sa.Text, nullable=False),
        )
        op.create_index("heads_by_tenant", "heads", ["tenant_id", "created_at"])
    else:
        have = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("heads")}
        for column in added_head_columns():
            if column.name not in have:
                op.add_column("heads", column)
    if "embeddings" not in existing:
        op.create_table(
            "embeddings",
            sa.Column(
                "tenant_id",
                sa.Text,
                sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                primary_key=True,
            ),
            sa.Column("backbone", sa.Text, primary_key=True),
            sa.Column("content_hash", sa.Text, primary_key=True),
            sa.Column("vector", sa.LargeBinary, nullable=False),
        )
    if "head_examples" not in existing:
        op.create_table(
            "head_examples",
            sa.Column(
                "head_id",
                sa.Text,
                sa.ForeignKey("heads.id", ondelete="CASCADE"),
                primary_key=True,
            ),
            sa.Column("content_hash", sa.Text, primary_key=True),
            sa.Column("label", sa.Text, primary_key=True),
        )


def downgrade() -> None:
    for table in ("head_examples", "embeddings", "heads", "tenants"):
        op.drop_table(table)
