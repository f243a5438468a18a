"""Export a registered backbone to ONNX once, cached by the hash of its weights.

This is the only module on the serving side that imports torch, and only when a backbone
has no cached export yet (`make serve` prepares them ahead of time).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from models.registry import BackboneSpec, ImagePreprocessing

log = logging.getLogger(__name__)

OPSET = 17
# Bump when the exported graph changes for the same weights (wrapper, opset, names).
EXPORT_REVISION = 1


def cached_onnx_path(spec: BackboneSpec, cache_dir: Path) -> Path:
    return cache_dir / f"{spec.id}-{spec.weights_hash()[:16]}-r{EXPORT_REVISION}.onnx"


def ensure_onnx(spec: BackboneSpec, cache_dir: Path) -> Path:
    """Path of the backbone's ONNX file, exporting it first if it is not cached."""
    path = cached_onnx_path(spec, cache_dir)
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("exporting backbone %s to %s", spec.id, path)
    # Write beside the target and rename, so a crash never leaves a half-written model
    # under the name that is read back.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{spec.id}-", suffix=".onnx")
    os.close(fd)
    try:
        export_onnx(spec, Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def ensure_variant(spec: BackboneSpec, cache_dir: Path, variant: str) -> Path:
    """The backbone's ONNX file in `variant` ("fp32" or "int8"), made once."""
    fp32 = ensure_onnx(spec, cache_dir)
    if variant == "fp32":
        return fp32
    if variant == "int8":
        from models.quantize import ensure_int8

        return ensure_int8(spec, fp32)
    raise ValueError(f"unknown variant {variant!r}")


def export_onnx(spec: BackboneSpec, path: Path) -> None:
    import torch

    module = spec.build_module()
    if isinstance(spec.preprocessing, ImagePreprocessing):
        side = spec.preprocessing.image_size
        dummy: tuple = (torch.zeros(2, side, side, 3, dtype=torch.uint8),)
        dynamic_axes = {"image": {0: "batch"}, "embedding": {0: "batch"}}
    else:
        ids = torch.ones(2, 8, dtype=torch.int64)
        dummy = (ids, torch.ones_like(ids))
        dynamic_axes = {
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
            "embedding": {0: "batch"},
        }
    with torch.inference_mode():
        torch.onnx.export(
            module,
            dummy,
            str(path),
            input_names=list(spec.onnx_inputs),
            output_names=["embedding"],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )


def main() -> None:
    """`python -m models.export`: prepare every registered backbone in every variant
    (used by `make serve`), so that neither serving nor a download waits for it."""
    from models.quantize import VARIANTS
    from models.registry import list_backbones
    from service.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings()
    for spec in list_backbones():
        for variant in VARIANTS:
            print(f"{spec.id} {variant}: {ensure_variant(spec, settings.backbone_dir, variant)}")


if __name__ == "__main__":
    main()
