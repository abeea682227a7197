"""Weights in and out: every checkpoint format clip_model.formats loads, each written by the test itself from a
small random model (and read back from s3:// through pipelines.core.checkpoints), and the Hugging Face export
checked against `transformers` itself.

References are independent of our model code: OpenAI's clip/model.py (tests/reference.py) for OpenAI and
open_clip layouts (open_clip's CLIP has OpenAI's keys), with its QuickGELU swapped for nn.GELU for the GELU
models open_clip trains; transformers' CLIPModel for the HF directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from clip_model import build_model, get_config
from clip_model.export import load_export, main as export_main, save_export
from clip_model.formats import load_checkpoint, openai_tokenizer, weight_files
from clip_model.hf import save_hf
from pipelines.core.checkpoints import local_checkpoint
from pipelines.core.storage import Storage

from .readme import readme_block, readme_commands
from .reference import openai_model

CTX = 32  # tiny-vit's context length
CAPTIONS = ["a photo of a cat", "two dogs!", "Hello World, it's a DIAGRAM of 3 shapes"]


def _reference(activation: str, seed: int = 0) -> nn.Module:
    """OpenAI's CLIP at tiny-vit's size (ViT 32 px, patch 8, width 64, 2 layers; text width 64, 2 layers)."""
    torch.manual_seed(seed)
    model = openai_model().CLIP(64, 32, 2, 64, 8, CTX, 49408, 64, 1, 2).eval()
    if activation == "gelu":  # what open_clip builds for models without quick_gelu in their config
        for block in [*model.transformer.resblocks, *model.visual.transformer.resblocks]:
            block.mlp.gelu = nn.GELU()
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g), openai_tokenizer(CTX)(CAPTIONS)


def _max_diff(ours: nn.Module, ref: nn.Module) -> float:
    images, tokens = _inputs()
    with torch.no_grad():
        return max((ours.encode_image(images) - ref.encode_image(images)).abs().max().item(),
                   (ours.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item())


def _open_clip_epoch(path: Path, sd: dict[str, torch.Tensor]) -> None:
    """open_clip's training checkpoint: {"epoch", "name", "state_dict" (DDP's module. prefix), "optimizer"}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "name": "run1", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}}, str(path))


def _open_clip_hub(directory: Path, sd: dict[str, torch.Tensor],
                   weights: tuple[str, ...] = ("open_clip_model.safetensors",)) -> Path:
    """open_clip's hub directory: open_clip_config.json (no quick_gelu in model_cfg: GELU) and the weights."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for name in weights:
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / name))
        else:
            torch.save(sd, str(directory / name))
    (directory / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": 64, "vision_cfg": {"image_size": 32}}, "preprocess_cfg": {}}))
    return directory


def _upload(st: Storage, local: Path, prefix: str) -> str:
    """Every file under `local` to `prefix` (relative paths kept); the prefix's s3:// URI."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        st.write_bytes(f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())
    return st.uri(prefix)


@pytest.fixture(scope="module")
def gelu_ref() -> nn.Module:
    return _reference("gelu")


def test_openai_torchscript_archive(tmp_path) -> None:
    """OpenAI's released .pt files are TorchScript: torch.load(weights_only=True) refuses them; we read them."""
    ref = _reference("quick_gelu")
    for name, value in (("input_resolution", 32), ("context_length", CTX), ("vocab_size", 49408)):
        if hasattr(ref, name):  # OpenAI's archives carry these three as state-dict entries
            delattr(ref, name)
        ref.register_buffer(name, torch.tensor(value))
    images, tokens = _inputs()
    path = str(tmp_path / "ViT-T-8.pt")
    torch.jit.trace(ref, (images, tokens)).save(path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)
    assert (loaded.origin, loaded.activation) == ("openai", "quick_gelu")
    assert _max_diff(loaded.model, ref) < 1e-5
    with pytest.raises(ValueError, match="OpenAI's models all use activation 'quick_gelu'"):
        load_checkpoint(path, activation="gelu")


def test_open_clip_epoch_checkpoint(tmp_path, gelu_ref) -> None:
    """open_clip's training checkpoint: {"epoch", "name", "state_dict" (DDP's module. prefix), "optimizer"}."""
    run = tmp_path / "logs" / "run1"
    _open_clip_epoch(run / "checkpoints" / "epoch_3.pt", gelu_ref.state_dict())
    path = str(run / "checkpoints" / "epoch_3.pt")
    with pytest.raises(ValueError, match="does not say which activation.*activation=gelu"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, activation="gelu")
    assert (loaded.origin, loaded.activation) == ("open_clip", "gelu")
    assert _max_diff(loaded.model, gelu_ref) < 1e-5
    # The silent failure this guards against: the other activation loads fine and is wrong.
    assert _max_diff(load_checkpoint(path, activation="quick_gelu").model, gelu_ref) > 1e-3
    # With the run's params.txt beside checkpoints/, the model name tells: ViT-B-32 trains with nn.GELU.
    (run / "params.txt").write_text("batch_size: 256\nforce_quick_gelu: False\nmodel: ViT-B-32\n")
    assert load_checkpoint(path).activation == "gelu"
    (run / "params.txt").write_text("force_quick_gelu: False\nmodel: ViT-B-32-quickgelu\n")
    assert load_checkpoint(path).activation == "quick_gelu"


def test_open_clip_hub_files(tmp_path, gelu_ref) -> None:
    """open_clip_pytorch_model.bin / open_clip_model.safetensors, alone or beside open_clip_config.json."""
    from safetensors.torch import save_file

    sd = gelu_ref.state_dict()
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(bare / "weights.safetensors"))
    torch.save(sd, str(bare / "open_clip_pytorch_model.bin"))
    for name in ("weights.safetensors", "open_clip_pytorch_model.bin"):
        with pytest.raises(ValueError, match="does not say which activation"):
            load_checkpoint(str(bare / name))
        assert _max_diff(load_checkpoint(str(bare / name), activation="gelu").model, gelu_ref) < 1e-5
    hub = _open_clip_hub(tmp_path / "hub", sd)
    for path in (str(hub), str(hub / "open_clip_model.safetensors")):
        loaded = load_checkpoint(path)
        assert (loaded.origin, loaded.activation) == ("open_clip", "gelu")
        assert _max_diff(loaded.model, gelu_ref) < 1e-5
    assert weight_files(str(hub)) == [str(hub / "open_clip_model.safetensors")]
    with pytest.raises(ValueError, match="says activation 'gelu', but activation='quick_gelu'"):
        load_checkpoint(str(hub), activation="quick_gelu")


def test_our_export_records_activation(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(get_config("tiny-vit", activation="gelu")).eval()
    save_export(model, str(tmp_path / "gelu"), openai_tokenizer(CTX))
    assert json.loads((tmp_path / "gelu" / "config.json").read_text())["activation"] == "gelu"
    loaded = load_checkpoint(str(tmp_path / "gelu"))
    assert (loaded.origin, loaded.activation) == ("export", "gelu")
    assert _max_diff(loaded.model, model) == 0.0
    # An export written before the activation was a string says quick_gelu: true.
    cfg = json.loads((tmp_path / "gelu" / "config.json").read_text())
    del cfg["activation"]
    (tmp_path / "gelu" / "config.json").write_text(json.dumps({**cfg, "quick_gelu": True}))
    assert load_checkpoint(str(tmp_path / "gelu")).activation == "quick_gelu"
    # A bare state dict says nothing: the caller must.
    torch.save(model.state_dict(), str(tmp_path / "bare.pt"))
    with pytest.raises(ValueError, match="set activation=quick_gelu .* or activation=gelu"):
        load_export(str(tmp_path / "bare.pt"))
    assert _max_diff(load_export(str(tmp_path / "bare.pt"), activation="gelu")[0], model) == 0.0
    with pytest.raises(ValueError, match="activation must be one of"):
        load_checkpoint(str(tmp_path / "bare.pt"), activation="relu")


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_hf_export_equals_transformers(tmp_path, activation: str) -> None:
    """Our model written as a CLIPModel directory: transformers loads it and embeds as we do (fp32, 1e-5); its
    CLIPTokenizer gives our ids, CLIPProcessor our pixels; and the directory loads back into our model."""
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    model = build_model(get_config("tiny-vit", activation=activation)).eval()
    tok = openai_tokenizer(CTX)
    save_hf(model, str(tmp_path / "hf"), tok)
    hf = CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.text_config.hidden_act == activation
    images, tokens = _inputs()
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=images)
        txt = hf.get_text_features(input_ids=tokens)
        img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)  # transformers 5 vs 4
        assert torch.allclose(img, model.encode_image(images), atol=1e-5, rtol=0)
        assert torch.allclose(txt, model.encode_text(tokens), atol=1e-5, rtol=0)
    hf_ids = CLIPTokenizer.from_pretrained(str(tmp_path / "hf"))(CAPTIONS).input_ids
    assert hf_ids == [[i for i in row if i] for row in tokens.tolist()]
    from PIL import Image
    import numpy as np

    from clip_model.transforms import EvalTransform

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    pixels = CLIPProcessor.from_pretrained(str(tmp_path / "hf"))(images=picture, return_tensors="pt").pixel_values
    assert torch.allclose(pixels[0], EvalTransform(32)(picture), atol=1e-5)
    ns = {"image": picture}  # the README's transformers snippet, as written (the directory aside)
    exec(readme_block("transformers").replace('"out/hf"', repr(str(tmp_path / "hf"))), ns)
    assert ns["outputs"].logits_per_image.shape == (1, 1)
    back = load_checkpoint(str(tmp_path / "hf"))
    assert (back.origin, back.activation) == ("hf", activation)
    assert _max_diff(back.model, model) == 0.0
    assert torch.equal(back.tokenizer(CAPTIONS), tokens)


def test_s3_checkpoint_directories(tmp_path, s3_storage, monkeypatch) -> None:
    """A Hugging Face CLIPModel directory and our export, each uploaded as an s3:// prefix: local_checkpoint copies
    what the loader reads and it embeds (and tokenizes) as the local directory does."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the downloads land here, not in /tmp
    torch.manual_seed(0)
    model = build_model(get_config("tiny-vit", activation="gelu")).eval()
    save_hf(model, str(tmp_path / "hf"), openai_tokenizer(CTX))
    save_export(model, str(tmp_path / "export"), openai_tokenizer(CTX))
    # What a mirrored Hub repository also holds: other frameworks' weights, a sub-directory; neither is read.
    (tmp_path / "hf" / "tf_model.h5").write_bytes(b"not read")
    (tmp_path / "hf" / "onnx").mkdir()
    (tmp_path / "hf" / "onnx" / "model.onnx").write_bytes(b"not read")
    for name, origin in (("hf", "hf"), ("export", "export")):
        uri = _upload(s3_storage, tmp_path / name, name)
        local = local_checkpoint(uri + "/", s3_storage.options)  # a trailing / names the same prefix
        assert local != str(tmp_path / name) and os.path.isdir(local)
        if name == "hf":
            assert sorted(os.listdir(local)) == sorted(n for n in os.listdir(tmp_path / "hf") if n not in
                                                       ("tf_model.h5", "onnx"))
        ours, theirs = load_checkpoint(local), load_checkpoint(str(tmp_path / name))
        assert (ours.origin, ours.activation) == (origin, "gelu")
        assert _max_diff(ours.model, theirs.model) < 1e-5
        assert torch.equal(ours.tokenizer(CAPTIONS), theirs.tokenizer(CAPTIONS))
        assert [os.path.basename(f) for f in weight_files(local)] == [os.path.basename(f) for f in
                                                                      weight_files(str(tmp_path / name))]


def test_s3_open_clip_checkpoints(tmp_path, s3_storage, gelu_ref, monkeypatch) -> None:
    """open_clip on s3://: a hub directory (both weight files: the safetensors one is read, the .bin not copied);
    open_clip_pytorch_model.bin and epoch_N.pt named as files, with the sidecars that give their activation."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the downloads land here, not in /tmp
    sd = gelu_ref.state_dict()
    hub = _open_clip_hub(tmp_path / "hub", sd, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    local = local_checkpoint(_upload(s3_storage, hub, "hub"), s3_storage.options)
    assert sorted(os.listdir(local)) == ["open_clip_config.json", "open_clip_model.safetensors"]
    loaded = load_checkpoint(local)
    assert (loaded.origin, loaded.activation) == ("open_clip", "gelu")
    assert _max_diff(loaded.model, load_checkpoint(str(hub)).model) < 1e-5
    assert _max_diff(loaded.model, gelu_ref) < 1e-5
    # A weights file named alone: open_clip_config.json beside it comes along, as the loader reads it locally.
    path = local_checkpoint(s3_storage.uri("hub/open_clip_pytorch_model.bin"), s3_storage.options)
    assert os.path.basename(path) == "open_clip_pytorch_model.bin"
    loaded = load_checkpoint(path)
    assert (loaded.origin, loaded.activation) == ("open_clip", "gelu")
    assert _max_diff(loaded.model, load_checkpoint(str(hub / "open_clip_pytorch_model.bin")).model) < 1e-5
    # epoch_N.pt: its run's params.txt (two levels up) says the activation; without it the caller must.
    _open_clip_epoch(tmp_path / "logs" / "run1" / "checkpoints" / "epoch_3.pt", sd)
    (tmp_path / "logs" / "run1" / "params.txt").write_text("force_quick_gelu: False\nmodel: ViT-B-32\n")
    _upload(s3_storage, tmp_path / "logs", "logs")
    path = local_checkpoint(s3_storage.uri("logs/run1/checkpoints/epoch_3.pt"), s3_storage.options)
    loaded = load_checkpoint(path)
    assert (loaded.origin, loaded.activation) == ("open_clip", "gelu") and _max_diff(loaded.model, gelu_ref) < 1e-5
    s3_storage.delete("logs/run1/params.txt")
    path = local_checkpoint(s3_storage.uri("logs/run1/checkpoints/epoch_3.pt"), s3_storage.options)
    with pytest.raises(ValueError, match="does not say which activation"):
        load_checkpoint(path)
    assert _max_diff(load_checkpoint(path, activation="gelu").model, gelu_ref) < 1e-5


def test_s3_checkpoint_refusals(s3_storage) -> None:
    """Prefixes that hold no checkpoint fail at once, in one line, before anything is downloaded."""
    opts = s3_storage.options
    with pytest.raises(FileNotFoundError, match="no such object and no objects directly under that prefix$"):
        local_checkpoint(s3_storage.uri("nothing"), opts)
    s3_storage.write_bytes("runs/a/model.pt", b"x")
    with pytest.raises(FileNotFoundError, match=r"only sub-prefixes: a/\)"):
        local_checkpoint(s3_storage.uri("runs"), opts)
    s3_storage.write_bytes("crawl/part-00000.parquet", b"x")
    with pytest.raises(ValueError, match="include none of model.pt, config.json, open_clip_config.json: not a "):
        local_checkpoint(s3_storage.uri("crawl"), opts)


def test_convert_command(tmp_path, gelu_ref, capsys) -> None:
    """`python -m clip_model.export SRC DEST`: an open_clip file to a HF directory, and the clear errors."""
    torch.save(gelu_ref.state_dict(), str(tmp_path / "weights.pt"))
    assert export_main([str(tmp_path / "weights.pt"), str(tmp_path / "hf")]) == 2
    assert "does not say which activation" in capsys.readouterr().err
    assert export_main([str(tmp_path / "weights.pt"), str(tmp_path / "hf"), "--activation", "gelu"]) == 0
    assert _max_diff(load_checkpoint(str(tmp_path / "hf")).model, gelu_ref) < 1e-5
    assert export_main([str(tmp_path / "hf"), str(tmp_path / "ours"), "--to", "export"]) == 0
    assert load_checkpoint(str(tmp_path / "ours")).activation == "gelu"
    rn = build_model(get_config("tiny-rn"))
    save_export(rn, str(tmp_path / "rn"), openai_tokenizer(CTX))
    assert export_main([str(tmp_path / "rn"), str(tmp_path / "rn_hf")]) == 2
    assert "only a ViT image tower" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "rn_hf")


def test_readme_weights_commands(tmp_path, gelu_ref, monkeypatch) -> None:
    """The README's weight commands on files of those names: evaluate's checkpoint + activation keys load the
    open_clip checkpoint through evaluate's own loader, and the two conversions run as written."""
    from pipelines.core.config import load_config
    from pipelines.core.embedding import ImageEmbedder
    from pipelines.evaluate.stage import EvalConfig, fingerprint_of

    monkeypatch.chdir(tmp_path)  # the README's relative paths, made here
    threads = torch.get_num_threads()  # ImageEmbedder sets its actor's thread count; give it back after
    (tmp_path / "logs" / "run" / "checkpoints").mkdir(parents=True)
    epoch = {"epoch": 32, "name": "run", "state_dict": {f"module.{k}": v for k, v in gelu_ref.state_dict().items()}}
    for path in ("logs/run/checkpoints/epoch_32.pt", "epoch_32.pt"):
        torch.save(epoch, path)
    evaluate, to_hf, to_ours = readme_commands("weights", {})
    assert evaluate[:3] == ["python", "-m", "pipelines.evaluate"]
    cfg = load_config(EvalConfig, None, evaluate[3:])
    embedder = ImageEmbedder(cfg.checkpoint, cfg.s3, with_phash=False, activation=cfg.activation)
    assert embedder.model.config.activation == "gelu" and _max_diff(embedder.model, gelu_ref) < 1e-5
    assert len(fingerprint_of(cfg, cfg.checkpoint, None)) == 64
    with pytest.raises(ValueError, match="does not say which activation"):
        ImageEmbedder(cfg.checkpoint, cfg.s3, with_phash=False)
    ref = _reference("quick_gelu")  # ViT-B-32.pt: an OpenAI TorchScript archive
    torch.jit.trace(ref, _inputs()).save("ViT-B-32.pt")
    for argv in (to_hf, to_ours):
        assert argv[:3] == ["python", "-m", "clip_model.export"]
        assert export_main(argv[3:]) == 0
    assert _max_diff(load_checkpoint("out/hf").model, ref) < 1e-5
    ours = load_checkpoint("out/ours")
    assert (ours.origin, ours.activation) == ("export", "gelu") and _max_diff(ours.model, gelu_ref) < 1e-5
    torch.set_num_threads(threads)
