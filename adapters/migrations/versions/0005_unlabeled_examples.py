"""Unlabelled examples of the domain a head will serve (issue 13, domain adaptation).

A job's example with no label (NULL) is unlabelled; a head version's unlabelled examples
are its rows in `head_unlabeled`, beside its labelled ones in `head_examples`.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite cannot alter a column in place: batch mode copies the table.
    with op.batch_alter_table("job_examples") as batch:
        batch.alter_column("label", existing_type=sa.Text, nullable=True)
    op.create_table(
        "head_unlabeled",
        sa.Column(
            "head_id", sa.Text, sa.ForeignKey("heads.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("content_hash", sa.Text, primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("head_unlabeled")
    op.execute("DELETE FROM job_examples WHERE label IS NULL")
    with op.batch_alter_table("job_examples") as batch:
        batch.alter_column("label", existing_type=sa.Text, nullable=False)
