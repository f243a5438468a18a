"""The peer a user would otherwise pick: one complete model per tenant, loaded on demand.

Each tenant owns a fine-tuned model: EfficientNet-Lite0 (timm, PyTorch) plus its own
linear head, stored as a full checkpoint as any fine-tuning recipe leaves it. A request
for a tenant whose model is not loaded reads that checkpoint and builds the model, evicting
the least recently used of at most PEER_MODELS models (as Ray Serve's model multiplexing
or TorchServe with per-tenant models do). Requests run per tenant, one forward each; no
batching across tenants. Same preprocessing and the same HTTP/JSON shape as Graft.

    PEER_DIR=/tmp/peer PEER_MODELS=32 python -m uvicorn bench.peer_server:app --port 3001
"""

from __future__ import annotations

import base64
import os
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.preprocess import decode_image
from models.timm_backbone import load_timm_model
from service.settings import get_backbone

CHECKPOINTS = Path(os.environ.get("PEER_DIR", "/tmp/graft-peer"))
MAX_MODELS = int(os.environ.get("PEER_MODELS", "32"))
N_LABELS = 2
PRE = get_backbone("efficientnet_lite0").preprocessing
torch.set_num_threads(int(os.environ.get("PEER_THREADS", os.cpu_count() or 1)))


# Tenants share CHECKPOINT_FILES files on disk (19 MB each; 1,000 distinct ones would not
# fit the disk budget). That flatters the peer: its loads read from the page cache.
CHECKPOINT_FILES = 8


def checkpoint_path(tenant: str) -> Path:
    return CHECKPOINTS / f"model-{int(tenant.rsplit('-', 1)[-1]) % CHECKPOINT_FILES}.pt"


def write_checkpoints() -> None:
    for i in range(CHECKPOINT_FILES):
        write_checkpoint(f"tenant-{i}", seed=i)


def write_checkpoint(tenant: str, seed: int) -> None:
    """A tenant's fine-tuned model: the full backbone plus its own head, in one file."""
    lite0 = get_backbone("efficientnet_lite0")
    model = load_timm_model(
        "tf_efficientnet_lite0", lite0.weights_file(), layout="by_position", keep_classifier=True
    )
    model.reset_classifier(N_LABELS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.get_classifier().weight.copy_(torch.randn(N_LABELS, 1280, generator=generator))
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), checkpoint_path(tenant))


def load_model(tenant: str) -> torch.nn.Module:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=N_LABELS)
    model.load_state_dict(
        torch.load(checkpoint_path(tenant), map_location="cpu", weights_only=True)
    )
    return model.eval()


class ModelLRU:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.models: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self.loads = 0
        self.lock = threading.Lock()

    def get(self, tenant: str) -> torch.nn.Module:
        with self.lock:
            if tenant in self.models:
                self.models.move_to_end(tenant)
                return self.models[tenant]
        model = load_model(tenant)
        with self.lock:
            self.loads += 1
            self.models[tenant] = model
            while len(self.models) > self.capacity:
                self.models.popitem(last=False)
        return model


class Input(BaseModel):
    image: str


class PredictRequest(BaseModel):
    inputs: list[Input]


app = FastAPI()
models = ModelLRU(MAX_MODELS)


@app.post("/predict/{tenant}")
def predict(tenant: str, body: PredictRequest) -> dict:
    model = models.get(tenant)
    batch = np.stack([decode_image(base64.b64decode(x.image), PRE, 10**8) for x in body.inputs])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.inference_mode():
        probabilities = model(x).softmax(dim=1).numpy()
    return {
        "predictions": [{"label": int(p.argmax()), "score": float(p.max())} for p in probabilities]
    }


@app.get("/stats")
def stats() -> dict:
    return {"loaded": len(models.models), "loads": models.loads}
