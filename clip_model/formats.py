"""Any CLIP checkpoint a user is likely to hold, loaded into our model: one function, `load_checkpoint`.

| what the path is                                   | origin      | activation                                |
|----------------------------------------------------|-------------|-------------------------------------------|
| our export directory (model.pt + config.json)      | export      | config.json's (old exports: quick_gelu)   |
| OpenAI's released `.pt` (a TorchScript archive)     | openai      | quick_gelu (all of OpenAI's models)       |
| Hugging Face CLIPModel directory (config.json)      | hf          | config.json's hidden_act                  |
| open_clip hub directory / file beside              | open_clip   | open_clip_config.json's model_cfg         |
|   open_clip_config.json                             |             |   (quick_gelu: true, else gelu)           |
| open_clip `epoch_N.pt` ({"state_dict": ...})        | open_clip   | ../../params.txt's model name and         |
|                                                    |             |   force_quick_gelu, when it is there      |
| any other state dict (.pt, .bin, .safetensors)     | state_dict  | must be given                             |

The activation matters because both load without error: GELU weights run with QuickGELU (or the reverse)
give embeddings that are close but wrong. So where the origin does not tell, the caller must say
(`activation="gelu"` or `"quick_gelu"`), and where it does, a contradicting explicit value is an error.

OpenAI's archives are TorchScript: `torch.load(weights_only=True)` refuses them, so they are opened with
`torch.jit.load`, which runs no pickled Python but does build the archive's module: load archives from
sources you trust, as with any checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .config import ACTIVATIONS, ClipConfig
from .model import CLIP, from_openai_state_dict
from .tokenizer import ClipTokenizer

EXPORT_MODEL_FILE = "model.pt"  # the names clip_model.export writes
EXPORT_CONFIG_FILE = "config.json"
EXPORT_TOKENIZER_FILE = "tokenizer.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Key prefixes wrappers add: DDP/DeepSpeed ("module."), torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Loaded:
    model: CLIP
    tokenizer: ClipTokenizer
    origin: str  # export | openai | hf | open_clip | state_dict
    activation: str


def load_checkpoint(path: str, activation: str | None = None) -> Loaded:
    """`path` in any format of the table above -> our float32 model in eval mode and its tokenizer."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    if os.path.isdir(path):
        return _load_dir(path, activation)
    if _is_torchscript(path):
        sd = torch.jit.load(path, map_location="cpu").state_dict()
        return _from_state_dict(path, sd, "openai", _agree(path, "OpenAI's models all use", "quick_gelu", activation))
    sd = _read_state_dict(path)
    if isinstance(sd.get("state_dict"), Mapping):  # open_clip's epoch_N.pt (also our training's torch.save)
        known = _open_clip_sidecar(os.path.dirname(path)) or _open_clip_params(path)
        origin = "open_clip"
        sd = sd["state_dict"]
    else:
        known = _open_clip_sidecar(os.path.dirname(path))
        origin = "open_clip" if known or os.path.basename(path) in OPEN_CLIP_WEIGHTS else "state_dict"
    act = _agree(path, known[0], known[1], activation) if known else _required(path, origin, activation)
    return _from_state_dict(path, sd, origin, act)


def weight_files(path: str) -> list[str]:
    """The files that hold a checkpoint's weights (what an evaluation's fingerprint hashes)."""
    from .hf import hf_weight_files, is_hf_dir

    if not os.path.isdir(path):
        return [path]
    if os.path.exists(os.path.join(path, EXPORT_MODEL_FILE)):
        return [os.path.join(path, EXPORT_MODEL_FILE)]
    if is_hf_dir(path):
        return hf_weight_files(path)
    return [_open_clip_weights(path)]


def _load_dir(path: str, activation: str | None) -> Loaded:
    from .hf import is_hf_dir, load_hf

    if os.path.exists(os.path.join(path, EXPORT_MODEL_FILE)):
        return _load_export_dir(path, activation)
    if is_hf_dir(path):
        model, tok = load_hf(path, activation)
        return Loaded(model, tok, "hf", model.config.activation)
    if os.path.exists(os.path.join(path, OPEN_CLIP_CONFIG)):
        weights = _open_clip_weights(path)
        known = _open_clip_sidecar(path)
        assert known is not None
        return _from_state_dict(weights, _read_state_dict(weights), "open_clip",
                                _agree(path, known[0], known[1], activation))
    raise ValueError(f"checkpoint directory {path}: not a CLIP checkpoint this loader knows (expected our export's "
                     f"{EXPORT_MODEL_FILE}, a Hugging Face CLIPModel config.json, or open_clip's {OPEN_CLIP_CONFIG})")


def _load_export_dir(path: str, activation: str | None) -> Loaded:
    cfg_path = os.path.join(path, EXPORT_CONFIG_FILE)
    config = None
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            config = ClipConfig.from_dict(json.load(f))  # exports before `activation` say quick_gelu: true
        act = _agree(path, "its config.json records", config.activation, activation)
    else:
        act = _required(path, "state_dict", activation)
    sd = _strip_wrappers(torch.load(os.path.join(path, EXPORT_MODEL_FILE), map_location="cpu", weights_only=True))
    model = from_openai_state_dict(sd, quick_gelu=act == "quick_gelu", config=config).eval()
    tok_path = os.path.join(path, EXPORT_TOKENIZER_FILE)
    tokenizer = (ClipTokenizer.load(tok_path) if os.path.exists(tok_path)
                 else openai_tokenizer(model.config.text.context_length))
    return Loaded(model, tokenizer, "export", act)


def _from_state_dict(path: str, sd: Mapping[str, torch.Tensor], origin: str, activation: str) -> Loaded:
    try:
        model = from_openai_state_dict(_strip_wrappers(sd), quick_gelu=activation == "quick_gelu").eval()
    except ValueError as err:
        raise ValueError(f"checkpoint {path} ({origin}): {err}") from err
    return Loaded(model, openai_tokenizer(model.config.text.context_length), origin, activation)


@functools.lru_cache(maxsize=4)
def openai_tokenizer(context_length: int) -> ClipTokenizer:
    """OpenAI's BPE (reading it takes ~0.3 s): shared, as a ClipTokenizer is immutable and thread-safe."""
    return ClipTokenizer.from_openai_bpe(context_length=context_length)


def _strip_wrappers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _is_torchscript(path: str) -> bool:
    """TorchScript archives are zip files with a code/ folder; torch.save's zip files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist() if n.count("/") >= 2)


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise ValueError(f"checkpoint {path}: not a torch state dict torch.load(weights_only=True) can read "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path}: holds a {type(sd).__name__}, not a state dict")
    return sd


def _open_clip_weights(directory: str) -> str:
    for name in OPEN_CLIP_WEIGHTS:
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise FileNotFoundError(f"open_clip directory {directory} has none of {list(OPEN_CLIP_WEIGHTS)}")


def _open_clip_sidecar(directory: str) -> tuple[str, str] | None:
    """(why, activation) from open_clip's hub config beside the weights: its model_cfg says quick_gelu or not
    (absent means False: open_clip builds nn.GELU then)."""
    path = os.path.join(directory, OPEN_CLIP_CONFIG)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        model_cfg = json.load(f).get("model_cfg") or {}
    return f"{path} (model_cfg.quick_gelu) says", "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"


def _open_clip_params(path: str) -> tuple[str, str] | None:
    """open_clip's training writes logs/<run>/params.txt ("name: value" lines) next to checkpoints/epoch_N.pt.
    Its model configs named *-quickgelu set quick_gelu, and --force-quick-gelu forces it; others use GELU."""
    params = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "params.txt")
    if not os.path.exists(params):
        return None
    values = {}
    with open(params, encoding="utf-8", errors="replace") as f:
        for line in f:
            name, sep, value = line.partition(":")
            if sep:
                values[name.strip()] = value.strip()
    if "model" not in values:
        return None
    quick = values.get("force_quick_gelu") == "True" or "quickgelu" in values["model"].lower()
    return f"{params} (model {values['model']}, force_quick_gelu {values.get('force_quick_gelu')}) says", \
        "quick_gelu" if quick else "gelu"


def _agree(path: str, why: str, known: str, asked: str | None) -> str:
    if asked is not None and asked != known:
        raise ValueError(f"checkpoint {path}: {why} activation {known!r}, but activation={asked!r} was asked for")
    return known


def _required(path: str, origin: str, asked: str | None) -> str:
    if asked is None:
        raise ValueError(f"checkpoint {path}: a {origin} checkpoint does not say which activation it was trained "
                         f"with; set activation=quick_gelu (OpenAI's models, *-quickgelu open_clip models) or "
                         f"activation=gelu (most LAION/DataComp open_clip models)")
    return asked
