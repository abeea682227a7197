"""Image transforms with PIL + NumPy (no torchvision): the paper's only augmentation is a random
square crop of the resized image; evaluation is resize + centre crop. CLIP's normalisation.

A transform called on an image gives a torch tensor; its `array` gives the same values as a NumPy array
without importing torch (data loaders that only ship arrays skip torch's ~1.5 s import that way).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(data: bytes | Image.Image) -> Image.Image:
    img = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    return img.convert("RGB")


def to_array(img: Image.Image, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
    """PIL RGB -> float32 3, H, W normalised (C-contiguous)."""
    arr = np.asarray(img, dtype=np.float32) / 255.0  # H, W, 3
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def to_tensor(img: Image.Image, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """PIL RGB -> float32 3, H, W normalised."""
    import torch

    return torch.from_numpy(to_array(img, mean, std))


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, bicubic (torchvision's Resize(int) on a PIL image does the same)."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return img if (nw, nh) == (w, h) else img.resize((nw, nh), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class _ArrayTransform:
    """A transform whose `array` gives the NumPy values; calling it gives the same values as a torch tensor."""

    def array(self, data: bytes | Image.Image) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, data: bytes | Image.Image) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.array(data))


@dataclass
class EvalTransform(_ArrayTransform):
    image_size: int

    def array(self, data: bytes | Image.Image) -> np.ndarray:
        return to_array(center_crop(resize_shorter(load_image(data), self.image_size), self.image_size))


@dataclass
class TrainTransform(_ArrayTransform):
    """Random square crop covering `scale` of the image area (open_clip's default 0.9-1.0), resized."""

    image_size: int
    scale: tuple[float, float] = (0.9, 1.0)
    seed: int | None = None

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"TrainTransform.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        self._rng = random.Random(self.seed)

    def array(self, data: bytes | Image.Image) -> np.ndarray:
        """The next random crop as a float32 3, S, S array (each call draws from the transform's generator)."""
        img = load_image(data)
        w, h = img.size
        side_max = min(w, h)
        area = self._rng.uniform(*self.scale) * w * h
        side = max(1, min(side_max, int(round(area ** 0.5))))
        left = self._rng.randint(0, w - side)
        top = self._rng.randint(0, h - side)
        crop = img.crop((left, top, left + side, top + side))
        return to_array(crop.resize((self.image_size, self.image_size), Image.BICUBIC))


def stack(transform, images: list) -> torch.Tensor:
    """Apply a transform to a list of encoded images -> B, 3, S, S."""
    import torch

    return torch.stack([transform(x) for x in images])


def drop_words(caption: str, p: float, rng: random.Random) -> str:
    """Caption word dropout: each whitespace-separated word is left out with probability p (at least one
    word stays). A text-side augmentation: every shorter caption is still true of its image ("a small red
    triangle" -> "a red triangle", "a small triangle"), so the text tower sees each concept also without
    the words that always came with it in the data. p = 0 returns the caption unchanged."""
    if p <= 0:
        return caption
    words = caption.split()
    kept = [w for w in words if rng.random() >= p]
    if not kept and words:
        kept = [rng.choice(words)]
    return " ".join(kept)
