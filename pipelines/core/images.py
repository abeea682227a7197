"""Untrusted image bytes -> a checked, resized, re-encoded image with its hashes, or a reason.

Plain Python (no Ray), called from many threads of one process at once: no lock, no process-wide state
changed per call, and every failure on hostile bytes comes back as a reason string, never an exception.

The steps, in an order that matters:

1. Header only (PIL's open is lazy): allowed format, pixel count (decompression bombs), smallest side and
   aspect ratio are checked before a single pixel is decoded.
2. One decode, by PIL. A JPEG that will be downscaled is first given `Image.draft()`, which makes libjpeg
   decode through DCT scaling at 1/2, 1/4 or 1/8 of its size while staying at least the target size: the
   inverse DCT, upsampling and colour conversion then touch up to 64x fewer pixels, and the resize after it
   has that much less to average. The price: on noisy photo-like images the stored pixels differ from a full
   decode's by ~1 level of 255 on average at 1/2 scale, ~2-3 at 1/4, ~5 at 1/8 (fast_resize=False gives
   img2dataset's exact bytes). PIL raises on data that ends early while it loads
   (ImageFile.LOAD_TRUNCATED_IMAGES is never set), which tells truncated files from corrupt ones.
3. The picture a browser would show: the first animation frame (an APNG's hidden default image skipped),
   EXIF orientation applied, 16-bit samples scaled to 8 bits (not clipped), palette, CMYK and grey modes
   converted (PIL, like browsers, reads every CMYK JPEG as Adobe-inverted), an embedded ICC profile converted
   to sRGB by lcms (skipped for profiles that render as sRGB, the common case), transparency composited over
   white.
4. img2dataset's resize semantics (its size rounding, the five resize modes, resize_only_if_bigger,
   min_image_size, max_aspect_ratio, the up/downscale interpolation choice, the white border), done with the
   same OpenCV calls; then the perceptual hash of the final pixels and one encode, with img2dataset's
   OpenCV encoder and settings.

Why the resize is written here rather than calling img2dataset's Resizer: the Resizer decodes the bytes again
with OpenCV, which ignores EXIF orientation and ICC profiles, keeps 16-bit samples and silently accepts a
truncated JPEG; it dup2()s fds 1 and 2 on every call, which is not thread-safe (callers had to hold a
process-wide lock); and importing it takes ~3 s and pulls albumentations and wandb into every crawler
process. What it computes fits in `_resize_plan` and `_resize`; tests/test_images.py compares both against it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import ContextManager, Literal, NamedTuple

import cv2
import numpy as np
import pyarrow as pa
import scipy.fftpack
from PIL import Image, ImageCms, UnidentifiedImageError

ResizeMode = Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"]
EncodeFormat = Literal["jpg", "png", "webp"]
# img2dataset's names for OpenCV's interpolations.
_CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "bilinear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC, "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4, "lanczos4": cv2.INTER_LANCZOS4,
}
_INTERPOLATIONS = frozenset(_CV2_INTERPOLATION)
# EXIF orientation -> the PIL transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
# 16-bit grey, and PIL's 32-bit "I" (TIFF), read on the same 0-65535 scale.
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# img2dataset's encoder settings, with OpenCV's encoders as it uses them.
_ENCODE_PARAM = {"jpg": cv2.IMWRITE_JPEG_QUALITY, "png": cv2.IMWRITE_PNG_COMPRESSION, "webp": cv2.IMWRITE_WEBP_QUALITY}


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
    #: away from crawled bytes. TIFF is left out on purpose: only Safari shows it, and libtiff is a
    #: large attack surface.
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    upscale_interpolation: str = "lanczos"
    downscale_interpolation: str = "area"
    #: Two shortcuts for images that shrink: libjpeg decodes a JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling,
    #: never below the target size), and center_crop resizes only the square it keeps. Together ~35% less
    #: CPU per 300-700 px photo; pixels within ~1 level of 255 on average of img2dataset's full decode,
    #: resize and crop (see the module docstring). False: img2dataset's exact bytes.
    fast_resize: bool = True

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
        if not isinstance(self.fast_resize, bool):
            raise ValueError(f"ImageConfig.fast_resize must be true or false, got {self.fast_resize!r}")


@dataclass(frozen=True)
class ImageResult:
    ok: bool
    reason: str
    image: bytes | None = None
    width: int | None = None  # of `image`
    height: int | None = None
    original_width: int | None = None  # as displayed: after EXIF orientation
    original_height: int | None = None
    sha256: str | None = None  # hex digest of `image`, the stored bytes
    phash: int | None = None  # image_phash of the stored pixels before encoding (fits Parquet int64)
    colour_sig: int | None = None  # colour_signature of the same pixels (fits Parquet int64)


@dataclass(frozen=True)
class CaptionResult:
    ok: bool
    reason: str
    text: str | None = None


class _ImageReject(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Plan(NamedTuple):
    """img2dataset's resize of one image: the size to resize to (width, height) and whether that shrinks it."""

    size: tuple[int, int]
    downscale: bool


# --------------------------------------------------------------------------- entry point


# Called with the bytes a decode will hold (8 per decoded pixel: the decode and one converted copy), after
# the header checks and before the decode; the context it returns is held until the image is encoded. The
# crawl passes its pixel budget here, so concurrent decodes cannot exceed it.
Reserve = Callable[[int], ContextManager[object]]


def process_image(body: bytes | None, cfg: ImageConfig, reserve: Reserve | None = None) -> ImageResult:
    if not body:
        return ImageResult(False, "empty_body")
    try:
        return _process(body, cfg, reserve or _no_reservation)
    except _ImageReject as rej:
        return ImageResult(False, rej.reason)
    except Exception:  # noqa: BLE001 - hostile bytes must never raise; decode errors have their own reasons
        return ImageResult(False, "resize_error")


def _no_reservation(nbytes: int) -> ContextManager[object]:
    return contextlib.nullcontext()


def _process(body: bytes, cfg: ImageConfig, reserve: Reserve) -> ImageResult:
    with contextlib.ExitStack() as held:
        frame, plan, (original_width, original_height) = _displayed_frame(body, cfg, reserve, held)
        pixels = _browser_pixels(frame)
        del frame  # frees the decode (pixels are a copy, or share it only for grey) before the resize allocates
        final = _resize(pixels, plan, cfg)
        del pixels
        data = _encode(final, cfg)
    height, width = final.shape[:2]
    return ImageResult(True, "ok", data, width, height, original_width, original_height,
                       hashlib.sha256(data).hexdigest(), image_phash(Image.fromarray(final)), colour_signature(final))


# --------------------------------------------------------------------------- header checks and the decode


def _open(body: bytes, cfg: ImageConfig) -> Image.Image:
    """PIL's lazy open (header only), with the checks that need nothing more than the header."""
    try:
        img = Image.open(io.BytesIO(body), formats=cfg.allowed_formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL raises the error itself from open() past 2x its limit; the warning only arrives as an
        # exception when warnings are turned into errors (python -W error).
        raise _ImageReject("decompression_bomb") from None
    except UnidentifiedImageError:
        raise _ImageReject("undecodable") from None
    except Exception as err:  # noqa: BLE001 - whatever a plugin raises on a hostile header
        raise _ImageReject(_decode_failure(err)) from None
    width, height = img.size
    reason = None
    if width < 1 or height < 1:
        reason = "undecodable"
    elif width * height > cfg.max_pixels:
        reason = "decompression_bomb"
    elif min(width, height) < cfg.min_image_size:
        reason = "too_small"
    elif cfg.max_aspect_ratio is not None and max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        reason = "bad_aspect_ratio"
    if reason:
        raise _ImageReject(reason)
    return img


def _displayed_frame(body: bytes, cfg: ImageConfig, reserve: Reserve, held: contextlib.ExitStack
                     ) -> tuple[Image.Image, _Plan | None, tuple[int, int]]:
    """Header checks, the one decode and EXIF orientation: the frame upright, its resize plan and its size."""
    img = _open(body, cfg)
    width, height = img.size
    plan = _resize_plan(width, height, cfg)  # the scale is rotation-invariant: planned in stored axes
    draft = plan.size if plan and plan.downscale and cfg.fast_resize and img.format in ("JPEG", "MPO") else None
    if draft:
        _set_draft(img, draft)
    held.enter_context(reserve(8 * img.width * img.height))  # after draft(): the size it will decode at
    _load_first_frame(img)
    orientation = _exif_orientation(img)
    if orientation in _ORIENTATION:
        img = img.transpose(_ORIENTATION[orientation])
    if orientation in _SWAPS_AXES:
        width, height = height, width
        plan = plan and _Plan(plan.size[::-1], plan.downscale)
    return img, plan, (width, height)


def _set_draft(img: Image.Image, draft: tuple[int, int]) -> None:
    """Make a JPEG decode at the smallest DCT scale (1/2, 1/4, 1/8) that stays at least `draft` in size."""
    try:
        img.draft(None, draft)
    except Exception as err:  # noqa: BLE001 - PIL reads more of the header here
        raise _ImageReject(_decode_failure(err)) from None


def _load_first_frame(img: Image.Image) -> None:
    """The one full decode, of the frame a browser shows first."""
    try:
        if img.format == "PNG" and img.info.get("default_image") and getattr(img, "n_frames", 1) > 1:
            # An APNG whose IDAT image is not part of the animation: browsers play the animation, so its
            # first frame is PIL's frame 1 (PIL's frame 0 is the fallback for non-APNG viewers).
            img.seek(1)
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _ImageReject("decompression_bomb") from None
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise many types on hostile bytes
        raise _ImageReject(_decode_failure(err)) from None


def _decode_failure(err: Exception) -> str:
    # PIL has no typed "truncated" error, only this message ("image file is truncated", "Truncated File Read").
    return "truncated" if "truncated" in str(err).lower() else "corrupt"


def _exif_orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - browsers ignore malformed EXIF, and so do we
        return 1
    return value if value in _ORIENTATION else 1


# --------------------------------------------------------------------------- the picture a browser shows


def _browser_pixels(img: Image.Image) -> np.ndarray:
    """A decoded frame in any mode -> 8-bit sRGB pixels composited over white: HxW (grey) or HxWx3."""
    icc = img.info.get("icc_profile")
    img = _to_srgb(_eight_bit(_gif_canvas(img)), icc)
    pixels = _as_array(img)
    if img.mode in ("LA", "RGBA"):
        return _over_white(pixels)
    if img.mode == "RGB" and pixels.shape[2] == 4:
        return cv2.cvtColor(pixels, cv2.COLOR_RGBA2RGB)  # PIL keeps RGB as RGBX; this is the one copy
    return pixels


def _as_array(img: Image.Image) -> np.ndarray:
    """PIL image -> numpy. Pillow's Arrow export shares the image's own buffer (RGB as RGBX, 4 bytes a
    pixel): ~5 us, where np.asarray's tobytes() makes two copies (~0.3 ms for a 500 px photo). It needs the
    rows in one block, as Pillow allocates images that fit one of its memory blocks (16 MiB by default);
    larger ones take the copy."""
    if img.mode in ("RGB", "RGBA", "L"):
        try:
            exported = pa.array(img)
        except ValueError:  # "Image rows are not contiguous in memory"
            return np.asarray(img)
        channels = 1 if img.mode == "L" else 4
        flat = np.frombuffer(exported.buffers()[-1], np.uint8, img.width * img.height * channels)
        return flat.reshape((img.height, img.width, channels)[:2 if channels == 1 else 3])
    return np.asarray(img)


def _gif_canvas(img: Image.Image) -> Image.Image:
    """Browsers leave the canvas outside a GIF's first frame transparent; PIL paints the background colour."""
    box = getattr(img, "dispose_extent", None)
    if img.format != "GIF" or box is None or tuple(box) == (0, 0, *img.size):
        return img
    rgba = img.convert("RGBA")
    alpha = Image.new("L", img.size, 0)
    alpha.paste(rgba.getchannel("A").crop(box), box[:2])
    rgba.putalpha(alpha)
    return rgba


def _eight_bit(img: Image.Image) -> Image.Image:
    """Any PIL mode -> L, LA, RGB, RGBA or CMYK with 8-bit samples (and CMYK as the ink amounts)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:  # 16-bit grey (PNG, TIFF); convert("L") would clip at 255, not scale
        samples = np.asarray(img)
        return _from_grey_samples(img, (np.clip(samples, 0, 65535) if mode == "I" else samples) >> 8)
    if mode == "F":  # float TIFF: samples are 0.0-1.0
        return _from_grey_samples(img, np.rint(np.clip(np.asarray(img), 0.0, 1.0) * 255))
    if mode == "CMYK":
        # PIL reads every CMYK JPEG as Adobe-inverted, with or without the APP14 marker, as browsers do
        # (Skia, WebKit, Firefox): Photoshop's inverted CMYK is the only kind seen on the web.
        return img
    has_alpha = mode in ("LA", "RGBA", "PA", "La", "RGBa") or "transparency" in img.info
    if mode in ("1", "L", "LA", "La"):
        target = "LA" if has_alpha else "L"
    else:  # P, PA, RGB, RGBA, RGBX, RGBa, YCbCr, LAB, HSV (PIL converts LAB colorimetrically)
        target = "RGBA" if has_alpha else "RGB"
    if mode == target:
        return img
    try:
        return img.convert(target)
    except ValueError:  # a mode PIL cannot convert (La): no decoder of an allowed format makes one
        raise _ImageReject("undecodable") from None


def _from_grey_samples(img: Image.Image, grey: np.ndarray) -> Image.Image:
    out = Image.fromarray(grey.astype(np.uint8))
    key = img.info.get("transparency")
    if isinstance(key, int):  # a 16-bit grey PNG's tRNS: one sample value is fully transparent
        alpha = np.where(np.asarray(img) == key, 0, 255).astype(np.uint8)
        out = Image.merge("LA", (out, Image.fromarray(alpha)))
    return out


def _to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """Colour-manage to sRGB through the embedded profile, as browsers do; CMYK always ends as RGB.
    A profile that is unreadable or does not fit the mode is ignored (browsers ignore it too)."""
    transform = _icc_transform(icc, "L" if img.mode == "LA" else img.mode) if icc else None
    if transform is None:
        return img.convert("RGB") if img.mode == "CMYK" else img
    if img.mode == "LA":  # lcms takes grey without alpha: convert the grey, then put the alpha back
        grey = transform.apply(img.getchannel("L")).convert("L")  # sRGB neutral greys: R = G = B
        return Image.merge("LA", (grey, img.getchannel("A")))
    out = transform.apply(img)  # RGBA -> RGBA: Pillow carries the alpha channel through
    return out.convert("L") if img.mode == "L" else out


@functools.lru_cache(maxsize=32)
def _icc_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """Embedded profile -> sRGB for PIL `mode` (L, RGB, RGBA, CMYK); None when there is nothing to do: a
    profile that is unusable, or one that renders like sRGB (most web images carry an sRGB profile, and
    running lcms on them would cost more than the rest of the step; browsers skip them too).
    Cached because building and probing one costs milliseconds and sites reuse a handful of profiles.
    NOCACHE turns off lcms's one-pixel cache, the only state a transform changes as it runs: threads share it."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = {"L": "GRAY", "RGB": "RGB", "RGBA": "RGB", "CMYK": "CMYK"}.get(mode)
        if space is None or profile.profile.xcolor_space.strip() != space:
            return None
        out_mode = "RGBA" if mode == "RGBA" else "RGB"
        srgb = ImageCms.createProfile("sRGB")  # a fresh one: no lcms profile handle shared between threads
        transform = ImageCms.buildTransform(profile, srgb, mode, out_mode, flags=ImageCms.Flags.NOCACHE)
        return None if mode != "CMYK" and _renders_as_srgb(transform, mode) else transform
    except Exception:  # noqa: BLE001 - PyCMSError, OSError, ... on a hostile profile: ignore it
        return None


def _renders_as_srgb(transform: ImageCms.ImageCmsTransform, mode: str) -> bool:
    """Whether the transform moves no colour of an 18-level grid (every 15th value) by more than one level."""
    levels = np.linspace(0, 255, 18).astype(np.uint8)
    if mode == "L":
        probe = levels[None, :]
        expected = np.repeat(probe[..., None], 3, -1)
    else:
        grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(1, -1, 3)
        probe = np.concatenate([grid, np.full(grid.shape[:2] + (1,), 255, np.uint8)], -1) if mode == "RGBA" else grid
        expected = grid
    out = np.asarray(transform.apply(Image.fromarray(probe)))[..., :3]
    return int(np.abs(out.astype(np.int16) - expected).max()) <= 1


def _over_white(pixels: np.ndarray) -> np.ndarray:
    """HxWx2 (LA) or HxWx4 (RGBA) -> HxW or HxWx3 composited over white, rounded exactly like img2dataset's
    rint(alpha / 255 * colour + 255 - alpha). In uint16 (c*a + 255*(255-a) + 127 <= 65152) and in bands of
    rows, so the temporaries stay small next to the decode."""
    colour_channels = pixels.shape[2] - 1
    out = np.empty(pixels.shape[:2] + (colour_channels,), np.uint8)
    for top in range(0, pixels.shape[0], 256):
        band = pixels[top:top + 256]
        alpha = band[..., -1:].astype(np.uint16)
        white = (255 - alpha) * 255 + 127
        out[top:top + 256] = (band[..., :-1] * alpha + white) // 255
    return out[..., 0] if colour_channels == 1 else out


# --------------------------------------------------------------------------- img2dataset's resize


def _resize_plan(width: int, height: int, cfg: ImageConfig) -> _Plan | None:
    """img2dataset's target size (albumentations' SmallestMaxSize / LongestMaxSize, the same float arithmetic
    and Python rounding) for a width x height image; None when it does not resize (nor crop, nor pad)."""
    if cfg.resize_mode == "no":
        return None
    side = min if cfg.resize_mode in ("keep_ratio", "center_crop") else max
    downscale = side(width, height) > cfg.image_size
    if cfg.resize_only_if_bigger and not downscale:
        return None
    scale = cfg.image_size / side(height, width)
    return _Plan((max(1, round(width * scale)), max(1, round(height * scale))), downscale)


def _resize(pixels: np.ndarray, plan: _Plan | None, cfg: ImageConfig) -> np.ndarray:
    """Resize to plan.size with img2dataset's interpolation choice, then its centre crop or white border."""
    if plan is None:
        return pixels
    width, height = plan.size
    if cfg.fast_resize and cfg.resize_mode == "center_crop" and plan.downscale:
        return _crop_then_resize(pixels, plan, cfg)
    if pixels.shape[:2] != (height, width):  # a JPEG draft may already have hit the size exactly
        name = cfg.downscale_interpolation if plan.downscale else cfg.upscale_interpolation
        pixels = cv2.resize(pixels, (width, height), interpolation=_CV2_INTERPOLATION[name])
    side = cfg.image_size
    if cfg.resize_mode == "center_crop":
        top, left = (height - side) // 2, (width - side) // 2
        pixels = np.ascontiguousarray(pixels[top:top + side, left:left + side])
    elif cfg.resize_mode == "border" and (height < side or width < side):
        top, left = max(0, side - height) // 2, max(0, side - width) // 2
        pixels = cv2.copyMakeBorder(pixels, top, max(0, side - height) - top, left, max(0, side - width) - left,
                                    cv2.BORDER_CONSTANT, value=(255, 255, 255))
    return pixels


def _crop_then_resize(pixels: np.ndarray, plan: _Plan, cfg: ImageConfig) -> np.ndarray:
    """center_crop's result without resizing the margins it throws away: the source window that maps onto
    the kept square (rounded to whole source pixels, so at most half a pixel off) resized straight to the
    square. 27% less resize time on 300-700 px photos; mean difference 0.7 levels of 255 (measured)."""
    width, height = plan.size
    side = cfg.image_size
    top, left = (height - side) // 2, (width - side) // 2
    rows, cols = pixels.shape[:2]
    y0, y1 = round(top * rows / height), round((top + side) * rows / height)
    x0, x1 = round(left * cols / width), round((left + side) * cols / width)
    window = np.ascontiguousarray(pixels[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)])
    return cv2.resize(window, (side, side), interpolation=_CV2_INTERPOLATION[cfg.downscale_interpolation])


# --------------------------------------------------------------------------- encode and hash


def _encode(pixels: np.ndarray, cfg: ImageConfig) -> bytes:
    """img2dataset's encode: OpenCV's encoder, its quality parameter (OpenCV takes BGR)."""
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    # OpenCV's WebP quality starts at 1 (it logs a warning and uses 1 for 0).
    quality = max(1, cfg.encode_quality) if cfg.encode_format == "webp" else cfg.encode_quality
    ok, encoded = cv2.imencode(f".{cfg.encode_format}", pixels, [_ENCODE_PARAM[cfg.encode_format], quality])
    if not ok:
        raise _ImageReject("resize_error")
    return encoded.tobytes()


def image_phash(img: Image.Image) -> int:
    """imagehash.phash(img) as a signed int64: the same calls (grey, 32x32 LANCZOS, 2-D DCT-II, the 8x8 low
    frequencies above their median) and the same bit order (row-major, first bit = bit 63), without the
    ImageHash object and its hex-string round trip. Values >= 2**63 wrap to negative, as a uint64 -> int64 view."""
    small = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    low = scipy.fftpack.dct(scipy.fftpack.dct(small, axis=0), axis=1)[:8, :8]
    return int.from_bytes(np.packbits(low > np.median(low)).tobytes(), "big", signed=True)


_PHASH_DECODE = ImageConfig(resize_mode="no", allowed_formats=("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"))


def phash_of_encoded(data: bytes) -> int:
    """image_phash of encoded bytes decoded the way the crawl decodes what it stores (first frame, EXIF
    orientation, 8-bit sRGB, alpha over white), at full size. Eval images and stored training images are
    hashed through this, so decontamination compares like with like. ValueError for bytes that are not an
    image (the reason in the message)."""
    return image_phash(Image.fromarray(_displayed_pixels(data)))


def hashes_of_encoded(data: bytes) -> tuple[int, int]:
    """(image_phash, colour_signature) of encoded bytes from one decode, as phash_of_encoded decodes them."""
    pixels = _displayed_pixels(data)
    return image_phash(Image.fromarray(pixels)), colour_signature(pixels)


def colour_signature_of_encoded(data: bytes) -> int:
    """colour_signature of encoded bytes, decoded as phash_of_encoded decodes them (ValueError: not an image)."""
    return colour_signature(_displayed_pixels(data))


def _displayed_pixels(data: bytes) -> np.ndarray:
    try:
        with contextlib.ExitStack() as held:
            frame, _, _ = _displayed_frame(bytes(data), _PHASH_DECODE, _no_reservation, held)
            return _browser_pixels(frame)
    except _ImageReject as rej:
        raise ValueError(f"not a decodable image ({rej.reason})") from None


# --------------------------------------------------------------------------- colour signature
#
# phash sees 32x32 grey levels and is blind to colour: a red and an orange triangle on the same background
# have the same phash. The colour signature is the other half: *which colours, in what amounts*, with no
# layout (phash has the layout). Measured on the demo's synthetic shapes (issue 14), a grid of mean colours
# (2x2..4x4 cells, CIELAB) could not both keep 4%-cropped copies and split close colours: a crop moves
# every cell boundary; a histogram does not move.
#
# The picture, area-averaged to 32x32, in CIELAB. Each pixel's weight goes to chromatic or grey bins by its
# chroma C = |(a*, b*)| (all grey below 8, all chromatic above 24, linear between): chromatic weight over
# COLOUR_HUES hue bins of 45 degrees, grey weight over COLOUR_GREYS lightness bins (black .. white), both
# split linearly between the two nearest bin centres, so a hue or lightness on a bin edge moves a little
# mass, never all of it. Each bin holds a share f of the picture, stored as round(31 * sqrt(f)) in 5 bits
# (sqrt: a shape covering 4% of the picture is 6 levels, not 1). Twelve 5-bit bins fill bits 0..59; bits
# 60..63 hold COLOUR_VERSION, so a signature from another layout is never compared as if it were this one,
# and 0 (no version) means "unknown" to readers.
#
# Distance: the largest difference of any bin, in levels (colour_distance). Measured: JPEG re-encode (q70)
# <= 2, a 2/3 resize <= 3, the demo's 4%-crop + 1.5x + JPEG copies <= 2; images of the demo that differ in
# colour (any two palette colours, the closest being red/orange, orange/yellow, blue/purple) >= 4.

COLOUR_HUES = 8
COLOUR_GREYS = 4
COLOUR_BINS = COLOUR_HUES + COLOUR_GREYS
COLOUR_LEVEL_BITS = 5
COLOUR_VERSION = 1
_COLOUR_MAX = (1 << COLOUR_LEVEL_BITS) - 1
_COLOUR_SHIFTS = np.arange(COLOUR_BINS, dtype=np.uint64) * np.uint64(COLOUR_LEVEL_BITS)
_VERSION_SHIFT = np.uint64(60)


def colour_signature(pixels: np.ndarray) -> int:
    """The colour signature (see above) of RGB (h, w, 3) or grey (h, w) uint8 pixels, as a signed int64."""
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    elif pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"colour_signature needs RGB or grey pixels, got shape {pixels.shape}")
    if min(pixels.shape[:2]) > 128:  # OpenCV's area resize by a non-integer factor is slow (0.9 ms from 300 px);
        pixels = cv2.resize(pixels, (128, 128), interpolation=cv2.INTER_LINEAR)  # to 128, then by 4: 0.2 ms
    small = cv2.resize(pixels, (32, 32), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2Lab).reshape(-1, 3)
    light, a, b = lab[:, 0], lab[:, 1], lab[:, 2]
    chromatic = np.clip((np.hypot(a, b) - 8.0) / 16.0, 0.0, 1.0)
    hue = (np.arctan2(b, a) * (COLOUR_HUES / (2 * np.pi))) % COLOUR_HUES  # bin centres at 0, 45, .. degrees
    grey = np.clip(light * ((COLOUR_GREYS - 1) / 100.0), 0.0, COLOUR_GREYS - 1 - 1e-6)  # 0 .. 3 (black .. white)
    n = len(light)
    pos = np.r_[hue, COLOUR_HUES + grey]  # fractional bin positions: hue bins 0..7, grey bins 8..11
    lo = np.floor(pos).astype(np.int64)
    hi = lo + 1
    hi[:n][hi[:n] == COLOUR_HUES] = 0  # hue wraps around; lightness does not
    weight, frac = np.r_[chromatic, 1.0 - chromatic], pos - lo
    shares = np.bincount(np.r_[lo, hi], np.r_[weight * (1 - frac), weight * frac], COLOUR_BINS) / n
    levels = np.rint(np.sqrt(shares) * _COLOUR_MAX).astype(np.uint64)
    packed = np.bitwise_or.reduce(levels << _COLOUR_SHIFTS) | (np.uint64(COLOUR_VERSION) << _VERSION_SHIFT)
    return int(packed.view(np.int64))


def colour_levels(signatures: np.ndarray) -> np.ndarray:
    """(n, COLOUR_BINS) uint8 bin levels of int64 signatures."""
    sig = np.asarray(signatures, dtype=np.int64).view(np.uint64)
    return ((sig[..., None] >> _COLOUR_SHIFTS) & np.uint64(_COLOUR_MAX)).astype(np.uint8)


def colour_known(signatures: np.ndarray) -> np.ndarray:
    """True where a signature has this layout's version (0 = unknown; another version = another layout)."""
    return (np.asarray(signatures, dtype=np.int64).view(np.uint64) >> _VERSION_SHIFT) == np.uint64(COLOUR_VERSION)


def colour_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest bin difference in levels of two broadcastable int64 signature arrays, as int16; -1 where
    either side is not a signature of this layout (unknown colour: no evidence either way)."""
    d = np.abs(colour_levels(a).astype(np.int16) - colour_levels(b).astype(np.int16)).max(axis=-1)
    return np.where(colour_known(a) & colour_known(b), d, np.int16(-1)).astype(np.int16)


# --------------------------------------------------------------------------- captions


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
