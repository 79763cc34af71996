"""Decoding every image mode PIL produces, masks by index, and the decode errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from wsss.imageio import (
    ImageDecodeError,
    ImageTooLargeError,
    MaskFormatError,
    decode_image,
    decode_mask,
    encode_mask,
    read_image,
    read_mask,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (5, 7), dtype=np.uint8)


def save(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def palette_image(indices: np.ndarray) -> Image.Image:
    im = Image.fromarray(indices.astype(np.uint8)).convert("P")
    im.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return im


def test_rgb_png_is_exact():
    out = decode_image(save(Image.fromarray(RGB)))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_single_channel_modes_repeat_to_three_channels(mode):
    im = Image.fromarray(GRAY).convert(mode)
    out = decode_image(save(im))
    expected = np.asarray(im.convert("L"))
    assert out.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], expected)


def test_one_bit_image_is_black_and_white():
    bits = GRAY > 127
    out = decode_image(save(Image.fromarray(bits)))
    np.testing.assert_array_equal(out[:, :, 0], np.where(bits, 255, 0))


def test_la_drops_alpha():
    alpha = np.zeros_like(GRAY)
    out = decode_image(save(Image.fromarray(np.stack([GRAY, alpha], axis=2), mode="LA")))
    np.testing.assert_array_equal(out[:, :, 1], GRAY)


def test_rgba_drops_alpha_without_compositing():
    rgba = np.concatenate([RGB, np.zeros((5, 7, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(decode_image(save(Image.fromarray(rgba))), RGB)


@pytest.mark.parametrize("transparency", [None, 3, bytes(range(0, 250, 10))])
def test_palette_gives_colours(transparency, recwarn):
    indices = RNG.integers(0, 20, (5, 7))
    im = palette_image(indices)
    if transparency is not None:
        im.info["transparency"] = transparency
    out = decode_image(save(im))
    palette = np.asarray(im.getpalette(), dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(out, palette[indices])
    assert not [w for w in recwarn if "ransparency" in str(w.message)]


def test_16_bit_png_scales_without_clipping():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = decode_image(save(Image.fromarray(values)))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_big_endian_scales(fmt):
    values = np.array([[0, 1000, 40000, 65535]], dtype=">u2")
    im = Image.frombytes("I;16B", (4, 1), values.tobytes())
    assert im.mode == "I;16B"
    out = decode_image(save(im, fmt))
    np.testing.assert_array_equal(out[0, :, 2], np.rint(values[0] / 257.0))


def test_32_bit_integer_within_16_bits_uses_16_bit_scale():
    values = np.array([[0, 257, 65535]], dtype=np.int32)
    out = decode_image(save(Image.fromarray(values), "TIFF"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255])


def test_32_bit_integer_out_of_16_bits_is_stretched():
    values = np.array([[-100, 0, 100_000, 200_000]], dtype=np.int32)
    im = Image.fromarray(values)
    assert im.mode == "I"
    out = decode_image(save(im, "TIFF"))
    expected = np.rint((values[0] + 100) * 255 / 200_100)
    np.testing.assert_array_equal(out[0, :, 0], expected)


def test_float_image_unit_range_and_stretched():
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = decode_image(save(Image.fromarray(unit), "TIFF"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])
    wide = np.array([[-2.0, 0.0, 6.0]], dtype=np.float32)
    out = decode_image(save(Image.fromarray(wide), "TIFF"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 64, 255])


def test_cmyk_jpeg_decodes_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow
    out = decode_image(save(cmyk, "JPEG", quality=95))
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3


def test_exif_orientation_is_applied():
    # Top half red, bottom half blue; orientation 6 means "rotate 90 degrees clockwise to view".
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:16, :, 0] = 255
    stored[16:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(save(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (64, 32, 3)
    expected = np.rot90(stored, k=-1)
    assert np.abs(out.astype(int) - expected).mean() < 4
    assert out[32, 4, 2] > 200 and out[32, 28, 0] > 200  # blue on the left, red on the right


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "0 bytes"),
        (b"hello, this is text and not an image\n", "not an image"),
        (b"\x00" * 1000, "not an image"),
    ],
)
def test_non_images_raise(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_raises(fmt):
    data = save(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_corrupt_png_data_raises():
    data = bytearray(save(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))))
    data[len(data) // 2 : len(data) // 2 + 200] = bytes(200)
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_image(bytes(data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    data = png_header_only(5000, 4000)
    with pytest.raises(ImageTooLargeError, match=r"5000x4000 = 20000000 pixels > max_pixels"):
        decode_image(data, max_pixels=1_000_000)
    # Without the limit the same bytes fail only when the pixels are decoded.
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert not isinstance(info.value, ImageTooLargeError)


def test_pixel_limit_boundary():
    data = save(Image.fromarray(RGB))
    assert decode_image(data, max_pixels=35).shape == (5, 7, 3)
    with pytest.raises(ImageTooLargeError, match="7x5 = 35 pixels > max_pixels 34"):
        decode_image(data, max_pixels=34)
    with pytest.raises(ImageTooLargeError):
        decode_mask(encode_mask(GRAY), max_pixels=34)


def test_palette_mask_gives_indices_not_colours():
    indices = RNG.integers(0, 21, (5, 7))
    indices[0, :3] = 255
    np.testing.assert_array_equal(decode_mask(save(palette_image(indices))), indices)


def test_mask_round_trip_is_lossless_and_mode_l():
    mask = RNG.integers(0, 256, (9, 11)).astype(np.uint8)
    data = encode_mask(mask)
    im = Image.open(io.BytesIO(data))
    assert (im.format, im.mode) == ("PNG", "L")
    out = decode_mask(data)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask)
    # Wider integer dtypes with valid values encode the same.
    assert encode_mask(mask.astype(np.int64)) == data


def test_sixteen_bit_mask_within_range_is_accepted_else_rejected():
    values = np.array([[0, 3, 255]], dtype=np.uint16)
    np.testing.assert_array_equal(decode_mask(save(Image.fromarray(values))), [[0, 3, 255]])
    with pytest.raises(MaskFormatError, match=r"values 0\.\.300"):
        decode_mask(save(Image.fromarray(np.array([[0, 300]], dtype=np.uint16))))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_multichannel_mask_is_rejected(mode):
    with pytest.raises(MaskFormatError, match=f"single-channel.*got mode '{mode}'"):
        decode_mask(save(Image.fromarray(RGB).convert(mode)))


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.zeros((2, 2, 1), np.uint8), "2-D"),
        (np.zeros((2, 2), np.float32), "integer dtype"),
        (np.array([[0, 256]]), r"0\.\.255, got 0\.\.256"),
        (np.array([[-1, 0]]), r"got -1\.\.0"),
    ],
)
def test_encode_mask_rejects_bad_input(mask, message):
    with pytest.raises(ValueError, match=message):
        encode_mask(mask)


def test_read_helpers_name_the_file(tmp_path):
    good, bad, mask = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "m.png"
    good.write_bytes(save(Image.fromarray(RGB)))
    bad.write_bytes(b"not really a jpeg")
    mask.write_bytes(encode_mask(GRAY))
    np.testing.assert_array_equal(read_image(good), RGB)
    np.testing.assert_array_equal(read_mask(mask), GRAY)
    with pytest.raises(ImageDecodeError, match=r"b\.jpg: not an image"):
        read_image(bad)
    with pytest.raises(MaskFormatError, match=r"a\.png: mask must be"):
        read_mask(good)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_animated_and_multi_page_images_are_refused_naming_their_frames(fmt):
    frames = [Image.fromarray(RGB), Image.fromarray(255 - RGB)]
    data = save(frames[0], fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageDecodeError, match=f"{fmt} image with 2 frames"):
        decode_image(data)
    assert decode_image(save(frames[0], fmt)).shape == (5, 7, 3)  # one frame is fine
