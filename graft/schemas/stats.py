"""Operations' bodies: what `/v1/stats` says of the predict path."""

from __future__ import annotations

from pydantic import BaseModel, Field


class HeadCacheStats(BaseModel):
    heads: int = Field(description="heads held, summed over the API workers")
    bytes: int
    max_bytes: int = Field(description="the bound of each API worker's cache")
    hits: int
    misses: int
    workers: int = Field(description="API worker processes, each with a cache of its own")


class BatcherStats(BaseModel):
    batches: int
    rows: int
    training_rows: int = Field(description="rows of training jobs, run between predict batches")
    mean_batch_size: float | None
    pass_cpu_s: float = Field(
        description="CPU seconds of the threads that ran backbone passes (on the CPU, each"
        " pass runs on one thread: all of the backbone's CPU)"
    )


class ServingStats(BaseModel):
    head_cache: HeadCacheStats = Field(description="this API worker's head cache")
    batchers: dict[str, BatcherStats] = Field(
        description="the backbone runner's batchers, shared by every API worker"
    )
