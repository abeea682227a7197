"""Zero-shot classification (paper 3.1.2-3.1.4) and retrieval metrics.

Class names x prompt templates are embedded, each prompt embedding L2-normalised, averaged per class
in embedding space (prompt ensembling) and renormalised; images are classified by cosine similarity.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

_ASSETS = os.path.join(os.path.dirname(__file__), "assets")
SIMPLE_TEMPLATES = ["a photo of a {}."]


def openai_imagenet_templates() -> list[str]:
    """The 80 ImageNet prompt templates of the paper's prompt-engineering notebook."""
    with open(os.path.join(_ASSETS, "openai_imagenet_templates.json")) as f:
        return json.load(f)["templates"]


def imagenet_classnames() -> list[str]:
    with open(os.path.join(_ASSETS, "imagenet_classnames.json")) as f:
        return json.load(f)["classnames"]


def load_templates(spec: str) -> list[str]:
    """'openai-imagenet', 'simple', or a file: a JSON list or one template per line, each with one '{}'."""
    if spec == "openai-imagenet":
        return openai_imagenet_templates()
    if spec == "simple":
        return list(SIMPLE_TEMPLATES)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"templates {spec!r}: not 'openai-imagenet', 'simple' or an existing file")
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    templates = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines()]
    templates = [t for t in templates if t]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"templates file {spec}: every template needs exactly one '{{}}'; bad: {bad[:5]}")
    return templates


@torch.no_grad()
def build_classifier(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenize: Callable[[list[str]], torch.Tensor],
                     classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Returns the zero-shot weights, embed_dim x num_classes, each column unit norm."""
    if not classnames:
        raise ValueError("build_classifier: no class names")
    columns = []
    for name in classnames:
        prompts = [t.format(name) for t in templates]
        feats = torch.cat([encode_text(tokenize(prompts[i:i + batch_size])) for i in range(0, len(prompts), batch_size)])
        feats = F.normalize(feats.float(), dim=-1).mean(dim=0)  # ensemble in embedding space
        columns.append(F.normalize(feats, dim=-1))
    return torch.stack(columns, dim=1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per-sample booleans: is the label among the top k predictions."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # N, kmax
    hits = top == labels[:, None]
    return {k: hits[:, :min(k, kmax)].any(dim=1) for k in ks}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    correct = topk_correct(logits, labels, (1, 5))
    pred = logits.argmax(dim=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), pred.numpy()), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {
        "top1": float(correct[1].float().mean()),
        "top5": float(correct[5].float().mean()),
        "mean_per_class": float(per_class[confusion.sum(axis=1) > 0].mean()) if confusion.sum() else 0.0,
        "per_class": per_class.tolist(),
        # Eval images per class: a class named in the label space but absent from the set has support 0
        # (its per_class entry is 0.0 by convention; tables and plots leave it out).
        "support": confusion.sum(axis=1).tolist(),
        "confusion": confusion.tolist(),
        "n": int(labels.numel()),
    }


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: Sequence[int],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways. Features normalised; text i describes image text_to_image[i] (several texts per
    image allowed, as in COCO/Flickr)."""
    sims = text_features @ image_features.T  # T, I
    t2i = torch.as_tensor(text_to_image)
    out = {}
    ranks = sims.argsort(dim=1, descending=True)
    for k in ks:
        out[f"text_to_image_R@{k}"] = float((ranks[:, :k] == t2i[:, None]).any(dim=1).float().mean())
    # image -> text: a hit if any of the image's captions is in the top k.
    ranks_i = sims.T.argsort(dim=1, descending=True)  # I, T
    owner = t2i[ranks_i]  # image id of each ranked text
    for k in ks:
        hits = (owner[:, :k] == torch.arange(image_features.shape[0])[:, None]).any(dim=1)
        out[f"image_to_text_R@{k}"] = float(hits.float().mean())
    return out
