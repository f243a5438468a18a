"""Export a registered backbone to ONNX once, cached by the hash of its weights.

This is the only module on the serving side that imports torch, and only when a backbone
has no cached export yet (`make serve` prepares them ahead of time).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from models.audio import example_audio_feeds
from models.graph_surgery import DEPTH_WIDTHS_KEY, fold_fixed_size
from models.registry import BackboneFileError, BackboneSpec, ImagePreprocessing

log = logging.getLogger(__name__)

OPSET = 17
# Bump when the exported graph changes for the same weights (wrapper, opset, names).
# 2: image graphs carry their input-size arithmetic as constants (`fold_fixed_size`).
# 3: keyed by the weights and the declaration (backbones files), not the weights alone.
# 4: a second output, `depths` (models/depths.py), with their widths in the metadata.
EXPORT_REVISION = 4


def cached_onnx_path(spec: BackboneSpec, cache_dir: Path) -> Path:
    return cache_dir / f"{spec.id}-{spec.export_key()[:16]}-r{EXPORT_REVISION}.onnx"


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


def split_onnx_paths(spec: BackboneSpec, cache_dir: Path) -> tuple[Path, Path]:
    """Where the backbone's trunk and top (models/split.py) are cached."""
    stem = cached_onnx_path(spec, cache_dir).with_suffix("")
    return stem.with_name(f"{stem.name}-trunk.onnx"), stem.with_name(f"{stem.name}-top.onnx")


def split_exported(spec: BackboneSpec, cache_dir: Path) -> bool:
    """Whether the backbone's trunk and top are exported (and checked): what the runner
    serves fine-tuned heads with, and what training asks before fine-tuning."""
    return all(path.exists() for path in split_onnx_paths(spec, cache_dir))


def ensure_split(spec: BackboneSpec, cache_dir: Path) -> tuple[Path, Path] | None:
    """The backbone's trunk and top as ONNX files, exported and checked against the whole
    graph first if not cached; None for a backbone that cannot be split (fine-tuning is
    for BERT-family and MPNet encoders and timm's EfficientNet class), the reason logged
    and kept beside the cache so that it is not tried again."""
    paths = split_onnx_paths(spec, cache_dir)
    refused = paths[0].with_name(paths[0].name.removesuffix("-trunk.onnx") + "-unsplit.txt")
    if spec.build_split is None or refused.exists():
        return None
    if split_exported(spec, cache_dir):
        return paths
    from models.split import export_split

    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("exporting the trunk and top of backbone %s", spec.id)
    # Written beside the targets and renamed, as `ensure_onnx` does.
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{spec.id}-split-"))
    try:
        export_split(*spec.build_split(), tmp / "trunk.onnx", tmp / "top.onnx")
        _check_split(spec, ensure_onnx(spec, cache_dir), tmp / "trunk.onnx", tmp / "top.onnx")
        os.replace(tmp / "trunk.onnx", paths[0])
        os.replace(tmp / "top.onnx", paths[1])
    except Exception as exc:  # an encoder this cut does not know: served whole
        log.warning(
            "backbone %s cannot be split for fine-tuning (served whole; delete %s to try"
            " again): %s",
            spec.id,
            refused,
            exc,
        )
        refused.write_text(f"{type(exc).__name__}: {exc}\n")
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _check_split(spec: BackboneSpec, whole: Path, trunk: Path, top: Path) -> None:
    """The trunk and the top, with no factors, give the whole graph's embeddings."""
    import numpy as np
    import onnxruntime as ort

    def session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    if isinstance(spec.preprocessing, ImagePreprocessing):
        side = spec.preprocessing.image_size
        feeds = {"image": np.random.default_rng(0).integers(0, 256, (2, side, side, 3), np.uint8)}
        extra = {}
    else:
        ids = np.array([[1, 5, 7, 9, 11, 2, 0, 0]] * 2, np.int64)  # ids any vocabulary has
        mask = np.ones_like(ids)
        mask[1, 5:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask}
        extra = {"attention_mask": mask}

    def outputs(session: ort.InferenceSession, feeds: dict) -> tuple[np.ndarray, np.ndarray]:
        """The first output, and the depths (none: zero columns)."""
        first, *depths = session.run(None, feeds)
        return first, depths[0] if depths else np.zeros((len(first), 0), np.float32)

    expected = outputs(session(whole), feeds)
    top_session = session(top)
    factors = {
        i.name: np.zeros(i.shape, np.float32)
        for i in top_session.get_inputs()
        if i.name.startswith("lora_")
    }
    hidden, trunk_depths = outputs(session(trunk), feeds)
    embedding, top_depths = outputs(top_session, {"hidden": hidden, **extra, **factors})
    for name, got, want in [
        ("embeddings", embedding, expected[0]),
        ("depths", np.hstack([trunk_depths, top_depths]), expected[1]),
    ]:
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-3):
            raise ValueError(f"the trunk and top's {name} differ from the whole graph's")


def ensure_variant(spec: BackboneSpec, cache_dir: Path, variant: str) -> Path:
    """The backbone's ONNX file in `variant` ("fp32", "int8" or "fp16"), made once."""
    fp32 = ensure_onnx(spec, cache_dir)
    if variant == "fp32":
        return fp32
    if variant == "int8":
        from models.quantize import ensure_int8

        return ensure_int8(spec, fp32)
    if variant == "fp16":
        from models.quantize import ensure_fp16

        return ensure_fp16(spec, fp32)
    raise ValueError(f"unknown variant {variant!r}")


def export_onnx(spec: BackboneSpec, path: Path) -> None:
    """The backbone as one ONNX graph: preprocessed input in, embedding out; its size is
    checked against the declared `embedding_dim`."""
    if spec.onnx_file is not None:
        _wrap_declared_onnx(spec, path)
    else:
        _export_module(spec, path)
    _check_embedding_size(spec, path)


def _wrap_declared_onnx(spec: BackboneSpec, path: Path) -> None:
    from models.onnx_backbone import wrap_onnx

    assert spec.onnx_file is not None, "an onnx entry declares its file"
    pre = spec.preprocessing
    image: dict[str, Any] = {}
    if isinstance(pre, ImagePreprocessing):
        image = {"image_size": pre.image_size, "mean": pre.mean, "std": pre.std}
    try:
        wrap_onnx(
            spec.onnx_file(),
            path,
            modality=spec.modality,
            output=spec.extra["output"],
            pooling=spec.extra["pooling"],
            **image,
        )
    except ValueError as exc:
        raise BackboneFileError(f"backbone {spec.id!r}: {exc}") from None


def _check_embedding_size(spec: BackboneSpec, path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if spec.modality == "image":
        side = spec.image_preprocessing.image_size
        feeds = {"image": np.zeros((2, side, side, 3), np.uint8)}
    elif spec.modality == "audio":
        feeds = example_audio_feeds(spec.audio_preprocessing.sample_rate)
    else:
        feeds = {name: np.ones((2, 8), np.int64) for name in spec.onnx_inputs}
    shape = session.run(["embedding"], feeds)[0].shape
    if shape != (2, spec.embedding_dim):
        raise BackboneFileError(
            f"backbone {spec.id!r}: declared embedding_dim {spec.embedding_dim}, but the"
            f" model gives embeddings of shape {shape[1:]}"
        )
    widths = depth_widths(session)
    if widths:
        depths = session.run(["depths"], feeds)[0]
        assert depths.shape == (2, sum(widths)), f"depths {depths.shape}, widths {widths}"


def depth_widths(session: Any) -> list[int]:
    """The widths of the `depths` an ONNX Runtime session's graph gives ([]: none)."""
    import json

    raw = session.get_modelmeta().custom_metadata_map.get(DEPTH_WIDTHS_KEY)
    return json.loads(raw) if raw else []


def _export_module(spec: BackboneSpec, path: Path) -> None:
    import torch

    assert spec.build_module is not None, "a backbone that is not an onnx entry builds one"
    from models.depths import Outputs

    module = spec.build_module()
    if isinstance(spec.preprocessing, ImagePreprocessing):
        side = spec.preprocessing.image_size
        dummy: tuple = (torch.zeros(2, side, side, 3, dtype=torch.uint8),)
        dynamic_axes = {"image": {0: "batch"}}
    elif spec.modality == "audio":
        # Two rows of different lengths (several partials, and one short clip), so that the
        # trace keeps the partial windows' count computed from the lengths.
        feeds = example_audio_feeds(spec.audio_preprocessing.sample_rate)
        dummy = tuple(torch.from_numpy(feeds[name]) for name in spec.onnx_inputs)
        dynamic_axes = {"waveform": {0: "batch", 1: "samples"}, "samples": {0: "batch"}}
    else:
        ids = torch.ones(2, 8, dtype=torch.int64)
        dummy = (ids, torch.ones_like(ids))
        dynamic_axes = {
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
        }
    widths = module.depth_widths()
    outputs = ["embedding", "depths"] if widths else ["embedding"]
    with torch.inference_mode():
        torch.onnx.export(
            Outputs(module) if widths else module,
            dummy,
            str(path),
            input_names=list(spec.onnx_inputs),
            output_names=outputs,
            dynamic_axes={**dynamic_axes, **{name: {0: "batch"} for name in outputs}},
            opset_version=OPSET,
            dynamo=False,
        )
    if isinstance(spec.preprocessing, ImagePreprocessing):
        fold_fixed_size(path)
    write_depth_widths(path, widths)


def write_depth_widths(path: Path, widths: list[int]) -> None:
    """Records the widths of the graph's `depths` in its metadata ([]: it has none)."""
    import json

    import onnx

    model = onnx.load(str(path))
    model.metadata_props.add(key=DEPTH_WIDTHS_KEY, value=json.dumps([int(w) for w in widths]))
    onnx.save(model, str(path))
