"""Contrastive losses with the cross-device gather as a parameter (open_clip's loss.py habit).

With `world_size` > 1 every worker all-gathers the embeddings of the whole global batch *with
gradient* and computes only its own rows of the similarity matrix ("local loss"): logits memory is
O(local x global). What must stay true: averaged over workers (as DDP/DeepSpeed average gradients),
the loss and every gradient equal those of one process holding the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each slice's gradient over workers and returns this worker's.

    Written out rather than using torch.distributed.nn.all_gather because this needs only
    all_gather + all_reduce, which every backend (gloo on CPU, NCCL on GPU) implements.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.local = x.shape[0]
        world = dist.get_world_size(group)
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.cat(out, dim=0)  # world * local, D

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local
        return grad[start:start + ctx.local], None


def gather_features(x: torch.Tensor, world_size: int, group=None) -> torch.Tensor:
    """Concatenate every worker's rows in rank order, keeping the autograd graph to the local rows.

    All workers must pass the same number of rows (use drop_last in the data loader).
    """
    if world_size <= 1:
        return x
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"gather_features: world_size={world_size} but torch.distributed is not initialised")
    return _AllGatherWithGrad.apply(x, group)


class _GatheringLoss(nn.Module):
    """A loss over this worker's rows against the whole global batch (gathered with gradient)."""

    def __init__(self, world_size: int = 1, rank: int = 0, group=None) -> None:
        super().__init__()
        self.world_size = world_size
        self.rank = rank
        self.group = group


class ClipLoss(_GatheringLoss):
    """The paper's symmetric cross-entropy over logit_scale * cosine similarities."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """features: local B, D L2-normalised; logit_scale: exp(log-scale) already applied."""
        n = image_features.shape[0]
        all_img = gather_features(image_features, self.world_size, self.group)  # W*B, D
        all_txt = gather_features(text_features, self.world_size, self.group)
        logits_per_image = logit_scale * image_features @ all_txt.T  # B, W*B: my images vs all texts
        logits_per_text = logit_scale * text_features @ all_img.T  # B, W*B: my texts vs all images
        labels = torch.arange(n, device=image_features.device) + self.rank * n
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(_GatheringLoss):
    """Sigmoid loss (Zhai et al., 2023): every image-text pair is an independent binary label.

    Each worker scores its images against the gathered texts of all workers; the sum over pairs is
    normalised by the local batch so that the mean over workers equals the one-process value.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit_bias (build the model with init_logit_bias, e.g. -10)")
        n = image_features.shape[0]
        all_txt = gather_features(text_features, self.world_size, self.group)  # W*B, D
        logits = logit_scale * image_features @ all_txt.T + logit_bias  # B, W*B
        signs = -torch.ones_like(logits)
        signs[torch.arange(n), torch.arange(n) + self.rank * n] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n


def build_loss(kind: str, world_size: int = 1, rank: int = 0, group=None) -> nn.Module:
    if kind == "clip":
        return ClipLoss(world_size, rank, group)
    if kind == "siglip":
        return SigLipLoss(world_size, rank, group)
    raise ValueError(f"unknown loss {kind!r}; expected 'clip' or 'siglip'")
