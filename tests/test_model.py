import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip_model import (ClipConfig, TextConfig, VisionConfig, build_model, config_from_openai_state_dict,
                        count_parameters, from_openai_state_dict, get_config, model_names)
from clip_model.optim import adamw, clamp_logit_scale_, param_group_names, param_groups

from .reference import openai_model

PAPER_NAMES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
               "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]


def openai_clip(cfg: ClipConfig) -> torch.nn.Module:
    """The same architecture built by OpenAI's own clip/model.py."""
    ref = openai_model()
    v, t = cfg.vision, cfg.text
    return ref.CLIP(cfg.embed_dim, v.image_size, v.layers, v.width, v.patch_size, t.context_length,
                    t.vocab_size, t.width, t.heads, t.layers)


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_named_config_matches_openai_parameter_count(name: str) -> None:
    cfg = get_config(name)
    with torch.device("meta"):  # shapes only: building RN50x64 for real takes seconds
        ours = build_model(cfg)
        theirs = openai_clip(cfg)
    assert count_parameters(ours) == count_parameters(theirs)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
    # Inference from shapes recovers the named config.
    assert config_from_openai_state_dict(theirs_sd) == cfg


def test_all_names_build() -> None:
    assert set(PAPER_NAMES) < set(model_names())
    with pytest.raises(KeyError, match="unknown model name 'ViT-Z/99'"):
        get_config("ViT-Z/99")


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn", "demo-rn", "small-vit"])
def test_tiny_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    cfg = get_config(name)
    model = build_model(cfg)
    images = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(1, 1000, (4, cfg.text.context_length))
    tokens[:, 5] = cfg.text.vocab_size - 1  # EOT
    img, txt, scale = model(images, tokens)
    assert img.shape == txt.shape == (4, cfg.embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    loss = (scale * img @ txt.T).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]


def test_text_features_read_at_eot_and_causal() -> None:
    torch.manual_seed(0)
    model = build_model(get_config("tiny-vit")).eval()
    eot = model.config.text.vocab_size - 1
    a = torch.zeros(1, 32, dtype=torch.long)
    a[0, :4] = torch.tensor([49406, 10, 20, eot])
    b = a.clone()
    b[0, 10] = 77  # after EOT: invisible to the EOT position under the causal mask
    c = a.clone()
    c[0, 1] = 11  # before EOT: changes the features
    with torch.no_grad():
        fa, fb, fc = model.encode_text(a), model.encode_text(b), model.encode_text(c)
    assert torch.allclose(fa, fb, atol=1e-6)
    assert not torch.allclose(fa, fc, atol=1e-3)


def test_state_dict_round_trip_and_inference() -> None:
    torch.manual_seed(0)
    for name in ("tiny-vit", "tiny-rn"):
        model = build_model(get_config(name)).eval()
        sd = model.state_dict()
        again = from_openai_state_dict(sd).eval()
        assert again.config == model.config
        for k, v in again.state_dict().items():
            assert torch.equal(v, sd[k]), k
        x = torch.randn(2, 3, model.image_size, model.image_size)
        with torch.no_grad():
            assert torch.equal(model.encode_image(x), again.encode_image(x))


def test_bad_state_dict_names_keys() -> None:
    sd = build_model(get_config("tiny-vit")).state_dict()
    broken = dict(sd)
    del broken["visual.ln_post.weight"]
    broken["visual.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['visual.ln_post.weight'\].*unexpected keys \['visual.extra'\]"):
        from_openai_state_dict(broken)
    bad_shape = dict(sd)
    bad_shape["visual.ln_pre.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"mismatched shapes \['visual.ln_pre.bias: expected \(64,\), got \(3,\)'\]"):
        from_openai_state_dict(bad_shape)
    with pytest.raises(ValueError, match="missing keys \\['text_projection'\\]"):
        from_openai_state_dict({k: v for k, v in sd.items() if k != "text_projection"})


# A model small enough to run fast but with several heads in every attention, so head splitting is
# checked against the reference (heads = width // 64, ResNet pool heads = 32 * width // 64).
PARITY_CONFIGS = {
    "vit": ClipConfig(embed_dim=96, vision=VisionConfig(image_size=64, layers=2, width=128, patch_size=16),
                      text=TextConfig(context_length=77, vocab_size=49408, width=128, layers=2)),
    "rn": ClipConfig(embed_dim=96, vision=VisionConfig(image_size=64, layers=(1, 2, 1, 1), width=16, patch_size=None),
                     text=TextConfig(context_length=77, vocab_size=49408, width=128, layers=2)),
}


@pytest.mark.parametrize("kind", sorted(PARITY_CONFIGS))
def test_openai_state_dict_reproduces_reference_embeddings(kind: str) -> None:
    """Weights initialised by OpenAI's implementation, loaded through our shape inference."""
    torch.manual_seed(1)
    ref = openai_clip(PARITY_CONFIGS[kind]).float().eval()
    # Random BN statistics so that eval-mode batch norm is exercised, not the identity.
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    ours = from_openai_state_dict(ref.state_dict()).eval()
    assert ours.config == PARITY_CONFIGS[kind]
    images = torch.randn(3, 3, 64, 64)
    tokens = torch.zeros(3, 77, dtype=torch.long)
    for i, n in enumerate((5, 40, 77)):
        tokens[i, :n] = torch.randint(1, 49000, (n,))
        tokens[i, 0] = 49406
        tokens[i, n - 1] = 49407
    with torch.no_grad():
        for a, b in ((ours.encode_image(images), ref.encode_image(images)),
                     (ours.encode_text(tokens), ref.encode_text(tokens))):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (a - b).abs().max()
        ours_logits = ours.logit_scale.exp() * torch.nn.functional.normalize(ours.encode_image(images), dim=-1) \
            @ torch.nn.functional.normalize(ours.encode_text(tokens), dim=-1).T
        ref_logits, _ = ref(images, tokens)
        assert torch.allclose(ours_logits, ref_logits, atol=1e-4)
    # Export goes back into the reference unchanged (strict load).
    ref2 = openai_clip(PARITY_CONFIGS[kind]).float()
    ref2.load_state_dict(ours.state_dict(), strict=True)


def test_openai_jit_meta_keys_and_fp16_are_accepted() -> None:
    sd = {k: v.half() for k, v in build_model(get_config("tiny-vit")).state_dict().items()}
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(32), vocab_size=torch.tensor(49408))
    model = from_openai_state_dict(sd)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_quick_gelu_configurable_changes_outputs() -> None:
    torch.manual_seed(0)
    sd = build_model(get_config("tiny-vit")).state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = from_openai_state_dict(sd, quick_gelu=True).eval().encode_image(x)
        b = from_openai_state_dict(sd, quick_gelu=False).eval().encode_image(x)
    assert not torch.allclose(a, b, atol=1e-4)


def test_patch_dropout_and_grad_checkpointing() -> None:
    torch.manual_seed(0)
    cfg = get_config("tiny-vit")
    cfg.vision.patch_dropout = 0.5
    model = build_model(cfg)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    a, b = model.encode_image(x), model.encode_image(x)
    assert not torch.allclose(a, b)  # different random patch subsets
    model.eval()
    assert torch.allclose(model.encode_image(x), model.encode_image(x))  # dropout off in eval
    # Gradient checkpointing recomputes blocks but gives the same gradients.
    torch.manual_seed(0)
    plain = build_model(get_config("tiny-vit"))
    ck = build_model(get_config("tiny-vit"))
    ck.load_state_dict(plain.state_dict())
    ck.set_grad_checkpointing(True)
    tokens = torch.randint(1, 100, (2, 32))
    for m in (plain, ck):
        img, txt, s = m(x, tokens)
        (s * img @ txt.T).sum().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ck.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_param_groups_follow_paper() -> None:
    model = build_model(get_config("tiny-rn"))
    names = param_group_names(model)
    assert "logit_scale" in names["no_decay"]
    assert "ln_final.weight" in names["no_decay"] and "ln_final.bias" in names["no_decay"]
    assert "visual.bn1.weight" in names["no_decay"]
    assert "transformer.resblocks.0.attn.in_proj_bias" in names["no_decay"]
    assert "transformer.resblocks.0.attn.in_proj_weight" in names["decay"]
    assert "visual.conv1.weight" in names["decay"] and "text_projection" in names["decay"]
    groups = param_groups(model, weight_decay=0.2)
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # The clamp keeps the scale at or below 100, in the parameter and in the forward value.
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    assert model.logit_scale_value().item() == pytest.approx(100.0)
    clamp_logit_scale_(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_adamw_is_fused_and_matches_the_per_tensor_update() -> None:
    """The training optimizer: the paper's groups, torch's fused kernel on CPU, and after a few steps the
    same weights as torch's reference (per-tensor) AdamW to float rounding."""
    torch.manual_seed(0)
    ours, ref = build_model(get_config("tiny-vit")), build_model(get_config("tiny-vit"))
    ref.load_state_dict(ours.state_dict())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    # A large decay, so a group that lost it would differ by far more than the tolerance below.
    opt = adamw(ours, lr=1e-3, weight_decay=5.0, betas=(0.9, 0.98), eps=1e-6)
    ref_opt = torch.optim.AdamW(param_groups(ref, 5.0), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    assert opt.defaults["fused"] is True and [g["weight_decay"] for g in opt.param_groups] == [5.0, 0.0]
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 100, (4, 16))
    for _ in range(3):
        for model, o in ((ours, opt), (ref, ref_opt)):
            img, txt, scale = model(images, tokens)
            o.zero_grad()
            (img @ txt.T * scale).logsumexp(1).mean().backward()
            o.step()
    # Compared as updates, per tensor: elements whose gradient is ~0 (an attention key bias) take Adam's
    # full-size step in a direction set by rounding, in either kernel, so elementwise checks would test noise.
    for name, a in ours.state_dict().items():
        mine, theirs = a - before[name], ref.state_dict()[name] - before[name]
        assert theirs.norm() > 0, name
        assert (mine - theirs).norm() <= 1e-2 * theirs.norm(), (name, float((mine - theirs).norm() / theirs.norm()))


_NO_DYNAMO_CHILD = r"""
import sys, torch
from clip_model import build_model, get_config
from clip_model.optim import adamw, param_groups
torch.set_num_threads(1)

def train(make_opt):
    torch.manual_seed(0)
    model = build_model(get_config("tiny-vit"))
    opt = make_opt(model)
    steps = []
    opt.register_step_post_hook(lambda o, args, kwargs: steps.append(1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 100, (4, 16))
    for _ in range(3):
        img, txt, scale = model(images, tokens)
        opt.zero_grad()
        (img @ txt.T * scale).logsumexp(1).mean().backward()
        opt.step()
        sched.step()
    again = make_opt(model)
    again.load_state_dict(opt.state_dict())
    return model.state_dict(), again.state_dict(), len(steps)

ours = train(lambda m: adamw(m, 1e-3, 0.2))
loaded = "torch._dynamo" in sys.modules
ref = train(lambda m: torch.optim.AdamW(param_groups(m, 0.2), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=True))
assert "torch._dynamo" in sys.modules  # torch's own optimizer imports it: the check above can fail
after = train(lambda m: adamw(m, 1e-3, 0.2))  # with Dynamo imported: torch's methods as they are
same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
same_opt = lambda a, b: a["param_groups"] == b["param_groups"] and all(
    same(a["state"][i], b["state"][i]) for i in a["state"])
print(loaded, same(ours[0], ref[0]), same_opt(ours[1], ref[1]), same(after[0], ref[0]), ours[2], ref[2], after[2])
"""


def test_adamw_trains_like_torch_without_importing_dynamo() -> None:
    """A process that trains with our AdamW (steps, zero_grad, an LR scheduler, a state-dict round trip) does
    not import TorchDynamo, and ends with the same weights and optimizer state, bit for bit, as torch's fused
    AdamW, its step hooks called once a step; once Dynamo is imported, the same again through torch's methods.
    A fresh process: this one may have imported Dynamo already."""
    r = subprocess.run([sys.executable, "-c", _NO_DYNAMO_CHILD], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["False", "True", "True", "True", "3", "3", "3"], r.stdout


def test_real_size_vit_b32_forward_shapes() -> None:
    model = build_model(get_config("ViT-B/32")).eval()
    with torch.no_grad():
        img = model.encode_image(torch.randn(1, 3, 224, 224))
        txt = model.encode_text(torch.randint(0, 49408, (1, 77)))
    assert img.shape == txt.shape == (1, 512)
