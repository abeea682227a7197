"""Independent reference implementations, loaded by file path.

OpenAI's `clip` and open_clip's packages import torchvision in their __init__, which does not import
beside a CPU torch wheel; their model.py / tokenizer files need only torch, ftfy and regex, so the tests
load those files directly (installed --no-deps by the Makefile's dev step).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType


def _load(package: str, filename: str, alias: str) -> ModuleType:
    if alias in sys.modules:
        return sys.modules[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"reference package {package!r} is not installed; run `make install-dev`")
    path = os.path.join(spec.submodule_search_locations[0], filename)
    mod_spec = importlib.util.spec_from_file_location(alias, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[alias] = module
    mod_spec.loader.exec_module(module)
    return module


def openai_model() -> ModuleType:
    """OpenAI's clip/model.py (CLIP, build_model, ModifiedResNet, VisionTransformer)."""
    return _load("clip", "model.py", "_ref_openai_clip_model")
