"""process_image on generated images and on hostile bytes; decode_caption."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import time
import zlib

import imagehash
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.images import ImageConfig, decode_caption, process_image

FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WEBP", "GIF": "GIF", "BMP": "BMP"}


def encode(pixels: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


def smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random picture: perceptual hashes of different seeds differ, re-encodes agree."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def png_with_header(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


CASES = [(fmt, 40 + 7 * i, 60 + 11 * i, i) for i in range(6) for fmt in FORMATS]  # 30 images


@pytest.mark.parametrize(("fmt", "h", "w", "seed"), CASES)
def test_every_format_is_resized_and_hashed(fmt: str, h: int, w: int, seed: int) -> None:
    body = encode(smooth(h, w, seed), fmt)
    r = process_image(body, ImageConfig(image_size=32, resize_mode="center_crop"))
    assert (r.ok, r.reason) == (True, "ok")
    assert (r.original_width, r.original_height, r.width, r.height) == (w, h, 32, 32)
    stored = Image.open(io.BytesIO(r.image))
    assert stored.format == "JPEG" and stored.size == (32, 32)
    assert r.sha256 == hashlib.sha256(r.image).hexdigest()
    assert r.phash % (1 << 64) == int(str(imagehash.phash(stored)), 16)  # signed form of the same 64 bits


def test_phash_is_int64_and_tracks_visual_similarity() -> None:
    cfg = ImageConfig(image_size=64)
    results = [process_image(encode(smooth(96, 128, s), "PNG"), cfg) for s in range(20)]
    hashes = [r.phash for r in results]
    pa.array(hashes, type=pa.int64())  # fits the Parquet column without overflow
    assert any(h < 0 for h in hashes) and len(set(hashes)) == 20  # top bit used: the signed mapping matters

    def distance(a: int, b: int) -> int:
        return bin((a ^ b) % (1 << 64)).count("1")

    same = process_image(encode(smooth(96, 128, 0), "JPEG", quality=40), cfg).phash
    assert distance(same, hashes[0]) <= 6
    assert min(distance(hashes[0], h) for h in hashes[1:]) > 6


@pytest.mark.parametrize(("mode", "size"), [
    ("no", (640, 480)), ("keep_ratio", (171, 128)), ("center_crop", (128, 128)),
    ("border", (128, 128)), ("keep_ratio_largest", (128, 96)),
])
def test_resize_modes(mode: str, size: tuple[int, int]) -> None:
    r = process_image(encode(smooth(480, 640, 1), "JPEG"), ImageConfig(image_size=128, resize_mode=mode))
    assert r.ok and (r.width, r.height) == size and Image.open(io.BytesIO(r.image)).size == size


def test_border_pads_with_white() -> None:
    black = np.zeros((100, 400, 3), dtype=np.uint8)
    r = process_image(encode(black, "PNG"), ImageConfig(image_size=100, resize_mode="border", encode_format="png",
                                                        encode_quality=3))
    out = np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB"))
    assert out.shape == (100, 100, 3) and out[0, 0].min() == 255 and out[50, 50].max() == 0


def test_resize_only_if_bigger_keeps_small_images() -> None:
    body = encode(smooth(40, 60, 2), "PNG")
    assert (process_image(body, ImageConfig(image_size=128, resize_only_if_bigger=True)).width) == 60
    assert (process_image(body, ImageConfig(image_size=128)).height) == 128


def test_transparent_png_is_flattened_on_white() -> None:
    rgba = np.zeros((50, 50, 4), dtype=np.uint8)  # fully transparent black
    r = process_image(encode(rgba, "PNG"), ImageConfig(image_size=50, resize_mode="no"))
    out = np.asarray(Image.open(io.BytesIO(r.image)))
    assert out.shape == (50, 50, 3) and out.min() >= 250


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("webp", "WEBP"), ("jpg", "JPEG")])
def test_encode_formats(fmt: str, pil_format: str) -> None:
    quality = 6 if fmt == "png" else 80
    r = process_image(encode(smooth(64, 64, 3), "BMP"), ImageConfig(image_size=32, encode_format=fmt,
                                                                    encode_quality=quality))
    assert r.ok and Image.open(io.BytesIO(r.image)).format == pil_format


# --------------------------------------------------------------------------- hostile bytes


def test_bomb_beyond_pil_limit_refused() -> None:
    r = process_image(png_with_header(20000, 20000, zlib.compress(b"\0" * 1000)), ImageConfig())
    assert (r.ok, r.reason) == (False, "decompression_bomb")


def test_pixel_cap_checked_from_header_before_decoding() -> None:
    # The IDAT is garbage: decoding would report "corrupt". "decompression_bomb" proves the
    # header check ran first and nothing was decoded.
    garbage = png_with_header(3000, 3000, b"not zlib data" * 10)
    assert process_image(garbage, ImageConfig(max_pixels=1_000_000)).reason == "decompression_bomb"
    assert process_image(garbage, ImageConfig(max_pixels=10_000_000)).reason == "corrupt"


def test_real_bomb_refused_quickly() -> None:
    # 3500 x 3500 RGB of zeros: 37 MB of pixels in ~40 KB of PNG.
    row = b"\0" * (1 + 3500 * 3)
    bomb = png_with_header(3500, 3500, zlib.compress(row * 3500, 9))
    assert len(bomb) < 100_000
    t0 = time.perf_counter()
    r = process_image(bomb, ImageConfig(max_pixels=5_000_000))
    assert r.reason == "decompression_bomb" and time.perf_counter() - t0 < 0.2


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_truncated_images(fmt: str) -> None:
    body = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), fmt)
    assert process_image(body[: len(body) // 2], ImageConfig()).reason == "truncated"


def test_corrupt_png_checksum() -> None:
    body = bytearray(encode(smooth(64, 64, 4), "PNG"))
    idat = body.index(b"IDAT")
    body[idat + 20] ^= 0xFF
    assert process_image(bytes(body), ImageConfig()).reason == "corrupt"


@pytest.mark.parametrize(("body", "reason"), [
    (b"", "empty_body"), (None, "empty_body"), (b"<html>not an image</html>", "undecodable"),
    (b"\xff\xd8\xff", "undecodable"), (encode(np.zeros((8, 8, 3), np.uint8), "TIFF"), "undecodable"),
])
def test_empty_and_undecodable(body: bytes | None, reason: str) -> None:
    r = process_image(body, ImageConfig())
    assert (r.ok, r.reason, r.image, r.phash) == (False, reason, None, None)


def test_size_and_aspect_limits() -> None:
    tiny = encode(smooth(20, 30, 5), "PNG")
    assert process_image(tiny, ImageConfig(min_image_size=32)).reason == "too_small"
    strip = encode(smooth(20, 200, 6), "PNG")
    assert process_image(strip, ImageConfig(max_aspect_ratio=3.0)).reason == "bad_aspect_ratio"
    assert process_image(strip, ImageConfig(max_aspect_ratio=10.0)).ok


def test_concurrent_calls_leave_stdout_and_stderr_alone() -> None:
    # img2dataset's Resizer swaps fds 1/2 for /dev/null during each call; unserialised calls from
    # threads can leave them swapped for good.
    before = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]
    bodies = [encode(smooth(200, 200, s), "PNG") for s in range(8)]
    errors: list[str] = []

    def work(body: bytes) -> None:
        for _ in range(6):
            r = process_image(body, ImageConfig(image_size=64))
            if not r.ok:
                errors.append(r.reason)

    threads = [threading.Thread(target=work, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)] == before


# --------------------------------------------------------------------------- captions and config


@pytest.mark.parametrize(("raw", "ok", "reason", "text"), [
    (" a cat on a mat ".encode(), True, "ok", "a cat on a mat"),
    ("chat noir · 黒猫".encode(), True, "ok", "chat noir · 黒猫"),
    (b"caf\xe9", False, "invalid_utf8_caption", None),  # Latin-1, not UTF-8
    (b"\xed\xa0\x80", False, "invalid_utf8_caption", None),  # an encoded surrogate
    ("bad \udcff surrogate", False, "invalid_utf8_caption", None),
    ("already text", True, "ok", "already text"),
    (None, False, "caption_missing", None),
])
def test_decode_caption(raw: bytes | str | None, ok: bool, reason: str, text: str | None) -> None:
    r = decode_caption(raw)
    assert (r.ok, r.reason, r.text) == (ok, reason, text)


def test_decode_caption_rejects_wrong_type() -> None:
    with pytest.raises(TypeError, match="caption"):
        decode_caption(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"image_size": 0}, "image_size"),
    ({"resize_mode": "stretch"}, "resize_mode"),
    ({"encode_format": "gif"}, "encode_format"),
    ({"encode_format": "png", "encode_quality": 95}, "encode_quality"),
    ({"max_pixels": 10**12}, "max_pixels"),
    ({"allowed_formats": ("JPEG", "NOPE")}, "allowed_formats"),
    ({"downscale_interpolation": "fancy"}, "downscale_interpolation"),
])
def test_config_validation_names_the_field(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ImageConfig(**kwargs)
