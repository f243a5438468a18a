"""Examples from a zip archive in the layout users already have: one folder per label.

    flowers.zip
    ├── daisy/001.jpg ...        (or flowers/daisy/001.jpg: one common top folder is fine)
    └── tulips/001.jpg ...

For a text backbone each file holds one example (UTF-8 text).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import PurePosixPath

from service.core import RawInput
from service.errors import PayloadTooLarge, Unprocessable
from service.settings import Settings


def _ignored(parts: tuple[str, ...]) -> bool:
    # macOS resource forks and hidden files (.DS_Store) are not examples.
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def examples_from_zip(data: bytes, modality: str, settings: Settings) -> list[tuple[str, RawInput]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError):
        raise Unprocessable("'archive' is not a zip file", code="invalid_archive") from None
    with archive:
        files = []
        for info in archive.infolist():
            if info.is_dir():
                continue
            path = PurePosixPath(info.filename.replace("\\", "/"))
            if path.is_absolute() or ".." in path.parts:
                raise Unprocessable(
                    f"unsafe path in archive: {info.filename}", code="invalid_archive"
                )
            if not _ignored(path.parts):
                files.append((path.parts, info))
        if not files:
            raise Unprocessable("the archive holds no files", code="invalid_archive")
        if len(files) > settings.max_archive_files:
            raise PayloadTooLarge(
                f"{len(files)} files in the archive; at most {settings.max_archive_files}",
                code="archive_too_large",
            )
        # A zip of the data set's folder puts everything under one top folder: strip it.
        tops = {parts[0] for parts, _ in files}
        strip = 1 if len(tops) == 1 and all(len(parts) == 3 for parts, _ in files) else 0
        examples = []
        total = 0
        for parts, info in files:
            parts = parts[strip:]
            if len(parts) != 2:
                raise Unprocessable(
                    f"{info.filename}: put each file in a folder named after its label",
                    code="invalid_archive",
                )
            with archive.open(info) as f:
                # Read at most the remaining budget + 1: a header may lie about sizes.
                content = f.read(settings.max_archive_bytes - total + 1)
            total += len(content)
            if total > settings.max_archive_bytes:
                raise PayloadTooLarge(
                    f"archive uncompresses to over {settings.max_archive_bytes} bytes",
                    code="archive_too_large",
                )
            examples.append((parts[0], _raw(content, modality, info.filename)))
    return examples


def _raw(content: bytes, modality: str, name: str) -> RawInput:
    if modality == "image":
        return RawInput("image", content)
    try:
        return RawInput("text", content.decode("utf-8").strip())
    except UnicodeDecodeError:
        raise Unprocessable(f"{name} is not UTF-8 text", code="invalid_text") from None
