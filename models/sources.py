"""Where a backbone's files come from: a file or folder on disk or inside an installed
package, or a zip archive shipped in byte-split pieces (joined, checked and unpacked
once); and the content hash that keys a backbone's export."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class BackboneFileError(ValueError):
    """A backbones file or one of its entries is wrong; the message says where and what."""


class FileSource(BaseModel):
    """A file or folder: inside an installed package (`distribution`, the name pip knows),
    or on disk (`path` alone: absolute, or relative to the backbones file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    distribution: str | None = None


class PartsSource(BaseModel):
    """A zip archive shipped in byte-split pieces (one per package): joined in order,
    checked against `sha256`, unpacked once under the backbone cache; `folder` is the
    folder inside the archive that is the source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parts: list[FileSource] = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    folder: str = ""


Source = FileSource | PartsSource


class SourceResolver:
    """Turns an entry's sources into paths, naming the entry in every error."""

    def __init__(self, base: Path, sources_dir: Path, backbone_id: str) -> None:
        self.base = base
        self.sources_dir = sources_dir
        self.backbone_id = backbone_id

    def __call__(self, source: Source) -> Path:
        if isinstance(source, PartsSource):
            return self.assemble(source)
        return self.file(source)

    def file(self, source: FileSource) -> Path:
        if source.distribution is None:
            return (self.base / Path(source.path).expanduser()).resolve()
        try:
            dist = importlib.metadata.distribution(source.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise BackboneFileError(
                f"backbone {self.backbone_id!r}: package {source.distribution!r} is not"
                " installed (make install)"
            ) from None
        return Path(str(dist.locate_file(source.path)))

    def describe(self, source: Source) -> str:
        if isinstance(source, PartsSource):
            names = [p.distribution or p.path for p in source.parts]
            return f"{names[0]} … {names[-1]} ({len(names)} pieces)"
        return source.distribution or "local file"

    def check(self, source: Source) -> None:
        """The source's files exist (without assembling pieces)."""
        files = source.parts if isinstance(source, PartsSource) else [source]
        for part in files:
            path = self.file(part)
            if not path.exists():
                raise BackboneFileError(f"backbone {self.backbone_id!r}: {path} does not exist")

    def assemble(self, source: PartsSource) -> Path:
        """The pieces joined, checked and unpacked under the sources folder, once;
        concurrent callers (the runner, API workers) each unpack beside it and one rename
        wins."""
        target = self.sources_dir / f"{self.backbone_id}-{source.sha256[:16]}"
        folder = target / source.folder if source.folder else target
        if target.is_dir():
            return folder
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            archive = scratch / "archive.zip"
            digest = hashlib.sha256()
            with open(archive, "wb") as out:
                for part in source.parts:
                    with open(self.file(part), "rb") as piece:
                        for chunk in iter(functools.partial(piece.read, 1 << 20), b""):
                            digest.update(chunk)
                            out.write(chunk)
            if digest.hexdigest() != source.sha256:
                raise BackboneFileError(
                    f"backbone {self.backbone_id!r}: the joined pieces have sha256"
                    f" {digest.hexdigest()}, not the declared {source.sha256}"
                )
            unpacked = scratch / "unpacked"
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(unpacked)
            archive.unlink()
            try:
                os.rename(unpacked, target)
            except OSError:
                if not target.is_dir():  # not another process's rename: a real failure
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return folder


@cache
def content_sha256(path: Path) -> str:
    """A file's sha256; for a folder, that of its files' names and contents, in order."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(functools.partial(f.read, 1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
