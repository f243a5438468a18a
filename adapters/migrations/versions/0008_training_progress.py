"""Training progress: how far a running job is, for the head object to show (issue 13's
202 answers, issue 14's progress bars).

`training_jobs.progress`: JSON `{"stage", "done", "total"}`, written by the process that
trains the job (at most about once a second), gone with the job.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("progress", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("progress")
