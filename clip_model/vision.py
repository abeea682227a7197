"""The image towers: ViT (with CLIP's extra ln_pre) and ModifiedResNet (paper section 2.4).

Module and parameter names follow OpenAI's `clip/model.py` so that `visual.*` keys load as they are.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .transformer import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int, quick_gelu: bool = True) -> None:
        super().__init__()
        assert cfg.patch_size is not None and isinstance(cfg.layers, int)
        width, patch = cfg.width, cfg.patch_size
        self.image_size = cfg.image_size
        self.grid = cfg.image_size // patch
        self.patch_dropout = cfg.patch_dropout
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, width))
        # CLIP's one change to ViT: a layer norm on the combined patch + position embeddings.
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """FLIP: train on a random subset of patch tokens; the class token always stays."""
        B, N, C = x.shape  # N = 1 + patches
        keep = max(1, int((N - 1) * (1.0 - self.patch_dropout)))
        idx = torch.rand(B, N - 1, device=x.device).argsort(dim=1)[:, :keep] + 1  # B, keep
        patches = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))
        return torch.cat([x[:, :1], patches], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)  # B, C, grid, grid
        x = x.flatten(2).transpose(1, 2)  # B, grid**2, C
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # B, 1 + grid**2, C
        if self.training and self.patch_dropout > 0:
            x = self._drop_patches(x)
        x = self.ln_pre(x)
        x = self.transformer(x)
        x = self.ln_post(x[:, 0, :])  # class token
        return x @ self.proj


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # All convs have stride 1; an avgpool before the third conv does the downsampling
        # (the paper's anti-aliased "ResNet-D"-style striding).
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Global average pooling replaced by one layer of QKV attention whose query is the mean token."""

    def __init__(self, spatial: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # B, HW, C
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # B, 1 + HW, C
        x = x + self.positional_embedding.to(x.dtype)
        B, L, C = x.shape
        H = self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, H, C // H).transpose(1, 2)  # B, H, 1, C/H
        k = self.k_proj(x).view(B, L, H, C // H).transpose(1, 2)  # B, H, L, C/H
        v = self.v_proj(x).view(B, L, H, C // H).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # B, H, 1, C/H
        return self.c_proj(out.transpose(1, 2).reshape(B, C))


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        assert isinstance(cfg.layers, tuple)
        width = cfg.width
        self.image_size = cfg.image_size
        # Three-convolution stem with an average pool instead of a max pool.
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, cfg.layers[0])
        self.layer2 = self._make_layer(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, cfg.layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        """OpenAI's initialisation: zero-init the last BN of each block so blocks start as identity."""
        std = self.attnpool.c_proj.in_features ** -0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for name, param in stage.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.conv1.weight.dtype)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))  # B, width, S/4, S/4
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # B, 32 * width, S/32, S/32
        return self.attnpool(x)


def build_vision(cfg: VisionConfig, output_dim: int, quick_gelu: bool = True) -> nn.Module:
    return VisionTransformer(cfg, output_dim, quick_gelu) if cfg.is_vit else ModifiedResNet(cfg, output_dim)
