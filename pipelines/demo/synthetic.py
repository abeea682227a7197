"""A synthetic compositional image-text set (shapes x colours x sizes x backgrounds, varied caption
phrasings) plus scikit-learn's handwritten digits: real pixels and captions that need no download,
for the demo and the tests. Some colour-shape combinations are held out of training entirely so
that zero-shot evaluation can test composition.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ["circle", "square", "triangle", "cross", "star", "ring"]
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20),
    "purple": (140, 40, 180), "orange": (245, 130, 10),
}
SIZES = {"small": 0.45, "large": 0.85}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128), "noisy": None}
# Never shown in training: zero-shot on these tests composition of seen concepts.
HELD_OUT = {("red", "triangle"), ("blue", "circle"), ("green", "star"), ("yellow", "square")}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

SHAPE_CAPTIONS = [
    "a photo of a {size} {colour} {shape}.",
    "a {colour} {shape} on a {bg} background",
    "{size} {colour} {shape}",
    "an image of a {colour} {shape}",
    "a drawing of a {size} {shape} in {colour}",
    "the {shape} is {colour}",
]
DIGIT_CAPTIONS = [
    "a photo of the number {name}.",
    "a handwritten {digit}",
    "the digit {name}",
    "a scanned image of the number {name}",
    "handwriting showing a {name}",
]


@dataclass
class Sample:
    image: bytes
    caption: str
    kind: str  # "shape" | "digit"
    label: str  # "red triangle" / "seven"
    colour: str = ""
    shape: str = ""


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        ang = np.pi / 2 + i * np.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * np.cos(ang), cy - rr * np.sin(ang)))
    return pts


def render_shape(shape: str, colour: str, size: str, bg: str, px: int, rng: random.Random) -> Image.Image:
    if BACKGROUNDS[bg] is None:
        noise = np.random.default_rng(rng.getrandbits(32)).integers(60, 200, (px, px, 3), dtype=np.uint8)
        img = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.5))
    else:
        img = Image.new("RGB", (px, px), BACKGROUNDS[bg])
    d = ImageDraw.Draw(img)
    r = SIZES[size] * px / 2 * rng.uniform(0.85, 1.0)
    cx = px / 2 + rng.uniform(-1, 1) * (px / 2 - r) * 0.8
    cy = px / 2 + rng.uniform(-1, 1) * (px / 2 - r) * 0.8
    fill = tuple(int(np.clip(c + rng.randint(-20, 20), 0, 255)) for c in COLOURS[colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle((cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif shape == "star":
        d.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "ring":
        d.ellipse(box, outline=fill, width=max(2, int(r * 0.35)))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def shape_samples(n: int, px: int = 64, seed: int = 0, held_out: bool = False) -> list[Sample]:
    """n samples over the allowed (or, with held_out=True, only the held-out) colour-shape pairs."""
    rng = random.Random(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT) == held_out]
    out = []
    for i in range(n):
        colour, shape = combos[i % len(combos)]
        size, bg = rng.choice(list(SIZES)), rng.choice(list(BACKGROUNDS))
        img = render_shape(shape, colour, size, bg, px, rng)
        caption = rng.choice(SHAPE_CAPTIONS).format(size=size, colour=colour, shape=shape, bg=bg)
        out.append(Sample(encode(img), caption, "shape", f"{colour} {shape}", colour, shape))
    return out


def digit_samples(split: str = "train", px: int = 64, seed: int = 0, limit: int | None = None) -> list[Sample]:
    """scikit-learn's 1,797 8x8 digits, upscaled; 'train' is the first 80% (fixed split), 'test' the rest."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n_train = int(len(digits.images) * 0.8)
    idx = range(n_train) if split == "train" else range(n_train, len(digits.images))
    rng = random.Random(seed)
    out = []
    for i in list(idx)[:limit]:
        arr = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        img = Image.fromarray(255 - arr).resize((px, px), Image.BICUBIC).convert("RGB")
        label = int(digits.target[i])
        caption = rng.choice(DIGIT_CAPTIONS).format(name=DIGIT_NAMES[label], digit=label)
        out.append(Sample(encode(img), caption, "digit", DIGIT_NAMES[label]))
    return out


def shape_classnames(held_out_only: bool = False) -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES if not held_out_only or (c, s) in HELD_OUT]
