"""CLIP in plain PyTorch (no Ray): model, tokenizer, losses, transforms, zero-shot helpers."""

from .config import ClipConfig, TextConfig, VisionConfig, get_config, model_names
from .loss import ClipLoss, SigLipLoss, build_loss, gather_features
from .tokenizer import ClipTokenizer
from .model import CLIP, build_model, config_from_openai_state_dict, count_parameters, from_openai_state_dict

__all__ = [
    "CLIP", "ClipConfig", "ClipTokenizer", "ClipLoss", "SigLipLoss", "TextConfig", "VisionConfig", "build_loss", "build_model",
    "config_from_openai_state_dict", "count_parameters", "from_openai_state_dict", "gather_features",
    "get_config", "model_names",
]
