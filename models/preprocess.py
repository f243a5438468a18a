"""Turn user inputs into the tensors a backbone's ONNX graph takes. No torch here."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from models.registry import BackboneSpec, ImagePreprocessing

ACCEPTED_IMAGE_FORMATS = {"JPEG", "PNG", "WEBP"}
# OpenCV's resampling: 0.1 ms for a 243 px crop to 224 px, against PIL's 0.94 ms, where it
# was a quarter of an API worker's CPU per single-image predict (BENCHMARKS.md, issue 10).
_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
# One thread: the API workers decode in parallel already, one image per thread.
cv2.setNumThreads(1)
_JPEG_SCALE = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
# EXIF orientation -> what turns the stored pixels upright (as PIL's exif_transpose does).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


class InvalidInput(ValueError):
    """An input the backbone cannot take; `code` is the API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_images(
    items: Sequence[tuple[int, bytes]],
    pre: ImagePreprocessing,
    max_pixels: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """(position, bytes) pairs to uint8 NHWC rows, written into `out` when given; an error
    names the input's position."""
    side = pre.image_size
    rows = np.empty((len(items), side, side, 3), np.uint8) if out is None else out
    for i, (position, data) in enumerate(items):
        try:
            rows[i] = decode_image(data, pre, max_pixels)
        except InvalidInput as exc:
            raise InvalidInput(exc.code, f"input {position}: {exc.message}") from None
    return rows


def decode_image(data: bytes, pre: ImagePreprocessing, max_pixels: int) -> np.ndarray:
    """JPEG/PNG/WebP bytes to a uint8 HWC RGB array of `pre.image_size` squared.

    The pixel count is checked from the header, before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_IMAGE_FORMATS:
                raise InvalidInput(
                    "unsupported_image_format",
                    f"image format {image.format} is not accepted; send JPEG, PNG or WebP",
                )
            width, height = image.size
            if width * height > max_pixels or width < 1 or height < 1:
                raise InvalidInput(
                    "image_too_large",
                    f"image is {width}x{height} pixels; the limit is {max_pixels} pixels",
                )
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return _decode_jpeg(data, image, pre)
            ImageOps.exif_transpose(image, in_place=True)  # no copy when upright
            left, top, side = _centre_square(width, height, pre)
            pixels = np.asarray(_to_rgb(image).crop((left, top, left + side, top + side)))
            return _resize_square(pixels, pre)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own guard, raised at open for headers far over its limit.
        raise InvalidInput(
            "image_too_large", f"image is over the limit of {max_pixels} pixels"
        ) from None
    except UnidentifiedImageError:
        raise InvalidInput(
            "invalid_image", "the bytes are not a readable JPEG, PNG or WebP image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput("invalid_image", f"the image could not be decoded: {exc}") from None


def augmented_views(
    data: bytes, pre: ImagePreprocessing, count: int, rng: np.random.Generator
) -> np.ndarray:
    """`count` random views of an image already accepted (decode_image): a random resized
    crop (30-100% of the area, aspect 3/4 to 4/3) and a horizontal flip at random, each
    resized to `image_size` squared, uint8 NHWC. What fine-tuning trains an image top on."""
    opened = Image.open(io.BytesIO(data))
    opened.draft("RGB", (pre.resize_size, pre.resize_size))  # JPEG: decode at a smaller scale
    pixels = np.asarray(_to_rgb(ImageOps.exif_transpose(opened)))
    height, width = pixels.shape[:2]
    views = np.empty((count, pre.image_size, pre.image_size, 3), np.uint8)
    for i in range(count):
        area = width * height * rng.uniform(0.3, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_w = min(width, max(1, round((area * aspect) ** 0.5)))
        crop_h = min(height, max(1, round((area / aspect) ** 0.5)))
        left = rng.integers(0, width - crop_w + 1)
        top = rng.integers(0, height - crop_h + 1)
        crop = pixels[top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        size = (pre.image_size, pre.image_size)
        views[i] = cv2.resize(
            np.ascontiguousarray(crop), size, interpolation=_INTERPOLATION[pre.interpolation]
        )
    return views


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any accepted mode to 8-bit RGB, as a viewer would show it."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit greyscale: PIL's own conversion clips at 255 (nearly all white); scale it.
        pixels = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((pixels >> 8).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent pixels hold arbitrary colours: show them on white, as viewers do.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _decode_jpeg(data: bytes, header: Image.Image, pre: ImagePreprocessing) -> np.ndarray:
    """The common photo, in OpenCV: 0.42 ms against PIL's 0.59 for a 256 px JPEG, the same
    pixels, and none of it holding the GIL (BENCHMARKS.md, issue 10). PIL has read the
    header: format, size and orientation."""
    width, height = header.size
    # Decode at 1/2, 1/4 or 1/8 scale where the image is that much larger than needed,
    # never below what it is resized to (PIL's draft does the same).
    scale = next(s for s in (8, 4, 2, 1) if min(width, height) // s >= pre.resize_size or s == 1)
    flags = _JPEG_SCALE[scale] | cv2.IMREAD_IGNORE_ORIENTATION  # BGR, as stored
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if pixels is None:
        raise InvalidInput("invalid_image", "the JPEG could not be decoded (truncated or corrupt)")
    height, width = pixels.shape[:2]
    left, top, side = _centre_square(width, height, pre)
    square = _resize_square(pixels[top : top + side, left : left + side], pre)
    # The centre square of the stored image, turned upright: the same as turning first.
    orientation = header.getexif().get(ExifTags.Base.Orientation, 1)
    square = cv2.cvtColor(square, cv2.COLOR_BGR2RGB)
    if orientation in _ORIENT:
        square = np.ascontiguousarray(_ORIENT[orientation](square))
    return square


def _centre_square(width: int, height: int, pre: ImagePreprocessing) -> tuple[int, int, int]:
    """(left, top, side) of the centre square that becomes the `image_size` crop once the
    shorter side is resized to `resize_size`, in whole source pixels (at most half a pixel
    off centre). Only this square is resampled, so a 20000x1 strip costs what a square
    does (resizing it whole first would make a 4.7-gigapixel intermediate)."""
    side = max(1, round(min(width, height) * pre.image_size / pre.resize_size))
    return (width - side) // 2, (height - side) // 2, side


def _resize_square(pixels: np.ndarray, pre: ImagePreprocessing) -> np.ndarray:
    """A square HWC RGB array to `image_size` squared."""
    factor = len(pixels) // pre.image_size
    if factor >= 2:
        # Cubic and linear filters alias when shrinking by 2x or more: average blocks of
        # factor x factor pixels first, leaving under 2x.
        reduced = len(pixels) // factor
        pixels = cv2.resize(pixels, (reduced, reduced), interpolation=cv2.INTER_AREA)
    size = (pre.image_size, pre.image_size)
    return cv2.resize(pixels, size, interpolation=_INTERPOLATION[pre.interpolation])


@cache
def load_tokenizer(tokenizer_file: Path, max_tokens: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length=max_tokens)
    # Rows are padded when they meet in a batch (`pad_tokens`); a tokenizer file may ask
    # for a fixed padding (MiniLM's: 128), which would turn pads into tokens here.
    tokenizer.no_padding()
    return tokenizer


def token_ids(texts: list[str], tokenizer) -> list[np.ndarray]:
    """One int64 array of token ids per text, truncated, unpadded: rows of several
    requests are padded together when they meet in a batch (`pad_tokens`)."""
    return [np.array(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(texts)]


def text_rows(spec: BackboneSpec, texts: list[str]) -> list[np.ndarray]:
    """Checked texts to a text backbone's token-id rows."""
    pre = spec.text_preprocessing
    return token_ids(texts, load_tokenizer(pre.tokenizer_file(), pre.max_tokens))


def pad_tokens(ids: list[np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """`input_ids` and `attention_mask`, padded to the longest row of this batch only."""
    longest = max((len(row) for row in ids), default=0)
    input_ids = np.full((len(ids), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(ids), longest), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tokenize(texts: list[str], tokenizer, pad_id: int) -> dict[str, np.ndarray]:
    """Texts to the text graph's feeds, padded to the longest text of this batch."""
    return pad_tokens(token_ids(texts, tokenizer), pad_id)
