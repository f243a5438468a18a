"""Fine-tuned heads (issue 13): what a head asked for, its top's factors, and the texts
it was trained on.

- `heads.fine_tune`: "auto", "on" or "off", as the head was created. Heads created
  before fine-tuning existed are "off": they keep training as they did.
- `heads.top_factors`: the current version's LoRA factors (models/split.py) as an
  `.npz` of fp16 arrays, or NULL for a frozen head.
- `example_texts`: each text example's text as UTF-8 bytes (PostgreSQL's text holds no
  NUL character, which a text may), per tenant and content hash (as cached embeddings
  are): a fine-tuned head's next version tunes its top on all its texts again, which its
  embeddings cannot replace.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("heads") as batch:
        batch.add_column(sa.Column("fine_tune", sa.Text, nullable=False, server_default="off"))
        batch.add_column(sa.Column("top_factors", sa.LargeBinary))
    op.create_table(
        "example_texts",
        sa.Column(
            "tenant_id",
            sa.Text,
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("content_hash", sa.Text, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),  # UTF-8
    )


def downgrade() -> None:
    op.drop_table("example_texts")
    with op.batch_alter_table("heads") as batch:
        batch.drop_column("top_factors")
        batch.drop_column("fine_tune")
