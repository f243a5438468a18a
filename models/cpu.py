"""The CPU that ONNX Runtime's kernels run on, and a way to run models as another x86-64 CPU
would (QEMU's user mode), so that tests and benchmarks can show that a result does not
depend on the CPU.

x86-64 CPUs differ in what ONNX Runtime's INT8 kernels use: with VNNI (AVX-512 VNNI or
AVX-VNNI) products of uint8 and int8 are added in 32 bits; without it (AVX2 only, or
AVX-512 without VNNI) VPMADDUBSW adds two of them in 16 bits, which saturates when both
are large (models/quantize.py says how Graft's INT8 recipe avoids that).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

# The flags that choose ONNX Runtime's CPU kernels.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
# QEMU's model of a CPU with AVX2 and neither AVX-512 nor VNNI (like many EPYCs).
AVX2_ONLY = "Haswell-noTSX-IBRS"
_EMBED = """
import sys
import numpy as np
import onnxruntime as ort
sessions = {}
for model, feeds, out in zip(*[iter(sys.argv[1:])] * 3):
    if model not in sessions:
        sessions[model] = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    np.save(out, sessions[model].run(["embedding"], dict(np.load(feeds)))[0])
"""


def describe() -> str:
    """The CPU's model name and kernel flags, e.g. "AMD EPYC (avx2 avx512f avx512_vnni)"."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip() and fields:
            break  # the first processor is enough
    flags = set(fields.get("flags", "").split())
    present = " ".join(flag for flag in KERNEL_FLAGS if flag in flags) or "no AVX2"
    return f"{fields.get('model name', 'unknown CPU')} ({present})"


def embed_as(
    cpu_model: str, models: list[tuple[Path, dict[str, np.ndarray]]], scratch: Path
) -> list[np.ndarray]:
    """Each model's `embedding` output for its feeds, computed by ONNX Runtime in this
    Python run by `qemu-x86_64 -cpu cpu_model` (Debian's qemu-user): as that CPU would."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise RuntimeError("qemu-x86_64 is missing: apt-get install qemu-user")
    arguments = []
    for i, (path, feeds) in enumerate(models):
        arrays: dict[str, Any] = dict(feeds)  # by input name (numpy's stub types no such keys)
        np.savez(scratch / f"feeds-{i}.npz", **arrays)
        arguments += [str(path), str(scratch / f"feeds-{i}.npz"), str(scratch / f"out-{i}.npy")]
    done = subprocess.run(
        [qemu, "-cpu", cpu_model, sys.executable, "-c", _EMBED, *arguments],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the emulated run failed:\n{done.stderr[-3000:]}")
    return [np.load(scratch / f"out-{i}.npy") for i in range(len(models))]
