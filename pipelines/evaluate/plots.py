"""PNG plots for evaluation results (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes; must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Beyond this many classes tick labels are unreadable: the plot keeps the matrix, drops the names.
_MAX_LABELLED_CLASSES = 40


def confusion_png(confusion: Sequence[Sequence[int]], classnames: Sequence[str], path: str, title: str) -> str:
    """Row-normalised confusion matrix (rows: true class, columns: prediction)."""
    m = np.asarray(confusion, dtype=np.float64)
    rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(classnames)
    size = min(4 + 0.3 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= _MAX_LABELLED_CLASSES:
        ax.set_xticks(range(n), classnames, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classnames, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def per_class_png(per_class: Mapping[str, Sequence[float]], classnames: Sequence[str], path: str, title: str) -> str:
    """Grouped bars: one group per class, one bar per mode (e.g. single template vs ensemble)."""
    n, modes = len(classnames), list(per_class)
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(min(4 + 0.35 * n, 30), 4))
    x = np.arange(n)
    for i, mode in enumerate(modes):
        ax.bar(x + (i - (len(modes) - 1) / 2) * width, per_class[mode], width, label=mode)
    if n <= 2 * _MAX_LABELLED_CLASSES:
        ax.set_xticks(x, classnames, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
