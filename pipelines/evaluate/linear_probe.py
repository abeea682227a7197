"""Linear probe (paper 3.2): L-BFGS logistic regression on frozen image features.

The regularisation strength C (sklearn's inverse of the paper's lambda) is chosen on a validation
split carved from the training rows: a coarse log grid, then the geometric midpoints on both sides
of the best grid point (a one-step version of the paper's parametric binary search). The chosen C
is refitted on train + validation and scored once on the test rows.

Splits are deterministic: rows are ordered by id before any split, and every split is stratified
with a fixed seed, so the same eval set gives the same probe on every machine and rerun.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from pipelines.evaluate.config import ProbeConfig


def split_indices(labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) row indices, stratified by label. Callers pass rows already ordered by id."""
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    if (counts[counts > 0] < 2).any():
        rare = np.flatnonzero((counts > 0) & (counts < 2)).tolist()
        raise ValueError(f"linear probe {what} split: classes {rare[:10]} have fewer than 2 images; "
                         "every class needs at least one image on each side")
    n_classes = int((counts > 0).sum())
    n_held = max(int(round(fraction * len(idx))), n_classes)
    if len(idx) - n_held < n_classes:
        raise ValueError(f"linear probe {what} split: {len(idx)} images are too few to hold out {fraction:.0%} "
                         f"and keep all {n_classes} classes on both sides")
    keep, held = train_test_split(idx, test_size=n_held, stratify=labels, random_state=seed)
    return np.sort(keep), np.sort(held)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> LogisticRegression:
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings():
        # A weakly regularised fit on separable features never converges exactly; the sweep
        # still compares it fairly on validation accuracy.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(x, y)


def _val_accuracy(x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, c: float,
                  max_iter: int) -> float:
    return float((_fit(x_tr, y_tr, c, max_iter).predict(x_val) == y_val).mean())


def sweep_c(x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            cfg: ProbeConfig) -> tuple[float, dict[float, float]]:
    """Best C by validation accuracy (ties: the smaller C, i.e. the stronger regularisation)."""
    scores = {c: _val_accuracy(x_tr, y_tr, x_val, y_val, c, cfg.max_iter) for c in sorted(cfg.c_grid)}
    grid = sorted(scores)
    best = max(grid, key=lambda c: (scores[c], -c))
    i = grid.index(best)
    for j in (i - 1, i + 1):  # refine between the best grid point and its neighbours
        if 0 <= j < len(grid):
            mid = math.sqrt(best * grid[j])
            scores[mid] = _val_accuracy(x_tr, y_tr, x_val, y_val, mid, cfg.max_iter)
    best = max(sorted(scores), key=lambda c: (scores[c], -c))
    return best, scores


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 cfg: ProbeConfig) -> dict:
    """Sweep C on a validation split of the training rows, refit on all of them, score on test."""
    if x_train.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"linear probe features must be 2-D with equal widths, got {x_train.shape}, {x_test.shape}")
    if len(np.unique(y_train)) < 2:
        raise ValueError("linear probe needs at least 2 classes in the training rows")
    fit_idx, val_idx = split_indices(y_train, cfg.val_fraction, cfg.seed, "validation")
    best_c, scores = sweep_c(x_train[fit_idx], y_train[fit_idx], x_train[val_idx], y_train[val_idx], cfg)
    clf = _fit(x_train, y_train, best_c, cfg.max_iter)
    # Logits over every class of the eval set, also those the probe never saw in training.
    proba = np.full((len(x_test), int(max(y_train.max(), y_test.max())) + 1), -np.inf, dtype=np.float64)
    proba[:, clf.classes_] = clf.decision_function(x_test).reshape(len(x_test), -1) if len(clf.classes_) > 2 \
        else np.stack([-clf.decision_function(x_test), clf.decision_function(x_test)], axis=1)
    return {
        "best_C": best_c,
        "val_accuracy_by_C": {f"{c:.6g}": s for c, s in sorted(scores.items())},
        "n_fit": int(len(fit_idx)),
        "n_val": int(len(val_idx)),
        "n_train": int(len(x_train)),
        "n_test": int(len(x_test)),
        "scores": proba,
    }
