"""Image decoding of odd and hostile files: each is either read as a viewer shows it or
refused with an InvalidInput, fast and within bounded memory."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image, ImageOps

from models.preprocess import InvalidInput, decode_image
from service.settings import get_backbone
from tests.inputs import crops

PRE = get_backbone("efficientnet_lite0").preprocessing
SIDE = PRE.image_size


def _encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _decode(data: bytes, max_pixels: int = 4_000_000) -> np.ndarray:
    return decode_image(data, PRE, max_pixels)


def test_sixteen_bit_greyscale_keeps_its_brightness() -> None:
    mid_grey = np.full((64, 64), 32768, dtype=np.uint16)
    decoded = _decode(_encode(Image.fromarray(mid_grey)))
    assert decoded.shape == (SIDE, SIDE, 3)
    assert abs(decoded.mean() - 128) < 2  # PIL's plain conversion gives 255 here


def test_transparent_pixels_show_on_white() -> None:
    for image in (
        Image.new("RGBA", (40, 40), (0, 0, 0, 0)),
        Image.new("LA", (40, 40), (0, 0)),
    ):
        assert _decode(_encode(image)).min() == 255
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert _decode(_encode(palette, transparency=0)).min() == 255
    opaque_red = _decode(_encode(Image.new("RGBA", (40, 40), (255, 0, 0, 255))))
    assert (opaque_red[..., 0] == 255).all() and (opaque_red[..., 1:] == 0).all()


def test_cmyk_palette_and_bilevel_images_read_as_rgb() -> None:
    cmyk_red = _decode(_encode(Image.new("CMYK", (50, 50), (0, 255, 255, 0)), "JPEG"))
    assert cmyk_red[..., 0].mean() > 200 and cmyk_red[..., 1:].mean() < 60
    palette = Image.new("P", (50, 50), 3)
    palette.putpalette([0, 0, 0] * 3 + [0, 0, 255] + [0, 0, 0] * 252)
    assert (_decode(_encode(palette))[..., 2] == 255).all()
    assert _decode(_encode(Image.new("1", (50, 50), 1))).min() == 255


def test_exif_orientation_is_honoured() -> None:
    # A landscape photo stored sideways with orientation 6 ("rotate 90° clockwise").
    upright = Image.open(io.BytesIO(crops("china.jpg", 1, seed=5)[0])).resize((300, 200))
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    as_stored = _decode(_encode(sideways, "JPEG", exif=exif, quality=95))
    expected = _decode(_encode(upright, "JPEG", quality=95))
    assert np.abs(as_stored.astype(int) - expected.astype(int)).mean() < 8
    unrotated = _decode(_encode(sideways, "JPEG", quality=95))
    assert np.abs(unrotated.astype(int) - expected.astype(int)).mean() > 20


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reads_as_pil_turns_it(orientation) -> None:
    # JPEGs take OpenCV's path, which turns the crop itself; PNGs take PIL's, which uses
    # PIL's own exif_transpose. The same stored pixels must come out the same way up.
    stored = Image.open(io.BytesIO(crops("china.jpg", 1, seed=7)[0])).resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    jpeg = _encode(stored, "JPEG", exif=exif, quality=95)
    as_pil_sees_it = ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg)))
    expected = _decode(_encode(as_pil_sees_it, "PNG")).astype(int)
    assert np.abs(_decode(jpeg).astype(int) - expected).mean() < 2
    if orientation != 1:  # the check can fail: the stored pixels as they are differ
        unturned = _decode(_encode(Image.open(io.BytesIO(jpeg)), "PNG")).astype(int)
        assert np.abs(unturned - expected).mean() > 10


def test_large_jpegs_decode_at_a_reduced_scale_like_the_rest() -> None:
    photo = Image.open(io.BytesIO(crops("flower.jpg", 1, seed=2)[0])).resize((2000, 1500))
    as_jpeg = _decode(_encode(photo, "JPEG", quality=95)).astype(int)
    as_png = _decode(_encode(photo, "PNG")).astype(int)  # PIL's path, full scale
    assert np.abs(as_jpeg - as_png).mean() < 3


def test_animated_files_use_their_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    for fmt in ("PNG", "WEBP"):
        data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
        assert Image.open(io.BytesIO(data)).n_frames == 3
        decoded = _decode(data)
        assert decoded[..., 0].min() > 240 and decoded[..., 2].max() < 15, fmt


@pytest.mark.parametrize("size", [(1, 1), (20000, 1), (1, 20000), (3, 9000)])
def test_tiny_and_extreme_aspect_images_are_cheap(size) -> None:
    started = time.perf_counter()
    decoded = _decode(_encode(Image.new("RGB", size, "red")))
    # Resizing a 20000x1 strip whole would make a 4.7-gigapixel intermediate.
    assert time.perf_counter() - started < 2
    assert decoded.shape == (SIDE, SIDE, 3) and (decoded[..., 0] == 255).all()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header that declares a huge image over a tiny body."""
    return _encode(Image.new("1", (width, height)), optimize=True)


@pytest.mark.parametrize(
    ("what", "data", "code"),
    [
        ("decompression bomb", _bomb_png(20_000, 20_000), "image_too_large"),
        ("wide bomb", _bomb_png(4_000_001, 1), "image_too_large"),
        ("zero bytes", b"", "invalid_image"),
        ("text named .jpg", b"hello, I am not a picture", "invalid_image"),
        ("truncated png", _encode(Image.new("RGB", (64, 64), "red"))[:60], "invalid_image"),
        ("jpeg header only", crops("china.jpg", 1, seed=1)[0][:200], "invalid_image"),
        ("gif", _encode(Image.new("RGB", (8, 8)), "GIF"), "unsupported_image_format"),
        ("tiff", _encode(Image.new("RGB", (8, 8)), "TIFF"), "unsupported_image_format"),
        ("bmp", _encode(Image.new("RGB", (8, 8)), "BMP"), "unsupported_image_format"),
    ],
)
def test_broken_and_hostile_images_are_refused(what, data, code) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidInput) as raised:
        _decode(data)
    assert raised.value.code == code
    assert time.perf_counter() - started < 2, what
