"""The store's tables (SQLAlchemy Core); their history is adapters/migrations."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("key_salt", sa.LargeBinary, nullable=False),
    sa.Column("key_hash", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
)
heads = sa.Table(
    "heads",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column(
        "tenant_id", sa.Text, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("backbone", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("labels", sa.Text, nullable=False, server_default="[]"),
    sa.Column("weights", sa.LargeBinary),
    sa.Column("bias", sa.LargeBinary),
    sa.Column("prototypes", sa.LargeBinary),
    sa.Column("unknown_threshold", sa.Float),
    sa.Column("label_descriptions", sa.Text, nullable=False, server_default="{}"),
    # Fine-tuning (migration 0006): asked for at creation, and the version's top.
    sa.Column("fine_tune", sa.Text, nullable=False, server_default="off"),
    sa.Column("top_factors", sa.LargeBinary),  # an .npz of fp16 LoRA factors
    # The share of held-out rows its unknown threshold keeps (migration 0009).
    sa.Column("unknown_keep", sa.Float, nullable=False, server_default="0.99"),
    # How many of the deepest depths the version reads beside the embedding (0010).
    sa.Column("depths", sa.Integer, nullable=False, server_default="0"),
    sa.Column("metrics", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Text, nullable=False),
    sa.Index("heads_by_tenant", "tenant_id", "created_at"),
)
# Embeddings by content hash, per tenant: retraining never re-runs the backbone on an
# input this tenant has sent before, and no tenant's cache is visible to another.
embeddings = sa.Table(
    "embeddings",
    metadata,
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
# Each example's input as sent, per tenant, for heads that may fine-tune (migrations 0006,
# 0007): a fine-tuned head's top is tuned on its inputs again at every version.
example_inputs = sa.Table(
    "example_inputs",
    metadata,
    sa.Column(
        "tenant_id",
        sa.Text,
        sa.ForeignKey("tenants.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("content_hash", sa.Text, primary_key=True),
    # An image's bytes; a text as UTF-8 (as job examples: PostgreSQL's text holds no NUL,
    # which a text may).
    sa.Column("data", sa.LargeBinary, nullable=False),
)
# The training set of each head's current version.
head_examples = sa.Table(
    "head_examples",
    metadata,
    sa.Column("head_id", sa.Text, sa.ForeignKey("heads.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("content_hash", sa.Text, primary_key=True),
    sa.Column("label", sa.Text, primary_key=True),
)
# The unlabelled examples of each head's current version (migration 0005): inputs of the
# domain the head will serve, which its training adapts to (adapters/adaptation.py).
head_unlabeled = sa.Table(
    "head_unlabeled",
    metadata,
    sa.Column("head_id", sa.Text, sa.ForeignKey("heads.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("content_hash", sa.Text, primary_key=True),
)
# One row: a count of the writes that cached copies must see (adapters/coherence.py).
changes = sa.Table(
    "changes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("count", sa.BigInteger, nullable=False),
)

# Training jobs (migration 0003): what a training needs beyond what is stored, and a lease
# that says which process trains it.
training_jobs = sa.Table(
    "training_jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column(
        "tenant_id", sa.Text, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("head_id", sa.Text, sa.ForeignKey("heads.id", ondelete="CASCADE"), nullable=False),
    sa.Column("backbones", sa.Text, nullable=False),  # JSON: the backbones it may choose
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("lease_owner", sa.Text),
    sa.Column("lease_until", sa.Float),  # Unix time
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # JSON {"stage", "done", "total"} while it runs (migration 0008).
    sa.Column("progress", sa.Text),
    sa.Index("training_jobs_by_head", "head_id", "created_at"),
)
job_examples = sa.Table(
    "job_examples",
    metadata,
    sa.Column(
        "job_id",
        sa.Text,
        sa.ForeignKey("training_jobs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("label", sa.Text),  # NULL: an unlabelled example (migration 0005)
    sa.Column("kind", sa.Text, nullable=False),  # "image", "audio" or "text" (UTF-8)
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# The replicas alive (migration 0004): a heartbeat each, written by its runner.
replicas = sa.Table(
    "replicas",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("seen_at", sa.Float, nullable=False),  # Unix time
)
