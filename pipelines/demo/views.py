"""The zero-shot views the demo reports: which held-out images, which label column, which prompts.

One image set is scored in several label spaces (issue 16): the 36 colour-shape pair names, the six
shapes alone, the six colours alone. A view's prompts name only what it asks for ("a photo of a
triangle." for shape), so a model that tells shapes apart only through their colour fails it. The
evaluate stage embeds each image set once for all its views (evaluate.stage.EmbeddingCache).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.demo.synthetic import COLOURS, DIGIT_NAMES, SHAPES, Sample, shape_classnames

# Prompt ensembles; the first template of each is the single template the evaluation reports beside them.
SHAPE_TEMPLATES = ["a photo of a {}.", "a {} on a white background", "an image of a {}", "a drawing of a {}",
                   "a small {}.", "a large {}."]
COLOUR_TEMPLATES = ["a photo of something {}.", "something {}", "a {} thing", "the colour {}", "a drawing in {}"]
DIGIT_TEMPLATES = ["a photo of the number {}.", "the digit {}", "a handwritten {}", "a scanned image of the number {}"]

# The held-out image sets: shapes of never-seen colour-shape pairs, shapes of seen pairs, test digits.
IMAGE_SETS = ("unseen", "seen", "digits")


@dataclass(frozen=True)
class View:
    name: str
    images: str  # one of IMAGE_SETS
    label_col: str  # the set's column holding this view's label (see label_columns)
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


def label_columns(samples: list[Sample]) -> dict[str, list[int]]:
    """The label columns of a held-out set: `label` (pair index over all 36 pairs, or the digit), `shape`
    and `colour` (indices into SHAPES and COLOURS; -1 for digits)."""
    pairs, colours = shape_classnames(), list(COLOURS)
    return {
        "label": [pairs.index(s.label) if s.kind == "shape" else DIGIT_NAMES.index(s.label) for s in samples],
        "shape": [SHAPES.index(s.shape) if s.kind == "shape" else -1 for s in samples],
        "colour": [colours.index(s.colour) if s.kind == "shape" else -1 for s in samples],
    }


def views() -> list[View]:
    pairs, shapes, colours = tuple(shape_classnames()), tuple(SHAPES), tuple(COLOURS)
    st, ct, dt = tuple(SHAPE_TEMPLATES), tuple(COLOUR_TEMPLATES), tuple(DIGIT_TEMPLATES)
    return [
        View("pairs_unseen", "unseen", "label", pairs, st),
        View("pairs_seen", "seen", "label", pairs, st),
        View("shape_unseen", "unseen", "shape", shapes, st),
        View("colour_unseen", "unseen", "colour", colours, ct),
        View("shape_seen", "seen", "shape", shapes, st),
        View("digits", "digits", "label", tuple(DIGIT_NAMES), dt),
    ]
