"""Image heads fine-tune too (issue 13): the kept examples are inputs, not only texts.

`example_texts` becomes `example_inputs`: each example's input as sent (a text as UTF-8,
an image's bytes), per tenant and content hash, for heads that may fine-tune. A
fine-tuned image head's next version tunes its top again on augmented views of all its
images, which their embeddings cannot replace.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.rename_table("example_texts", "example_inputs")


def downgrade() -> None:
    # Images kept stay, under hashes no text has (a content hash includes the kind).
    op.rename_table("example_inputs", "example_texts")
