"""Examples from a zip archive in the layout users already have: one folder per label.
(Unlabelled examples: any files, in any folders.)

    flowers.zip
    ├── daisy/001.jpg ...        (or flowers/daisy/001.jpg: one common top folder is fine)
    └── tulips/001.jpg ...

For a text backbone each file holds one example (UTF-8 text); for an audio backbone each
file is a clip (WAV, FLAC, OGG, MP3). With `backbone: auto` the files' names say which
modality the archive holds (`archive_modality`).
"""

from __future__ import annotations

import io
import stat
import zipfile
import zlib
from pathlib import PurePosixPath
from typing import cast

from service.errors import PayloadTooLarge, Unprocessable
from service.inputs import InputKind, RawInput
from service.settings import Settings

# Magic numbers of archive formats: an archive inside the archive is refused, not unpacked.
_ARCHIVE_MAGIC = (b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf", b"Rar!")
# What reading a damaged or unsupported member raises (bad CRC, broken deflate stream,
# an unknown compression method, a password).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)


def _invalid(message: str) -> Unprocessable:
    return Unprocessable(message, code="invalid_archive")


def _ignored(parts: tuple[str, ...]) -> bool:
    # macOS resource forks and hidden files (.DS_Store) are not examples.
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _declared_entries(data: bytes) -> int | None:
    """The entry count in the end record, read before zipfile builds an object per entry
    (a 64 MiB body can declare 700,000 of them: 400 MiB and seconds to parse)."""
    # The stdlib's own (private, untyped) reader of that record.
    end = zipfile._EndRecData(io.BytesIO(data))  # type: ignore[attr-defined]
    return None if end is None else end[zipfile._ECD_ENTRIES_TOTAL]  # type: ignore[attr-defined]


AUDIO_SUFFIXES = {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3"}
TEXT_SUFFIXES = {".txt"}


def archive_modality(names: list[str]) -> str:
    """The modality of an archive's files, by their names: audio when every file is a
    clip, text when every file is a text, images otherwise (a photo's name says less)."""
    suffixes = {PurePosixPath(name).suffix.lower() for name in names}
    if suffixes <= AUDIO_SUFFIXES:
        return "audio"
    return "text" if suffixes <= TEXT_SUFFIXES else "image"


def examples_from_zip(
    data: bytes, modality: str | None, settings: Settings
) -> list[tuple[str, RawInput]]:
    """Labelled examples of `modality` (None: `archive_modality`'s)."""
    files = _archive_files(data, settings)
    if modality is None:
        modality = archive_modality([name for _, name, _ in files])
    # A zip of the data set's folder puts everything under one top folder: strip it.
    tops = {parts[0] for parts, _, _ in files}
    strip = 1 if len(tops) == 1 and all(len(parts) == 3 for parts, _, _ in files) else 0
    examples = []
    for parts, name, content in files:
        parts = parts[strip:]
        if len(parts) != 2:
            raise _invalid(f"{name}: put each file in a folder named after its label")
        examples.append((parts[0], _raw(content, modality, name)))
    return examples


def inputs_from_zip(data: bytes, modality: str, settings: Settings) -> list[RawInput]:
    """Unlabelled examples: every file of the archive, whatever folders hold them."""
    return [_raw(content, modality, name) for _, name, content in _archive_files(data, settings)]


def _archive_files(data: bytes, settings: Settings) -> list[tuple[tuple[str, ...], str, bytes]]:
    """(path parts, name, content) of every file that is an example, checked: safe paths,
    no links, passwords or nested archives, within the limits on files and bytes."""
    declared = _declared_entries(data)
    if declared is None:
        raise _invalid("'archive' is not a zip file")
    if declared > 2 * settings.max_archive_files:  # leave room for folders and hidden files
        raise PayloadTooLarge(
            f"{declared} entries in the archive; at most {settings.max_archive_files} files",
            code="archive_too_large",
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, *_READ_ERRORS):
        raise _invalid("'archive' is not a zip file") from None
    with archive:
        files = []
        for info in archive.infolist():
            if info.is_dir():
                continue
            path = PurePosixPath(info.filename.replace("\\", "/"))
            if path.is_absolute() or ".." in path.parts:
                raise _invalid(f"unsafe path in archive: {info.filename}")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise _invalid(f"{info.filename} is a symbolic link; send the file itself")
            if info.flag_bits & 0x1:
                raise _invalid(f"{info.filename} is encrypted; send an archive without a password")
            if not _ignored(path.parts):
                files.append((path.parts, info))
        if not files:
            raise _invalid("the archive holds no files")
        if len(files) > settings.max_archive_files:
            raise PayloadTooLarge(
                f"{len(files)} files in the archive; at most {settings.max_archive_files}",
                code="archive_too_large",
            )
        contents = []
        total = 0
        for parts, info in files:
            try:
                with archive.open(info) as f:
                    # Read at most the remaining budget + 1: a header may lie about sizes.
                    content = f.read(settings.max_archive_bytes - total + 1)
            except _READ_ERRORS as exc:
                raise _invalid(f"{info.filename} could not be read: {exc}") from None
            total += len(content)
            if total > settings.max_archive_bytes:
                raise PayloadTooLarge(
                    f"archive uncompresses to over {settings.max_archive_bytes} bytes",
                    code="archive_too_large",
                )
            if content.startswith(_ARCHIVE_MAGIC):
                raise _invalid(f"{info.filename} is an archive; nested archives are not unpacked")
            contents.append((parts, info.filename, content))
    return contents


def _raw(content: bytes, modality: str, name: str) -> RawInput:
    if modality in ("image", "audio"):
        return RawInput(cast(InputKind, modality), content)
    try:
        return RawInput("text", content.decode("utf-8").strip())
    except UnicodeDecodeError:
        raise Unprocessable(f"{name} is not UTF-8 text", code="invalid_text") from None
