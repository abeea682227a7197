"""Hugging Face `CLIPModel` directories in and out, without importing `transformers`.

A directory here is what `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` read:
`config.json`, `model.safetensors`, the tokenizer as `vocab.json` + `merges.txt` (+ its config and
special tokens) and `preprocessor_config.json`. Weights are renamed between OpenAI's layout (ours) and
HF's; the one real change is attention: OpenAI keeps q, k and v in one `in_proj_weight` (3C, C), HF in
three Linear layers, split here in q, k, v order (nn.MultiheadAttention's). Projections are stored
transposed: ours are (width, embed) matrices applied as `x @ proj`, HF's are Linear weights (embed, width).

Only ViT image towers exist in HF's CLIPModel; a ResNet model cannot be written (a clear error says so).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from .config import ClipConfig, TextConfig, VisionConfig
from .model import CLIP, from_openai_state_dict
from .tokenizer import EOW, ClipTokenizer, bytes_to_unicode
from .transforms import OPENAI_MEAN, OPENAI_STD

WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "pytorch_model.bin"
HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"
_LAYER_NORM_EPS = 1e-5  # ours (torch's default); HF's CLIP default too
# Our layer names -> HF's, inside one transformer block.
_BLOCK = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# Whole-model tensors, ours -> HF's (the projections are transposed on the way).
_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: HF's spelling
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "logit_scale": "logit_scale"}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_TOWERS = (("transformer.resblocks.", "text_model.encoder.layers."),
           ("visual.transformer.resblocks.", "vision_model.encoder.layers."))


def to_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (OpenAI-layout) state dict -> HF CLIPModel's, fp32, contiguous (safetensors wants that)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        value = value.detach().float().cpu()
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.T
        elif key == "logit_bias":
            raise ValueError("a SigLIP model (logit_bias) has no Hugging Face CLIPModel equivalent")
        else:
            for ours, theirs in _TOWERS:
                if key.startswith(ours):
                    index, _, rest = key[len(ours):].partition(".")
                    prefix = f"{theirs}{index}."
                    if rest.startswith("attn.in_proj_"):
                        kind = rest.rsplit("_", 1)[1]  # weight | bias
                        for name, part in zip("qkv", value.chunk(3, dim=0)):
                            out[f"{prefix}self_attn.{name}_proj.{kind}"] = part
                    else:
                        layer, _, kind = rest.rpartition(".")
                        out[f"{prefix}{_BLOCK[layer]}.{kind}"] = value
                    break
            else:
                raise ValueError(f"no Hugging Face CLIPModel name for {key!r} (only ViT image towers exist there)")
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPModel's state dict -> ours. Unknown keys are kept as they are, so the strict load names them."""
    top = {v: k for k, v in _TOP.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):  # a buffer older transformers saved; not a weight
            continue
        if key in top:
            out[top[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.T
        else:
            for ours, theirs in _TOWERS:
                if key.startswith(theirs):
                    index, _, rest = key[len(theirs):].partition(".")
                    layer, _, kind = rest.rpartition(".")
                    if layer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                        qkv.setdefault((f"{ours}{index}.attn.in_proj_{kind}", kind), {})[layer[10]] = value
                    else:
                        out[f"{ours}{index}.{block.get(layer, layer)}.{kind}"] = value
                    break
            else:
                out[key] = value
    for (name, _), parts in qkv.items():
        if set(parts) != set("qkv"):
            raise ValueError(f"Hugging Face weights: {name} needs q, k and v projections, found {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg: ClipConfig, tokenizer: ClipTokenizer) -> dict:
    """config.json of the CLIPModel (what transformers' CLIPConfig.to_dict() holds, the keys that matter)."""
    if not cfg.vision.is_vit:
        raise ValueError("Hugging Face's CLIPModel has only a ViT image tower; this model's is a ResNet")
    if cfg.init_logit_bias is not None:
        raise ValueError("a SigLIP model (logit_bias) has no Hugging Face CLIPModel equivalent")
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": 4 * t.width, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length, "hidden_act": cfg.activation,
            "layer_norm_eps": _LAYER_NORM_EPS, "projection_dim": cfg.embed_dim,
            # HF pools the text at the first eos id (ours at the largest id: the same token).
            "bos_token_id": tokenizer.sot_token_id, "eos_token_id": tokenizer.eot_token_id,
            "pad_token_id": tokenizer.eot_token_id,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.width, "intermediate_size": 4 * v.width,
            "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": 3, "hidden_act": cfg.activation,
            "layer_norm_eps": _LAYER_NORM_EPS, "projection_dim": cfg.embed_dim,
        },
    }


def config_from_hf(d: Mapping) -> ClipConfig:
    """Our ClipConfig from a CLIPModel config.json; anything our model cannot reproduce is an error."""
    if d.get("model_type") != "clip":
        raise ValueError(f"not a Hugging Face CLIPModel config (model_type {d.get('model_type')!r}, expected 'clip')")
    t, v = d.get("text_config") or {}, d.get("vision_config") or {}
    acts = {t.get("hidden_act", "quick_gelu"), v.get("hidden_act", "quick_gelu")}
    if len(acts) != 1:
        raise ValueError(f"text and vision towers use different activations {sorted(acts)}; this CLIP has one")
    activation = acts.pop()
    for tower, c in (("text", t), ("vision", v)):
        eps = c.get("layer_norm_eps", _LAYER_NORM_EPS)
        if abs(eps - _LAYER_NORM_EPS) > 1e-12:
            raise ValueError(f"{tower}_config.layer_norm_eps is {eps}; this CLIP's layer norms use {_LAYER_NORM_EPS}")
        width, heads, inter = c.get("hidden_size", 512), c.get("num_attention_heads", 8), c.get("intermediate_size")
        if heads != max(1, width // 64):
            raise ValueError(f"{tower}_config has {heads} heads for width {width}; this CLIP uses width // 64")
        if inter is not None and inter != 4 * width:
            raise ValueError(f"{tower}_config.intermediate_size {inter} is not 4 x hidden_size {width}")
    return ClipConfig(
        embed_dim=d.get("projection_dim", 512),
        vision=VisionConfig(image_size=v.get("image_size", 224), layers=v.get("num_hidden_layers", 12),
                            width=v.get("hidden_size", 768), patch_size=v.get("patch_size", 32)),
        text=TextConfig(context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
                        width=t.get("hidden_size", 512), layers=t.get("num_hidden_layers", 12)),
        activation=activation,
        init_logit_scale=d.get("logit_scale_init_value", ClipConfig.init_logit_scale),
    )


def _hf_vocab(tokenizer: ClipTokenizer) -> dict[str, int]:
    """OpenAI's vocab.json layout: bytes, bytes + </w>, one token per merge, then the two specials."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + EOW for c in chars] + [a + b for a, b in tokenizer.merges] + [HF_SOT, HF_EOT]
    return {tok: i for i, tok in enumerate(tokens)}  # a token two merges spell keeps the later id, as ours


def save_tokenizer_files(tokenizer: ClipTokenizer, directory: str) -> None:
    """vocab.json, merges.txt and the tokenizer's config, as openai/clip-vit-* repositories hold them."""
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(_hf_vocab(tokenizer), f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges))
    specials = {"bos_token": HF_SOT, "eos_token": HF_EOT, "unk_token": HF_EOT, "pad_token": HF_EOT}
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.context_length,
                   "processor_class": "CLIPProcessor", "do_lower_case": True, **specials}, f, indent=2)


def load_tokenizer_files(directory: str, context_length: int) -> ClipTokenizer | None:
    """Our tokenizer from a HF directory's merges.txt (or tokenizer.json), None when it has neither.

    The vocabulary must be OpenAI's layout (which CLIP tokenizers on the Hub follow): a different one
    would map the same merges to other ids, so it is checked, not assumed."""
    merges_path, tok_path = os.path.join(directory, "merges.txt"), os.path.join(directory, "tokenizer.json")
    vocab = None
    if os.path.exists(merges_path):
        with open(merges_path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        vocab_path = os.path.join(directory, "vocab.json")
        if os.path.exists(vocab_path):
            with open(vocab_path, encoding="utf-8") as f:
                vocab = json.load(f)
    elif os.path.exists(tok_path):
        with open(tok_path, encoding="utf-8") as f:
            model = json.load(f).get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{tok_path}: not a BPE tokenizer (model type {model.get('type')!r})")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        vocab = model.get("vocab")
    else:
        return None
    tok = ClipTokenizer(merges, context_length)
    if vocab is not None:
        expected = _hf_vocab(tok)
        wrong = [t for t, i in expected.items() if vocab.get(t) != i]
        if wrong:
            raise ValueError(f"{directory}: the tokenizer's vocabulary is not in OpenAI's layout (e.g. {wrong[0]!r} "
                             f"has id {vocab.get(wrong[0])}, expected {expected[wrong[0]]})")
    return tok


def save_hf(model: CLIP, directory: str, tokenizer: ClipTokenizer) -> None:
    """Write `model` as a CLIPModel directory that `transformers` loads with from_pretrained."""
    from safetensors.torch import save_file

    config = hf_config(model.config, tokenizer)  # refuses ResNets and SigLIP before anything is written
    os.makedirs(directory, exist_ok=True)
    save_file(to_hf_state_dict(model.state_dict()), os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_tokenizer_files(tokenizer, directory)
    size = model.config.vision.image_size
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
                   "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,  # bicubic, as ours
                   "do_center_crop": True, "crop_size": {"height": size, "width": size},
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD), "do_convert_rgb": True}, f, indent=2)


def is_hf_dir(directory: str) -> bool:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and (d.get("model_type") == "clip" or "CLIPModel" in (d.get("architectures") or []))


def hf_weight_files(directory: str) -> list[str]:
    """The weight files of a HF directory: one safetensors or bin file, or the shards its index lists."""
    for single, index in ((WEIGHTS_FILE, WEIGHTS_FILE + ".index.json"),
                          (LEGACY_WEIGHTS_FILE, LEGACY_WEIGHTS_FILE + ".index.json")):
        if os.path.exists(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
        if os.path.exists(os.path.join(directory, index)):
            with open(os.path.join(directory, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(directory, s) for s in shards]
    raise FileNotFoundError(f"Hugging Face directory {directory} has no {WEIGHTS_FILE} or {LEGACY_WEIGHTS_FILE}")


def load_hf(directory: str, activation: str | None = None) -> tuple[CLIP, ClipTokenizer]:
    """A CLIPModel directory -> (our model in eval mode, tokenizer). The activation is the config's
    hidden_act; an explicit `activation` that contradicts it is an error."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    if activation is not None and activation != cfg.activation:
        raise ValueError(f"{directory}: its config.json says hidden_act {cfg.activation!r}, "
                         f"but activation={activation!r} was asked for")
    sd: dict[str, torch.Tensor] = {}
    for path in hf_weight_files(directory):
        sd.update(load_file(path) if path.endswith(".safetensors")
                  else torch.load(path, map_location="cpu", weights_only=True))
    model = from_openai_state_dict(from_hf_state_dict(sd), config=cfg).eval()
    tokenizer = load_tokenizer_files(directory, cfg.text.context_length)
    if tokenizer is None:
        from .formats import openai_tokenizer

        tokenizer = openai_tokenizer(cfg.text.context_length)
    return model, tokenizer
