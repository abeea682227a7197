"""Named CLIP architectures: one table of sizes, read by name (big_vision's `decode_variant` habit).

The sizes are those of OpenAI's released checkpoints (paper table 19/20 and open_clip's
`model_configs/*.json`). Head counts follow OpenAI's `build_model` rule (width // 64 for
transformers, 32 * width // 64 for the ResNet attention pool) so that an architecture can be
recovered from a state dict's tensor shapes alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class VisionConfig:
    image_size: int = 224
    # int -> ViT depth; 4-tuple -> ModifiedResNet blocks per stage.
    layers: int | tuple[int, int, int, int] = 12
    # ViT: transformer width. ResNet: stem width (the attention pool runs at 32 * width).
    width: int = 768
    # ViT only; None means ModifiedResNet.
    patch_size: int | None = 32
    # FLIP-style patch dropout during training (fraction of patch tokens dropped; ViT only).
    patch_dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if self.is_vit:
            if not isinstance(self.layers, int) or self.layers < 1:
                raise ValueError(f"vision.layers must be a positive int for a ViT, got {self.layers!r}")
            if self.image_size % self.patch_size:
                raise ValueError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
            if self.width % 64 and self.width >= 64:
                raise ValueError(f"vision.width {self.width} must be a multiple of 64 (head width 64)")
        else:
            if not (isinstance(self.layers, tuple) and len(self.layers) == 4):
                raise ValueError(f"vision.layers must be 4 stage depths for a ResNet, got {self.layers!r}")
            if self.image_size % 32:
                raise ValueError(f"vision.image_size {self.image_size} must be a multiple of 32 for a ResNet")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"vision.patch_dropout must be in [0, 1), got {self.patch_dropout}")

    @property
    def is_vit(self) -> bool:
        return self.patch_size is not None

    @property
    def heads(self) -> int:
        return max(1, self.width // 64) if self.is_vit else max(1, self.width * 32 // 64)


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12

    def __post_init__(self) -> None:
        for name in ("context_length", "vocab_size", "width", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"text.{name} must be positive, got {getattr(self, name)}")
        if self.width >= 64 and self.width % 64:
            raise ValueError(f"text.width {self.width} must be a multiple of 64 (head width 64)")

    @property
    def heads(self) -> int:
        return max(1, self.width // 64)


@dataclass
class ClipConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # The MLP activation: "quick_gelu" (x * sigmoid(1.702 x)), as OpenAI's weights were trained, or "gelu"
    # (nn.GELU), as most LAION/DataComp open_clip models were. Loading weights with the other one runs without
    # error and gives wrong embeddings, so every export states it.
    activation: str = "quick_gelu"
    # Initial temperature 0.07 as in the paper; logit_scale stores log(1 / T).
    init_logit_scale: float = 2.659260036932778  # ln(1 / 0.07)
    # SigLIP models carry a learnable bias; None for the softmax (paper) loss.
    init_logit_bias: float | None = None
    # Recompute transformer blocks in backward to save activation memory.
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")

    @property
    def quick_gelu(self) -> bool:
        return self.activation == "quick_gelu"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["vision"]["layers"], tuple):
            d["vision"]["layers"] = list(d["vision"]["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipConfig":
        if "quick_gelu" in d:  # exports written before `activation` recorded it as a bool
            d = {**{k: v for k, v in d.items() if k != "quick_gelu"},
                 "activation": "quick_gelu" if d["quick_gelu"] else "gelu"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ClipConfig keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)


def _cfg(embed: int, image: int, vlayers: Any, vwidth: int, patch: int | None, twidth: int) -> ClipConfig:
    return ClipConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=image, layers=vlayers, width=vwidth, patch_size=patch),
        text=TextConfig(width=twidth, layers=12),
    )


# name -> (embed_dim, image_size, vision layers, vision width, patch size, text width)
_TABLE: dict[str, tuple] = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 512),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 512),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 640),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 768),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 1024),
    "ViT-B/32": (512, 224, 12, 768, 32, 512),
    "ViT-B/16": (512, 224, 12, 768, 16, 512),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768),
}

# Tiny variants for tests and the laptop demo (width 64, 2 layers, 32-64 px images).
_TINY: dict[str, ClipConfig] = {
    "tiny-vit": ClipConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, layers=2, width=64, patch_size=8),
        text=TextConfig(context_length=32, width=64, layers=2),
    ),
    "tiny-rn": ClipConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=8, patch_size=None),
        text=TextConfig(context_length=32, width=64, layers=2),
    ),
    # The demo's model. On the demo's shapes (20 epochs, same data, plain PyTorch) tiny-vit learned colour
    # (98-100% right) but not shape (19-34%: chance is 17%) at 32 or 64 px, patch 8 or 4, text width 64
    # or 128. A ResNet of stem width 8, one block per stage, at 64 px named 54-60% of never-seen colour-shape
    # pairs among all 36 names; width 16, two blocks per stage, at 32 px (about the same compute) 81-84%
    # (docs/experiments.md, issue 16).
    "demo-rn": ClipConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, layers=(2, 2, 2, 2), width=16, patch_size=None),
        text=TextConfig(context_length=32, width=128, layers=2),
    ),
    # A little larger: 4 layers of width 128 in each tower at 64 px.
    "small-vit": ClipConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, layers=4, width=128, patch_size=8),
        text=TextConfig(context_length=32, width=128, layers=4),
    ),
}


def model_names() -> list[str]:
    return list(_TABLE) + list(_TINY)


def get_config(name: str, **overrides: Any) -> ClipConfig:
    """The named architecture; keyword overrides replace top-level fields (e.g. activation="gelu")."""
    if name in _TABLE:
        cfg = _cfg(*_TABLE[name])
    elif name in _TINY:
        cfg = ClipConfig.from_dict(_TINY[name].to_dict())  # a fresh copy
    else:
        raise KeyError(f"unknown model name {name!r}; known: {', '.join(model_names())}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
