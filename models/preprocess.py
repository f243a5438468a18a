"""Turn user inputs into the tensors a backbone's ONNX graph takes. No torch here."""

from __future__ import annotations

import io
import warnings
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.registry import ImagePreprocessing

ACCEPTED_IMAGE_FORMATS = {"JPEG", "PNG", "WEBP"}
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class InvalidInput(ValueError):
    """An input the backbone cannot take; `code` is the API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
            # JPEG can decode at a reduced scale for free; never below what we resize to.
            image.draft("RGB", (pre.resize_size, pre.resize_size))
            image = ImageOps.exif_transpose(image)
            image = image.convert("RGB")
            return _resize_and_crop(image, pre)
    except InvalidInput:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(
            "invalid_image", "the bytes are not a readable JPEG, PNG or WebP image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput("invalid_image", f"the image could not be decoded: {exc}") from None


def _resize_and_crop(image: Image.Image, pre: ImagePreprocessing) -> np.ndarray:
    width, height = image.size
    scale = pre.resize_size / min(width, height)
    size = (max(pre.image_size, round(width * scale)), max(pre.image_size, round(height * scale)))
    image = image.resize(size, _RESAMPLE[pre.interpolation])
    left = (size[0] - pre.image_size) // 2
    top = (size[1] - pre.image_size) // 2
    image = image.crop((left, top, left + pre.image_size, top + pre.image_size))
    return np.asarray(image, dtype=np.uint8)


@cache
def load_tokenizer(tokenizer_file: Path, max_tokens: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    return tokenizer


def tokenize(texts: list[str], tokenizer) -> dict[str, np.ndarray]:
    """Pad to the longest text of this batch, not to a fixed length."""
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }
