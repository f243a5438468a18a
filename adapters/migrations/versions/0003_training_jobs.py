"""Training jobs as rows: any replica can take over a job whose replica died.

A job holds what its training needs beyond what is stored already: the backbones it may
choose from and its new examples as the user sent them. Its lease (owner, expiry) says
which process trains it; a job whose lease ran out is taken by another.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "tenant_id", sa.Text, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "head_id", sa.Text, sa.ForeignKey("heads.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("backbones", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_until", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("training_jobs_by_head", "training_jobs", ["head_id", "created_at"])
    op.create_table(
        "job_examples",
        sa.Column(
            "job_id",
            sa.Text,
            sa.ForeignKey("training_jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_examples")
    op.drop_table("training_jobs")
