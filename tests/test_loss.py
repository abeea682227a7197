import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip_model.loss import ClipLoss, SigLipLoss, build_loss
from pipelines.core.ports import free_port

GLOBAL_BATCH, D_IN, D = 8, 12, 6


def _problem(seed: int = 0):
    """A tiny 'two tower' model: linear maps whose gradients the test compares."""
    g = torch.Generator().manual_seed(seed)
    x_img = torch.randn(GLOBAL_BATCH, D_IN, generator=g)
    x_txt = torch.randn(GLOBAL_BATCH, D_IN, generator=g)
    w_img = torch.randn(D_IN, D, generator=g)
    w_txt = torch.randn(D_IN, D, generator=g)
    return x_img, x_txt, w_img, w_txt


def _loss_and_grads(kind: str, rows: slice, world: int, rank: int):
    x_img, x_txt, w_img, w_txt = _problem()
    w_img.requires_grad_(True)
    w_txt.requires_grad_(True)
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    img = F.normalize(x_img[rows] @ w_img, dim=-1)
    txt = F.normalize(x_txt[rows] @ w_txt, dim=-1)
    loss = build_loss(kind, world_size=world, rank=rank)(img, txt, scale.exp(), bias)
    loss.backward()
    return [loss.detach(), w_img.grad, w_txt.grad, scale.grad, bias.grad if kind == "siglip" else torch.zeros(())]


def _worker(rank: int, world: int, port: int, kind: str, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    n = GLOBAL_BATCH // world
    values = _loss_and_grads(kind, slice(rank * n, (rank + 1) * n), world, rank)
    # DDP / DeepSpeed average gradients over data-parallel workers; do the same here.
    for v in values:
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
        v /= world
    if rank == 0:
        torch.save(values, out_path)
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_gloo_workers_match_one_process(kind: str, tmp_path) -> None:
    single = _loss_and_grads(kind, slice(None), world=1, rank=0)
    out = str(tmp_path / "dist.pt")
    mp.start_processes(_worker, args=(2, free_port(), kind, out), nprocs=2, join=True, start_method="spawn")
    dist_values = torch.load(out)
    for name, a, b in zip(["loss", "w_img", "w_txt", "logit_scale", "logit_bias"], single, dist_values):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (name, a, b)
    assert single[1].abs().sum() > 0  # the comparison is not between zeros


def test_clip_loss_matches_paper_pseudocode() -> None:
    """Figure 3 of the paper: logits = I_e @ T_e.T * exp(t); CE over rows and columns, averaged."""
    torch.manual_seed(0)
    img = F.normalize(torch.randn(5, 4), dim=-1)
    txt = F.normalize(torch.randn(5, 4), dim=-1)
    t = torch.tensor(2.0)
    logits = img @ txt.T * t.exp()
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(ClipLoss()(img, txt, t.exp()), expected)
    # Perfectly aligned pairs with a high scale give a near-zero loss.
    assert ClipLoss()(img, img, torch.tensor(100.0)) < ClipLoss()(img, txt, torch.tensor(100.0))


def test_siglip_loss_reference_and_errors() -> None:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 3), dim=-1)
    txt = F.normalize(torch.randn(4, 3), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(4) - 1
    expected = -F.logsigmoid(labels * logits).sum() / 4
    assert torch.allclose(SigLipLoss()(img, txt, scale, bias), expected)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(img, txt, scale, None)
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        build_loss("triplet")
    with pytest.raises(RuntimeError, match="not initialised"):
        ClipLoss(world_size=2)(img, txt, scale)
