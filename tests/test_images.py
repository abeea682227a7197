"""process_image on generated images and on hostile bytes; decode_caption."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import time
import zlib

import cv2
import imagehash
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageCms

from pipelines.core import images as images
from pipelines.core.images import ImageConfig, ImageResult, decode_caption, image_phash, process_image

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


def png_raw(width: int, height: int, bit_depth: int, colour_type: int, pixels: np.ndarray,
            extra: bytes = b"") -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB/RGBA): `pixels` in big-endian sample order."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + pixels[y].tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def signed_imagehash(img: Image.Image) -> int:
    unsigned = int(str(imagehash.phash(img)), 16)  # 16 hex digits = 64 bits
    return unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) % (1 << 64)).count("1")


def stored_pixels(r: ImageResult) -> np.ndarray:
    assert (r.ok, r.reason) == (True, "ok")
    return np.asarray(Image.open(io.BytesIO(r.image)))


def exact(**kw: object) -> ImageConfig:
    """No resize, lossless output: the stored pixels are the picture as decoded and converted."""
    return ImageConfig(**{"resize_mode": "no", "encode_format": "png", "encode_quality": 1, **kw})


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """img2dataset's alpha matting, the reference: rint(alpha / 255 * colour + 255 - alpha)."""
    a = alpha.astype(np.float64)[..., None] if colour.ndim == 3 else alpha.astype(np.float64)
    return np.rint(a / 255 * colour + 255 - a).astype(np.uint8)


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
    # The phash is taken on the pixels before the JPEG encode: a few bits may differ from the decoded file's.
    assert hamming(r.phash, signed_imagehash(stored)) <= 8


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


# --------------------------------------------------------------------------- the picture a browser shows


def asymmetric(h: int, w: int) -> np.ndarray:
    """A picture whose every flip and rotation differs: a colour ramp plus a corner mark."""
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)
    pixels[: h // 4, : w // 5] = (250, 20, 20)
    return pixels


# EXIF orientation o: how the stored pixels relate to the displayed ones (the inverse of what a viewer applies).
STORE_AS = {
    1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, 1), 7: lambda a: np.rot90(np.swapaxes(a, 0, 1), 2), 8: lambda a: np.rot90(a, -1),
}


def with_orientation(displayed: np.ndarray, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORE_AS[orientation](displayed))
    return encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_exif_orientation_is_applied(orientation: int, fmt: str) -> None:
    displayed = asymmetric(48, 80)
    body = with_orientation(displayed, orientation, fmt)
    r = process_image(body, exact())
    assert (r.width, r.height, r.original_width, r.original_height) == (80, 48, 80, 48)
    out = stored_pixels(r).astype(int)
    if fmt == "PNG":
        assert np.array_equal(out, displayed)
    else:  # lossy stores: close to the picture, far from its mirror images
        assert np.abs(out - displayed).mean() < 6
        for mirror in (np.fliplr, np.flipud, lambda a: np.rot90(a, 2)):
            assert np.abs(out - mirror(displayed)).mean() > 20


def test_exif_orientation_with_a_jpeg_draft_and_resize() -> None:
    displayed = asymmetric(600, 400)  # shown portrait, stored landscape (orientation 6)
    body = with_orientation(displayed, 6, "JPEG")
    r = process_image(body, ImageConfig(image_size=100, resize_mode="keep_ratio", encode_format="png",
                                        encode_quality=1))
    assert (r.original_width, r.original_height, r.width, r.height) == (400, 600, 100, 150)
    reference = cv2.resize(displayed, (100, 150), interpolation=cv2.INTER_AREA)
    assert np.abs(stored_pixels(r).astype(int) - reference).mean() < 3


def test_sixteen_bit_grey_png_is_scaled_not_clipped() -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32) * 16 + 5).astype(np.uint16).reshape(64, 64)
    assert Image.open(io.BytesIO(encode(ramp, "PNG"))).mode == "I;16"
    out = stored_pixels(process_image(encode(ramp, "PNG"), exact()))
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    assert np.array_equal(out, ramp >> 8)  # PIL's own convert("L") would give 255 from 256 up
    assert np.abs(out.astype(int) - np.rint(ramp / 257)).max() <= 1


@pytest.mark.parametrize(("colour_type", "channels"), [(2, 3), (6, 4), (4, 2), (0, 1)])
def test_sixteen_bit_png_colour_types(colour_type: int, channels: int) -> None:
    rng = np.random.default_rng(colour_type)
    samples = rng.integers(0, 65536, (16, 24, channels), dtype=np.uint16)
    if channels in (2, 4):
        samples[..., -1] = np.where(rng.random((16, 24)) < 0.5, 65535, samples[..., -1])
    body = png_raw(24, 16, 16, colour_type, samples.astype(">u2"))
    eight = (samples >> 8).astype(np.uint8)
    if channels == 1:
        expected = eight[..., 0]
    elif channels == 3:
        expected = eight
    elif channels == 4:
        expected = over_white(eight[..., :3], eight[..., 3])
    else:  # PIL reads 16-bit grey + alpha as RGBA
        expected = over_white(np.repeat(eight[..., :1], 3, -1), eight[..., 1])
    assert np.abs(stored_pixels(process_image(body, exact())).astype(int) - expected).max() <= 1


def tiff_rgb16(samples: np.ndarray) -> bytes:
    """An uncompressed little-endian 16-bit RGB TIFF, by hand (PIL cannot write one)."""
    height, width, _ = samples.shape
    data = samples.astype("<u2").tobytes()
    tags = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, None), (277, 3, 1, 3), (278, 3, 1, height), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    bits_at = 8 + 2 + 12 * len(tags) + 4
    data_at = bits_at + 6 + 2
    ifd = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        value = {258: bits_at, 273: data_at}.get(tag, value)
        ifd += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 and count == 1
                                                       else struct.pack("<I", value))
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + struct.pack("<HHH", 16, 16, 16) + b"\0\0" + data


def test_sixteen_bit_tiff_only_when_allowed() -> None:
    rng = np.random.default_rng(7)
    grey = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    rgb = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    tiffs = {"grey": encode(grey, "TIFF"), "rgb": tiff_rgb16(rgb)}
    assert Image.open(io.BytesIO(tiffs["grey"])).mode == "I;16"
    assert Image.open(io.BytesIO(tiffs["rgb"])).size == (30, 20)
    for body in tiffs.values():
        assert process_image(body, ImageConfig()).reason == "undecodable"  # not in the default formats
    cfg = exact(allowed_formats=("JPEG", "PNG", "TIFF"))
    assert np.array_equal(stored_pixels(process_image(tiffs["grey"], cfg)), grey >> 8)
    assert np.abs(stored_pixels(process_image(tiffs["rgb"], cfg)).astype(int) - (rgb >> 8)).max() <= 1


def test_float_and_int32_tiffs() -> None:
    cfg = exact(allowed_formats=("TIFF",))
    values = np.linspace(-0.5, 1.5, 20 * 30, dtype=np.float32).reshape(20, 30)
    out = stored_pixels(process_image(encode(values, "TIFF"), cfg))
    assert np.array_equal(out, np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8))  # floats: 0.0-1.0
    ints = np.linspace(-1000, 70000, 20 * 30).astype(np.int32).reshape(20, 30)
    assert Image.open(io.BytesIO(encode(ints, "TIFF"))).mode == "I"
    out = stored_pixels(process_image(encode(ints, "TIFF"), cfg))
    assert np.array_equal(out, np.clip(ints, 0, 65535) >> 8)  # 32-bit ints: on the 16-bit scale


def cmyk_jpeg(cmyk: np.ndarray, adobe: bool = True, **kw: object) -> bytes:
    """PIL writes CMYK JPEGs as Photoshop does: inverted samples and an Adobe APP14 marker. Without the
    marker the samples are the same, and a reader must still take them as inverted (as browsers do)."""
    buf = io.BytesIO()
    Image.frombytes("CMYK", (cmyk.shape[1], cmyk.shape[0]), cmyk.tobytes()).save(buf, "JPEG", quality=100, **kw)
    body = buf.getvalue()
    if adobe:
        return body
    at = body.index(b"\xff\xee")
    length = struct.unpack(">H", body[at + 2: at + 4])[0]
    return body[:at] + body[at + 2 + length:]


def test_cmyk_jpegs_read_as_browsers_do() -> None:
    blocks = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 128), (64, 128, 192, 32)]
    cmyk = np.repeat(np.array(blocks, np.uint8)[:, None, None, :], 16, 1).repeat(16, 2).reshape(-1, 16, 4)
    c, m, y, k = (cmyk[..., i].astype(float) for i in range(4))
    expected = np.stack([(255 - c) * (255 - k) / 255, (255 - m) * (255 - k) / 255, (255 - y) * (255 - k) / 255], -1)
    with_marker, without = cmyk_jpeg(cmyk), cmyk_jpeg(cmyk, adobe=False)
    assert "adobe" in Image.open(io.BytesIO(with_marker)).info
    assert "adobe" not in Image.open(io.BytesIO(without)).info
    for body in (with_marker, without):
        out = stored_pixels(process_image(body, exact())).astype(float)
        assert out.shape == expected.shape and np.abs(out - expected).max() <= 3


def test_palette_and_alpha_modes_are_composited_over_white() -> None:
    rng = np.random.default_rng(3)
    colour = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    alpha[:5] = 0
    alpha[5:10] = 255
    grey = colour[..., 0]
    cases = {
        "RGBA": (encode(np.dstack([colour, alpha]), "PNG"), over_white(colour, alpha)),
        "LA": (encode(np.dstack([grey, alpha]), "PNG"), over_white(grey, alpha)),
        "RGBA WebP": (encode(np.dstack([colour, alpha]), "WEBP", lossless=True), over_white(colour, alpha)),
    }
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (20, 30), dtype=np.uint8)
    p = Image.frombytes("P", (30, 20), index.tobytes())
    p.putpalette(palette.tobytes())
    trns = bytes(rng.integers(0, 256, 16, dtype=np.uint8))
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=trns)  # tRNS: one alpha per palette entry
    cases["P+tRNS"] = (buf.getvalue(), over_white(palette[index], np.frombuffer(trns, np.uint8)[index]))
    buf = io.BytesIO()
    p.save(buf, "GIF", transparency=3)
    cases["GIF"] = (buf.getvalue(), np.where((index == 3)[..., None], 255, palette[index]).astype(np.uint8))
    buf = io.BytesIO()
    p.save(buf, "PNG")
    cases["P"] = (buf.getvalue(), palette[index])
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG", transparency=int(grey[0, 0]))  # grey tRNS: one transparent value
    cases["L+tRNS"] = (buf.getvalue(), np.where(grey == grey[0, 0], 255, grey).astype(np.uint8))
    buf = io.BytesIO()
    Image.fromarray(grey > 128).save(buf, "PNG")
    cases["1"] = (buf.getvalue(), np.where(grey > 128, 255, 0).astype(np.uint8))
    for name, (body, expected) in cases.items():
        out = stored_pixels(process_image(body, exact()))
        assert np.array_equal(out, expected), name


# ICC profiles, written by hand (ImageCms can create only sRGB, LAB and XYZ): a matrix/TRC Adobe RGB (1998),
# a grey profile with a linear tone curve, and a CMYK profile whose A2B0 table maps the cyan corner to a
# real cyan ink (not the naive (0, 255, 255)).
D50 = (0.9642, 1.0, 0.8249)


def s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def xyz_tag(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)


def curve_tag(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"


def icc_profile(device_class: bytes, space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    table, data = b"", b""
    first = 128 + 4 + 12 * len(tags)
    for sig, body in tags.items():
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", first + len(data), len(body))
        data += body
    header = (struct.pack(">I4sI4s4s4s", first + len(data), b"lcms", 0x02100000, device_class, space, pcs)
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + s15(D50[0]) + s15(D50[1]) + s15(D50[2]) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + data


def adobe_rgb_profile() -> bytes:
    trc = curve_tag(563 / 256)
    return icc_profile(b"mntr", b"RGB ", b"XYZ ", {
        b"wtpt": xyz_tag(*D50), b"rXYZ": xyz_tag(0.60974, 0.31111, 0.01947),
        b"gXYZ": xyz_tag(0.20528, 0.62567, 0.06087), b"bXYZ": xyz_tag(0.14919, 0.06322, 0.74457),
        b"rTRC": trc, b"gTRC": trc, b"bTRC": trc})


def cmyk_profile(cyan_lab: tuple[int, int, int]) -> bytes:
    """lut8 A2B0 (CMYK -> Lab), 2 grid points an ink: paper white, the given cyan, black where K = 1."""
    clut = b""
    for c, m, y, k in np.ndindex(2, 2, 2, 2):
        lab = (0, 0, 0) if k else cyan_lab if (c, m, y) == (1, 0, 0) else (100, 0, 0) if (c, m, y) == (0, 0, 0) \
            else (50, 0, 0)
        clut += bytes([round(lab[0] * 2.55), lab[1] + 128, lab[2] + 128])
    identity = bytes(range(256))
    lut = (b"mft1\0\0\0\0" + bytes([4, 3, 2, 0]) + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
           + identity * 4 + clut + identity * 3)
    return icc_profile(b"prtr", b"CMYK", b"Lab ", {b"wtpt": xyz_tag(*D50), b"A2B0": lut})


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0, 1)
    return 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


XYZ_D65_TO_SRGB = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                            [0.0556434, -0.2040259, 1.0572252]])


def adobe_to_srgb(rgb: np.ndarray) -> np.ndarray:
    """The textbook conversion (D65 matrices, no CMS): independent of lcms."""
    adobe_to_xyz = np.array([[0.5767309, 0.1855540, 0.1881852], [0.2973769, 0.6273491, 0.0752741],
                             [0.0270343, 0.0706872, 0.9911085]])
    linear = (rgb / 255) ** (563 / 256)
    return srgb_encode(linear @ (XYZ_D65_TO_SRGB @ adobe_to_xyz).T)


def lab_to_srgb(lab: tuple[float, float, float]) -> np.ndarray:
    fy = (lab[0] + 16) / 116
    f = np.array([fy + lab[1] / 500, fy, fy - lab[2] / 200])
    xyz_d50 = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * D50
    bradford_d50_to_d65 = np.array([[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077],
                                    [0.0122982, -0.0204830, 1.3299098]])
    return srgb_encode(XYZ_D65_TO_SRGB @ bradford_d50_to_d65 @ xyz_d50)


def test_icc_profile_converted_to_srgb() -> None:
    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    rgb[:4] = (100, 150, 200)
    plain = encode(rgb, "PNG")
    tagged = encode(rgb, "PNG", icc_profile=adobe_rgb_profile())
    out = stored_pixels(process_image(tagged, exact())).astype(float)
    in_gamut = (adobe_to_srgb(rgb.astype(float)) > 0.5).all(-1) & (adobe_to_srgb(rgb.astype(float)) < 254.5).all(-1)
    assert in_gamut.mean() > 0.3
    assert np.abs(out - adobe_to_srgb(rgb.astype(float)))[in_gamut].max() <= 2.5
    assert np.abs(out[0, 0] - (66, 151, 203)).max() <= 1  # and not the untagged (100, 150, 200)
    assert np.array_equal(stored_pixels(process_image(plain, exact())), rgb)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert images._icc_transform(srgb, "RGB") is None  # renders as sRGB: skipped, no lcms pass per image
    assert images._icc_transform(adobe_rgb_profile(), "RGB") is not None
    # As cameras and editors write it: sRGB primaries and a sampled 1024-point tone curve, not lcms's own.
    v = np.linspace(0, 1, 1024)
    curve = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    trc = b"curv\0\0\0\0" + struct.pack(">I", 1024) + np.round(curve * 65535).astype(">u2").tobytes()
    camera_srgb = icc_profile(b"mntr", b"RGB ", b"XYZ ", {
        b"wtpt": xyz_tag(*D50), b"rXYZ": xyz_tag(0.4361, 0.2225, 0.0139), b"gXYZ": xyz_tag(0.3851, 0.7169, 0.0971),
        b"bXYZ": xyz_tag(0.1431, 0.0606, 0.7141), b"rTRC": trc, b"gTRC": trc, b"bTRC": trc})
    assert images._icc_transform(camera_srgb, "RGB") is None
    assert np.array_equal(stored_pixels(process_image(encode(rgb, "PNG", icc_profile=srgb), exact())), rgb)
    # An RGBA image keeps its alpha through the conversion, then meets the white page.
    alpha = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    rgba = process_image(encode(np.dstack([rgb, alpha]), "PNG", icc_profile=adobe_rgb_profile()), exact())
    expected = over_white(np.clip(np.rint(adobe_to_srgb(rgb.astype(float))), 0, 255), alpha).astype(int)
    assert np.abs(stored_pixels(rgba).astype(int) - expected)[in_gamut].max() <= 3


def test_grey_and_cmyk_profiles() -> None:
    grey = np.full((16, 16), 128, np.uint8)
    linear_grey = icc_profile(b"mntr", b"GRAY", b"XYZ ", {b"wtpt": xyz_tag(*D50), b"kTRC": curve_tag(1.0)})
    out = stored_pixels(process_image(encode(grey, "PNG", icc_profile=linear_grey), exact()))
    assert out.ndim == 2 and abs(int(out[0, 0]) - round(float(srgb_encode(np.array(128 / 255))))) <= 1  # 188
    cmyk = np.zeros((16, 32, 4), np.uint8)
    cmyk[:, 16:, 0] = 255  # left paper white, right full cyan
    body = cmyk_jpeg(cmyk, icc_profile=cmyk_profile((60, -40, -40)))
    out = stored_pixels(process_image(body, exact())).astype(float)
    assert np.abs(out[8, 4] - 255).max() <= 3
    assert np.abs(out[8, 28] - lab_to_srgb((60, -40, -40))).max() <= 4  # ~(0, 165, 214), not (0, 255, 255)


@pytest.mark.parametrize("profile", [b"", b"junk" * 40, adobe_rgb_profile()[:200]])
def test_broken_or_mismatched_profile_is_ignored(profile: bytes) -> None:
    rgb = np.random.default_rng(5).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    assert np.array_equal(stored_pixels(process_image(encode(rgb, "PNG", icc_profile=profile), exact())), rgb)
    grey = rgb[..., 1]  # an RGB profile on a grey image: does not fit, ignored as browsers do
    assert np.array_equal(stored_pixels(process_image(encode(grey, "PNG", icc_profile=adobe_rgb_profile()),
                                                      exact())), grey)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame(fmt: str) -> None:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    frames = [Image.new("RGB", (24, 16), c) for c in colours]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    out = stored_pixels(process_image(buf.getvalue(), exact())).astype(int)
    assert np.abs(out - colours[0]).max() <= 2


def test_gif_canvas_outside_the_first_frame_is_transparent() -> None:
    # A 4x4 red first frame at (2, 2) on an 8x8 canvas whose background colour index is that same red:
    # PIL paints the background colour around the frame, browsers leave it transparent (here: white).
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).convert("P").save(buf, "GIF")
    body = bytearray(buf.getvalue())
    body[6:10] = struct.pack("<HH", 8, 8)
    at = body.index(b"\x2c\0\0\0\0\x04\0\x04\0")
    body[at + 1:at + 5] = struct.pack("<HH", 2, 2)
    assert Image.open(io.BytesIO(bytes(body))).convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    expected = np.full((8, 8, 3), 255, np.uint8)
    expected[2:6, 2:6] = (255, 0, 0)
    assert np.array_equal(stored_pixels(process_image(bytes(body), exact())), expected)


def test_apng_hidden_default_image_is_skipped() -> None:
    # default_image=True: the IDAT picture is only for viewers without APNG; browsers play the animation.
    hidden, first, second = (Image.new("RGB", (24, 16), c) for c in [(0, 0, 0), (200, 30, 30), (30, 200, 30)])
    buf = io.BytesIO()
    hidden.save(buf, "PNG", save_all=True, append_images=[first, second], default_image=True)
    assert Image.open(io.BytesIO(buf.getvalue())).info.get("default_image")
    assert np.array_equal(stored_pixels(process_image(buf.getvalue(), exact()))[0, 0], (200, 30, 30))


# --------------------------------------------------------------------------- img2dataset's resize semantics


@pytest.fixture(scope="module")
def img2dataset_resizer():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    resizer = pytest.importorskip("img2dataset.resizer")

    def run(body: bytes, cfg: ImageConfig) -> tuple:
        return resizer.Resizer(
            image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
            upscale_interpolation=cfg.upscale_interpolation, downscale_interpolation=cfg.downscale_interpolation,
            encode_quality=cfg.encode_quality, encode_format=cfg.encode_format, min_image_size=cfg.min_image_size,
            max_image_area=cfg.max_pixels,
            max_aspect_ratio=float("inf") if cfg.max_aspect_ratio is None else cfg.max_aspect_ratio,
        )(io.BytesIO(body))
    return run


RESIZER_REASONS = {"image too small": "too_small", "aspect ratio too large": "bad_aspect_ratio"}
SIZES = [(1, 1), (1, 37), (3, 500), (31, 32), (63, 64), (64, 64), (65, 64), (99, 101), (127, 255), (200, 133),
         (256, 256), (333, 250), (641, 555), (700, 300), (1000, 7)]


@pytest.mark.parametrize("mode", ["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"])
@pytest.mark.parametrize("only_bigger", [False, True])
def test_sizes_and_pixels_match_img2dataset(img2dataset_resizer, mode: str, only_bigger: bool) -> None:
    # PNG in, PNG out, exact mode: the same OpenCV resize and encode of the same pixels: the same file.
    for w, h in SIZES:
        body = encode(smooth(h, w, w * 1000 + h) if min(w, h) > 1 else np.full((h, w, 3), 90, np.uint8), "PNG")
        for size in (64, 100):
            cfg = ImageConfig(image_size=size, resize_mode=mode, resize_only_if_bigger=only_bigger,
                              encode_format="png", encode_quality=1, fast_resize=False)
            theirs = img2dataset_resizer(body, cfg)
            ours = process_image(body, cfg)
            assert (ours.width, ours.height, ours.original_width, ours.original_height) == theirs[1:5], (w, h, size)
            assert ours.image == theirs[0], (w, h, size)  # same pixels, same encoder and settings: same bytes


@pytest.mark.parametrize("interpolation", sorted({"nearest", "linear", "cubic", "area", "lanczos"}))
def test_interpolations_match_img2dataset(img2dataset_resizer, interpolation: str) -> None:
    body = encode(smooth(150, 210, 9) ^ np.random.default_rng(9).integers(0, 40, (150, 210, 3), dtype=np.uint8),
                  "PNG")
    for size, mode in [(64, "keep_ratio"), (300, "keep_ratio"), (97, "border"), (120, "center_crop")]:
        cfg = ImageConfig(image_size=size, resize_mode=mode, upscale_interpolation=interpolation,
                          downscale_interpolation=interpolation, encode_format="png", encode_quality=1,
                          fast_resize=False)
        theirs = np.asarray(Image.open(io.BytesIO(img2dataset_resizer(body, cfg)[0])).convert("RGB"))
        assert np.array_equal(stored_pixels(process_image(body, cfg)), theirs), (size, mode)


def test_limits_match_img2dataset(img2dataset_resizer) -> None:
    for w, h in SIZES:
        body = encode(np.full((h, w, 3), 90, np.uint8), "PNG")
        for min_size, ratio in [(0, 2.0), (32, None), (64, 3.0), (100, 1.5)]:
            cfg = ImageConfig(image_size=64, min_image_size=min_size, max_aspect_ratio=ratio)
            err = img2dataset_resizer(body, cfg)[5]
            assert process_image(body, cfg).reason == RESIZER_REASONS.get(err, "ok"), (w, h, min_size, ratio)


def test_photos_with_fast_resize_stay_close_to_img2dataset(img2dataset_resizer) -> None:
    from benchmarks.photos import photo

    rng = np.random.default_rng(1)
    for i in range(12):
        w, h = (int(v) for v in rng.integers(300, 1400, 2))
        buf = io.BytesIO()
        photo(rng, w, h).save(buf, "JPEG", quality=90)
        for mode in ("center_crop", "keep_ratio", "border"):
            cfg = ImageConfig(image_size=224, resize_mode=mode)
            theirs = img2dataset_resizer(buf.getvalue(), cfg)
            ours = process_image(buf.getvalue(), cfg)
            assert (ours.width, ours.height, ours.original_width, ours.original_height) == theirs[1:5]
            diff = np.abs(stored_pixels(ours).astype(int) - np.asarray(Image.open(io.BytesIO(theirs[0]))))
            # center_crop also crops before resizing: up to half a (DCT-scaled) source pixel of shift, which
            # on these grain-heavy synthetic photos reads as a few levels.
            assert diff.mean() < (6 if mode == "center_crop" else 4), (w, h, mode, diff.mean())
            # Without the draft, PIL's libjpeg-turbo decode equals OpenCV's: the very same file as img2dataset's.
            full = process_image(buf.getvalue(), ImageConfig(image_size=224, resize_mode=mode, fast_resize=False))
            assert full.image == theirs[0]


def test_images_beyond_one_pillow_block_take_the_copy_path() -> None:
    # 2100 x 2100 RGB is 17.6 MB in PIL's 4-byte layout: past one 16 MiB block, so no zero-copy export.
    pixels = smooth(2100, 2100, 4)
    r = process_image(encode(pixels, "PNG"), ImageConfig(image_size=256, encode_format="png", encode_quality=1))
    assert np.array_equal(stored_pixels(r), cv2.resize(pixels, (256, 256), interpolation=cv2.INTER_AREA))


def test_jpeg_draft_only_when_it_shrinks_a_jpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    calls: list[tuple] = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: calls.append((self.size, size)) or real(self, mode, size))
    body = encode(smooth(600, 900, 2), "JPEG")
    assert process_image(body, ImageConfig(image_size=128, resize_mode="center_crop")).ok
    assert calls == [((900, 600), (192, 128))]
    calls.clear()
    for cfg in (ImageConfig(image_size=700), ImageConfig(image_size=128, fast_resize=False),
                ImageConfig(resize_mode="no")):
        assert process_image(body, cfg).ok and not calls


# --------------------------------------------------------------------------- phash, threads, hostile bytes


def varied_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(2024)
    images = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        kind = i % 6
        if kind == 0:
            pixels = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)  # flat: the median ties
        elif kind == 1:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif kind == 2:
            pixels = smooth(max(h, 2), max(w, 2), i)
        elif kind == 3:
            pixels = (np.mgrid[0:h, 0:w].sum(0) % 256).astype(np.uint8)
        elif kind == 4:
            pixels = np.dstack([smooth(max(h, 2), max(w, 2), i), rng.integers(0, 256, (max(h, 2), max(w, 2)),
                                                                             dtype=np.uint8)])
        else:
            pixels = (smooth(max(h, 2), max(w, 2), i) // 64 * 64).astype(np.uint8)  # posterised: many ties
        images.append(Image.fromarray(pixels))
    return images


def test_image_phash_equals_imagehash() -> None:
    for img in varied_images(300):
        assert image_phash(img) == signed_imagehash(img), img


def test_phash_is_that_of_the_stored_pixels() -> None:
    for seed in range(6):
        r = process_image(encode(smooth(90, 120, seed), "JPEG"), ImageConfig(image_size=64, encode_format="png",
                                                                             encode_quality=1))
        assert r.phash == signed_imagehash(Image.open(io.BytesIO(r.image)))


def mixed_bodies() -> list[tuple[bytes, ImageConfig]]:
    from benchmarks.photos import photo

    rng = np.random.default_rng(8)
    jpeg = io.BytesIO()
    photo(rng, 640, 480).save(jpeg, "JPEG", quality=90)
    crop = ImageConfig(image_size=96, resize_mode="center_crop")
    rgba = np.dstack([smooth(120, 90, 1), rng.integers(0, 256, (120, 90), dtype=np.uint8)])
    grey16 = rng.integers(0, 65536, (80, 70), dtype=np.uint16)
    return [
        (jpeg.getvalue(), crop), (jpeg.getvalue(), ImageConfig(image_size=64, resize_mode="border")),
        (with_orientation(asymmetric(200, 120), 6, "JPEG"), crop),
        (encode(rgba, "PNG", icc_profile=adobe_rgb_profile()), crop), (encode(grey16, "PNG"), crop),
        (cmyk_jpeg(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)), crop),
        (encode(smooth(50, 70, 2), "GIF"), ImageConfig(image_size=128, encode_format="webp")),
        (jpeg.getvalue()[:20000], crop), (png_with_header(20000, 20000, b"x"), crop), (b"junk" * 100, crop),
    ]


def test_threads_get_the_single_threaded_results() -> None:
    cases = mixed_bodies()
    expected = [process_image(body, cfg) for body, cfg in cases]
    assert {r.reason for r in expected} == {"ok", "truncated", "decompression_bomb", "undecodable"}
    mismatches: list[int] = []

    def work(offset: int) -> None:
        for i in range(4 * len(cases)):
            j = (i + offset) % len(cases)
            if process_image(*cases[j]) != expected[j]:
                mismatches.append(j)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mismatches


KNOWN_REASONS = {"ok", "empty_body", "undecodable", "truncated", "corrupt", "decompression_bomb", "too_small",
                 "bad_aspect_ratio", "resize_error"}


def test_hostile_bytes_give_reasons_never_exceptions() -> None:
    rng = np.random.default_rng(99)
    seeds = [body for body, _ in mixed_bodies()[:7]]
    seeds += [encode(smooth(40, 60, 1), fmt) for fmt in ("PNG", "BMP", "WEBP", "GIF")]
    cfg = ImageConfig(image_size=32, max_pixels=4_000_000)
    reasons: set[str] = set()
    for i in range(400):
        body = bytearray(seeds[i % len(seeds)])
        for _ in range(int(rng.integers(1, 6))):
            at = int(rng.integers(0, len(body)))
            choice = int(rng.integers(0, 3))
            if choice == 0:
                body[at] = int(rng.integers(0, 256))
            elif choice == 1:
                del body[at:at + int(rng.integers(1, 64))]
            else:
                body[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        r = process_image(bytes(body), cfg)
        assert r.reason in KNOWN_REASONS and r.ok == (r.reason == "ok")
        reasons.add(r.reason)
    assert {"ok", "corrupt", "undecodable"} <= reasons


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
    ({"fast_resize": "yes"}, "fast_resize"),
])
def test_config_validation_names_the_field(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ImageConfig(**kwargs)


def test_fast_center_crop_resizes_only_the_kept_square_and_stays_close(img2dataset_resizer) -> None:
    # fast_resize crops the source window first; the result is within a level or two of img2dataset's.
    for w, h in [(641, 555), (700, 300), (333, 250), (300, 700)]:
        body = encode(smooth(h, w, w + h), "PNG")
        fast = ImageConfig(image_size=100, resize_mode="center_crop", encode_format="png", encode_quality=1)
        ours = stored_pixels(process_image(body, fast)).astype(int)
        theirs = np.asarray(Image.open(io.BytesIO(img2dataset_resizer(body, fast)[0])).convert("RGB")).astype(int)
        assert ours.shape == theirs.shape == (100, 100, 3)
        assert np.abs(ours - theirs).mean() < 2.0, (w, h)


def test_reserve_is_asked_for_the_decode_before_it_happens() -> None:
    import contextlib

    asked: list[int] = []

    @contextlib.contextmanager
    def reserve(nbytes: int):
        asked.append(nbytes)
        yield

    body = encode(smooth(300, 500, 1), "PNG")
    assert process_image(body, ImageConfig(image_size=64), reserve=reserve).ok
    assert asked == [8 * 300 * 500]
    jpeg = encode(smooth(600, 800, 2), "JPEG")
    assert process_image(jpeg, ImageConfig(image_size=64, resize_mode="center_crop"), reserve=reserve).ok
    assert asked[-1] == 8 * 300 * 400 // 4 or asked[-1] < 8 * 600 * 800  # the drafted (DCT-scaled) size
    asked.clear()
    assert process_image(encode(smooth(40, 40, 3), "PNG"), ImageConfig(image_size=64, max_pixels=100),
                         reserve=reserve).reason == "decompression_bomb"
    assert asked == []  # refused from the header: nothing reserved, nothing decoded


# --------------------------------------------------------------------------- colour signature (issue 14)

def _demo_shape(shape: str, colour: str, size: str, bg: str, seed: int) -> bytes:
    import random

    from pipelines.demo.synthetic import encode as demo_encode, render_shape

    return demo_encode(render_shape(shape, colour, size, bg, 64, random.Random(seed)))


def _colour_d(a: int, b: int) -> int:
    return int(images.colour_distance(np.array(a), np.array(b)))


def test_colour_signature_splits_every_demo_palette_pair_that_phash_merges() -> None:
    """The demo's shapes, same geometry (same seed) in each pair of palette colours: phash cannot tell most of
    them apart; the colour signature puts every pair beyond dedup's default colour threshold."""
    import itertools

    from pipelines.dedup.plan import DedupConfig
    from pipelines.demo.synthetic import BACKGROUNDS, COLOURS

    threshold = DedupConfig().colour_threshold
    cfg = ImageConfig(image_size=64, resize_mode="center_crop")
    phash_merged = pairs = 0
    for k, (shape, size, bg) in enumerate(itertools.product(["triangle", "ring", "star"], ["small", "large"],
                                                            BACKGROUNDS)):
        stored = {c: process_image(_demo_shape(shape, c, size, bg, k), cfg) for c in COLOURS}
        for a, b in itertools.combinations(COLOURS, 2):
            pairs += 1
            phash_merged += bin((stored[a].phash ^ stored[b].phash) & (2 ** 64 - 1)).count("1") <= 8
            assert _colour_d(stored[a].colour_sig, stored[b].colour_sig) > threshold, (shape, size, bg, a, b)
    assert phash_merged > pairs // 2  # the blind spot is real: phash alone merges most of these pairs


def test_colour_signature_survives_reencode_resize_and_stored_bytes() -> None:
    from pipelines.dedup.plan import DedupConfig

    threshold = DedupConfig().colour_threshold
    cfg = ImageConfig(image_size=64, resize_mode="center_crop")
    bodies = [_demo_shape(s, c, z, bg, i) for i, (s, c, z, bg) in enumerate(
        [("triangle", "red", "small", "white"), ("ring", "orange", "large", "noisy"),
         ("star", "purple", "small", "grey"), ("cross", "blue", "large", "black")])]
    bodies += [encode(smooth(96, 96, 10 + i), "JPEG") for i in range(4)]  # photo-like, every hue
    # Not asserted: per-pixel colour noise, which a 2/3 resize averages towards grey (6 levels measured).
    for body in bodies:
        original = process_image(body, cfg)
        pil = Image.open(io.BytesIO(body)).convert("RGB")
        reencoded = process_image(encode(np.asarray(pil), "JPEG", quality=70), cfg)
        small = pil.resize((pil.width * 2 // 3, pil.height * 2 // 3), Image.Resampling.BICUBIC)
        resized = process_image(encode(np.asarray(small), "JPEG", quality=75), cfg)
        for copy in (reencoded, resized):
            assert _colour_d(original.colour_sig, copy.colour_sig) <= threshold
        # The crawl hashes the pixels before encoding; dedup and decontamination hash decoded bytes.
        phash, colour = images.hashes_of_encoded(original.image)
        assert phash == images.phash_of_encoded(original.image)
        assert colour == images.colour_signature_of_encoded(original.image)
        assert _colour_d(original.colour_sig, colour) <= threshold


def test_colour_signature_layout_version_and_unknown() -> None:
    white = images.colour_signature(np.full((40, 50, 3), 255, np.uint8))
    black_grey = images.colour_signature(np.zeros((40, 50), np.uint8))  # grey input is accepted
    red = images.colour_signature(np.tile(np.array([220, 30, 30], np.uint8), (40, 50, 1)))
    levels = images.colour_levels(np.array([white, black_grey, red]))
    assert levels.shape == (3, images.COLOUR_BINS)
    assert levels[0].tolist() == [0] * 11 + [31]  # all of it in the lightest grey bin
    assert levels[1].tolist() == [0] * 8 + [31, 0, 0, 0]  # all of it in the darkest
    assert levels[2, 8:].sum() == 0 and levels[2, :8].sum() >= 31  # chromatic only, split over two hues
    assert images.colour_known(np.array([white, black_grey, red])).all()
    assert white > 0 and (white >> 60) == images.COLOUR_VERSION
    assert _colour_d(0, red) == -1 and _colour_d(red, red) == 0  # 0 = unknown: no evidence, not "equal"
    other_layout = (white & ((1 << 60) - 1)) | (7 << 60)
    assert not images.colour_known(np.array([other_layout]))[0]
    with pytest.raises(ValueError, match="RGB or grey"):
        images.colour_signature(np.zeros((4, 4, 4), np.uint8))
