"""Untrusted image bytes -> a checked, resized, re-encoded image with its hashes, or a reason.

Plain Python (no Ray). Order matters and must stay so: the pixel count is read from the header
(PIL's open is lazy) and refused before anything is decoded; PIL then decodes fully to tell
truncated and corrupt files apart (OpenCV, which the resizer uses, silently accepts a truncated
JPEG); only then does img2dataset's Resizer decode again, resize and re-encode. Failures are
reason strings; only errors PIL/OpenCV raise on bad input are caught.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import imagehash
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from img2dataset.resizer import Resizer

ResizeMode = Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"]
EncodeFormat = Literal["jpg", "png", "webp"]
_INTERPOLATIONS = frozenset({"nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"})
# Resizer's error strings -> our reasons; anything else it reports becomes "resize_error".
_RESIZER_ERRORS = {
    "image too small": "too_small",
    "image area too large": "decompression_bomb",
    "aspect ratio too large": "bad_aspect_ratio",
    "Image decoding error": "undecodable",
}
# img2dataset's Resizer silences stdout/stderr by dup2-ing fds 1 and 2 to /dev/null for each call
# and restoring them after. Two threads doing that at once can restore each other's /dev/null and
# silence the process for good, so calls are serialised process-wide.
_RESIZE_LOCK = threading.Lock()


@dataclass(frozen=True)
class ImageConfig:
    #: Target side in pixels; what it bounds depends on resize_mode (img2dataset's meaning).
    image_size: int = 256
    #: no | keep_ratio (shorter side = image_size) | center_crop (square) | border (pad to a
    #: square) | keep_ratio_largest (longer side = image_size).
    resize_mode: ResizeMode = "keep_ratio"
    #: Never upscale: leave images already within image_size as they are.
    resize_only_if_bigger: bool = False
    encode_format: EncodeFormat = "jpg"
    #: JPEG/WebP quality 0-100; for PNG the zlib compression level 0-9.
    encode_quality: int = 95
    #: Smallest original side accepted (0 = any).
    min_image_size: int = 0
    #: Largest original long/short side ratio accepted.
    max_aspect_ratio: float | None = None
    #: Largest width*height accepted, read from the header before any decode. Must stay at or
    #: under PIL's Image.MAX_IMAGE_PIXELS so PIL's own bomb warning can only fire on images this
    #: check refuses anyway.
    max_pixels: int = 40_000_000
    #: PIL format names that may be opened at all: keeps exotic decoders (EPS runs Ghostscript)
    #: away from crawled bytes.
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    upscale_interpolation: str = "lanczos"
    downscale_interpolation: str = "area"

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_formats", tuple(self.allowed_formats))  # YAML gives lists
        if self.image_size < 1:
            raise ValueError(f"ImageConfig.image_size must be >= 1, got {self.image_size!r}")
        if self.resize_mode not in ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"):
            raise ValueError(f"ImageConfig.resize_mode: unknown mode {self.resize_mode!r}")
        if self.encode_format not in ("jpg", "png", "webp"):
            raise ValueError(f"ImageConfig.encode_format must be jpg, png or webp, got {self.encode_format!r}")
        top = 9 if self.encode_format == "png" else 100
        if not 0 <= self.encode_quality <= top:
            raise ValueError(f"ImageConfig.encode_quality must be in 0..{top} for {self.encode_format}, "
                             f"got {self.encode_quality!r}")
        if self.min_image_size < 0 or not (self.max_aspect_ratio is None or self.max_aspect_ratio >= 1):
            raise ValueError("ImageConfig: min_image_size must be >= 0 and max_aspect_ratio >= 1, got "
                             f"{self.min_image_size!r} and {self.max_aspect_ratio!r}")
        if not 1 <= self.max_pixels <= Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"ImageConfig.max_pixels must be in 1..{Image.MAX_IMAGE_PIXELS} (PIL's own "
                             f"limit), got {self.max_pixels!r}")
        unknown = set(self.allowed_formats) - set(Image.registered_extensions().values())
        if not self.allowed_formats or unknown:
            raise ValueError(f"ImageConfig.allowed_formats: unknown or empty PIL formats {sorted(unknown)}")
        for name in ("upscale_interpolation", "downscale_interpolation"):
            if getattr(self, name) not in _INTERPOLATIONS:
                raise ValueError(f"ImageConfig.{name} must be one of {sorted(_INTERPOLATIONS)}, "
                                 f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ImageResult:
    ok: bool
    reason: str
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None  # hex digest of `image`, the stored bytes
    phash: int | None = None  # 64-bit perceptual hash of `image` as a signed int64 (fits Parquet int64)


@dataclass(frozen=True)
class CaptionResult:
    ok: bool
    reason: str
    text: str | None = None


class _ImageReject(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def process_image(body: bytes | None, cfg: ImageConfig) -> ImageResult:
    if not body:
        return ImageResult(False, "empty_body")
    try:
        _check_and_decode(body, cfg)
        image, width, height, original_width, original_height = _resize(body, cfg)
        phash = _phash(image)
    except _ImageReject as rej:
        return ImageResult(False, rej.reason)
    return ImageResult(True, "ok", image, width, height, original_width, original_height,
                       hashlib.sha256(image).hexdigest(), phash)


def _check_and_decode(body: bytes, cfg: ImageConfig) -> None:
    try:
        with Image.open(io.BytesIO(body), formats=cfg.allowed_formats) as img:
            width, height = img.size  # from the header: no pixel decoded yet
            if width < 1 or height < 1:
                raise _ImageReject("undecodable")
            if width * height > cfg.max_pixels:
                raise _ImageReject("decompression_bomb")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL raises the error itself from open() past 2x its limit; the warning only arrives as an
        # exception when warnings are turned into errors (python -W error).
        raise _ImageReject("decompression_bomb") from None
    except UnidentifiedImageError:
        raise _ImageReject("undecodable") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as err:
        # What PIL's decoders raise on hostile bytes; it has no typed "truncated" error, only this
        # message ("image file is truncated", "Truncated File Read").
        raise _ImageReject("truncated" if "truncated" in str(err).lower() else "corrupt") from None


@functools.lru_cache(maxsize=8)
def _resizer(cfg: ImageConfig) -> Resizer:
    # albumentations (imported by img2dataset) asks a package index for updates unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.resizer import Resizer  # ~3 s import: only when the first image arrives

    return Resizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        upscale_interpolation=cfg.upscale_interpolation,
        downscale_interpolation=cfg.downscale_interpolation,
        encode_quality=cfg.encode_quality,
        encode_format=cfg.encode_format,
        min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_pixels,
        max_aspect_ratio=math.inf if cfg.max_aspect_ratio is None else cfg.max_aspect_ratio,
    )


def _resize(body: bytes, cfg: ImageConfig) -> tuple[bytes, int, int, int, int]:
    resizer = _resizer(cfg)
    with _RESIZE_LOCK:
        image, width, height, original_width, original_height, err = resizer(io.BytesIO(body))
    if err is not None:
        raise _ImageReject(_RESIZER_ERRORS.get(err, "resize_error"))
    return image, width, height, original_width, original_height


def _phash(image: bytes) -> int:
    try:
        with Image.open(io.BytesIO(image)) as stored:
            unsigned = int(str(imagehash.phash(stored)), 16)  # 16 hex digits = 64 bits
    except (OSError, SyntaxError, ValueError) as err:  # our own encoder's output: should not happen
        raise _ImageReject("resize_error") from err
    return unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned


def decode_caption(raw: bytes | str | None) -> CaptionResult:
    """Caption bytes or text -> text that Parquet/Arrow can store (strict UTF-8), or a reason."""
    if raw is None:
        return CaptionResult(False, "caption_missing")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            return CaptionResult(True, "ok", bytes(raw).decode("utf-8").strip())
        except UnicodeDecodeError:
            return CaptionResult(False, "invalid_utf8_caption")
    if isinstance(raw, str):
        try:
            raw.encode("utf-8")  # lone surrogates (from surrogateescape readers) cannot be stored
        except UnicodeEncodeError:
            return CaptionResult(False, "invalid_utf8_caption")
        return CaptionResult(True, "ok", raw.strip())
    raise TypeError(f"decode_caption: caption must be bytes, str or None, got {type(raw).__name__}")
