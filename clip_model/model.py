"""CLIP: an image tower and a causal text Transformer joined by linear projections.

The text tower lives on the CLIP module itself (not in a submodule) because that is OpenAI's
state-dict layout: `token_embedding`, `positional_embedding`, `transformer.resblocks.*`,
`ln_final`, `text_projection`, `logit_scale`, `visual.*`. Keeping that layout makes the model load
OpenAI's and open_clip's checkpoints with no key mapping, and export the same.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClipConfig, TextConfig, VisionConfig
from .transformer import LayerNorm, Transformer
from .vision import ModifiedResNet, VisionTransformer, build_vision

# Extra entries in OpenAI's JIT archives' state dicts that are not parameters.
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
LOGIT_SCALE_MAX = math.log(100.0)  # the paper clips the inverse temperature at 100


class CLIP(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.config = cfg
        self.visual = build_vision(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        t = cfg.text
        self.context_length = t.context_length
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, cfg.quick_gelu)
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
        else:
            self.logit_bias = None
        self._init_weights()
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def _init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
        if isinstance(self.visual, ModifiedResNet):
            self.visual.init_weights()
        else:
            self.visual.transformer.init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: B, 3, S, S normalised -> B, embed_dim (not normalised)."""
        return self.visual(images.to(self.text_projection.dtype))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: B, context_length ids -> B, embed_dim (not normalised), read at the EOT token."""
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"token ids have length {tokens.shape[1]} > context_length {self.context_length}")
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # B, L, C
        x = self.transformer(x, causal=True)
        x = self.ln_final(x)
        # EOT has the largest id in CLIP's vocabulary, so argmax finds it.
        eot = tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def logit_scale_value(self) -> torch.Tensor:
        """exp(logit_scale), clipped at 100 as in the paper (also if the parameter drifted above)."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns L2-normalised image and text features and the logit scale, the loss's inputs."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        return img, txt, self.logit_scale_value()


def build_model(cfg: ClipConfig) -> CLIP:
    return CLIP(cfg)


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _require(sd: Mapping[str, torch.Tensor], keys: list[str]) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"state dict is not in OpenAI's CLIP layout: missing keys {missing}")


def config_from_openai_state_dict(sd: Mapping[str, torch.Tensor], quick_gelu: bool = True) -> ClipConfig:
    """Infer the architecture from tensor shapes, as OpenAI's `build_model` does."""
    _require(sd, ["text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight",
                  "logit_scale"])
    if "visual.proj" in sd:
        _require(sd, ["visual.conv1.weight", "visual.positional_embedding"])
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(image_size=patch * grid, layers=_count_blocks(sd, "visual.transformer.resblocks."),
                              width=width, patch_size=patch)
    elif "visual.attnpool.positional_embedding" in sd:
        _require(sd, ["visual.layer1.0.conv1.weight"])
        layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in (1, 2, 3, 4))
        spatial = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(image_size=spatial * 32, layers=layers,
                              width=sd["visual.layer1.0.conv1.weight"].shape[0], patch_size=None)
    else:
        raise ValueError("state dict has neither a ViT ('visual.proj') nor a ModifiedResNet "
                         "('visual.attnpool.positional_embedding') image tower")
    text = TextConfig(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=sd["ln_final.weight"].shape[0],
        layers=_count_blocks(sd, "transformer.resblocks."),
    )
    bias = float(sd["logit_bias"]) if "logit_bias" in sd else None
    return ClipConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text,
                      activation="quick_gelu" if quick_gelu else "gelu", init_logit_bias=bias)


def from_openai_state_dict(state_dict: Mapping[str, torch.Tensor], quick_gelu: bool = True,
                           config: ClipConfig | None = None) -> CLIP:
    """Build a float32 CLIP from a state dict in OpenAI's key layout (OpenAI or open_clip weights).

    The architecture is inferred from shapes unless `config` is given. Any missing, unexpected or
    mis-shaped key is an error that lists them.
    """
    sd = {k: v for k, v in state_dict.items() if k not in _OPENAI_META_KEYS}
    cfg = config or config_from_openai_state_dict(sd, quick_gelu=quick_gelu)
    model = CLIP(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(f"{k}: expected {tuple(expected[k].shape)}, got {tuple(sd[k].shape)}"
                        for k in set(expected) & set(sd) if expected[k].shape != sd[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        if mismatched:
            parts.append(f"mismatched shapes {mismatched[:20]}")
        raise ValueError("state dict does not fit CLIP " + repr(cfg.vision) + ": " + "; ".join(parts))
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.float()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
