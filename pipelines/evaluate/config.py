"""The evaluate stage's configuration: what `python -m pipelines.evaluate` and the DAG's evaluate jobs accept.

Its own module, importing neither torch nor sklearn, so that the DAG runner, `--help` and config checks load
in a fraction of a second; stage.py (torch) and linear_probe.py (sklearn) import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipelines.core.runtime import RayConfig
from pipelines.core.storage import S3Options

DEFAULT_C_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


@dataclass
class ProbeConfig:
    # Share of `dataset` held out as the test split when no separate `probe_train` set is given.
    test_fraction: float = 0.5
    # Share of the training rows held out to choose C (never used for the reported test accuracy).
    val_fraction: float = 0.25
    # Coarse C grid (log spaced); the search then tries the midpoints next to the best value.
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    # L-BFGS iterations per fit; the paper uses 1000.
    max_iter: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("test_fraction", "val_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"linear probe {name} must be in (0, 1), got {value}")
        if not self.c_grid or any(not (c > 0 and math.isfinite(c)) for c in self.c_grid):
            raise ValueError(f"linear probe c_grid must be non-empty positive finite values, got {self.c_grid}")
        if self.max_iter < 1:
            raise ValueError(f"linear probe max_iter must be >= 1, got {self.max_iter}")


SINGLE_TEMPLATE = "a photo of a {}."
TASKS = ("zeroshot", "linear-probe", "retrieval")


@dataclass
class EvalConfig:
    # Exported model directory (model.pt + config.json + tokenizer.json), OpenAI's TorchScript .pt, an open_clip
    # checkpoint (epoch_N.pt, open_clip_pytorch_model.bin, .safetensors, a hub directory) or a Hugging Face
    # CLIPModel directory; local or s3:// (see clip_model/formats.py).
    checkpoint: str
    # imagefolder:DIR (one subfolder per class) or parquet:PATH (image bytes + label, or + caption).
    dataset: str
    # Directory (local or s3://) for results.json, the PNG plots and the _manifest.json that commits them.
    output: str
    # quick_gelu or gelu: required for checkpoints that do not record it (open_clip files without their config,
    # bare state dicts); where the checkpoint records it, a different value is an error. None = as recorded.
    activation: str | None = None
    # zeroshot, linear-probe or retrieval (see the module docstring for what each needs).
    task: str = "zeroshot"
    # Class-name list (JSON list or one name per line); imagefolder default: folder names, "_" -> " ".
    classnames: str | None = None
    # Prompt templates for the ensemble: "openai-imagenet" (the paper's 80), "simple", or a file.
    templates: str = "openai-imagenet"
    # The one template scored beside the ensemble (the paper's; a label space of colours may want another).
    single_template: str = SINGLE_TEMPLATE
    # A committed stage output with a phash column (e.g. the shard stage): enables overlap analysis.
    train_manifest: str | None = None
    # Eval image counts as Overlap when a training phash is within this many bits (dedup's default).
    overlap_hamming: int = 8
    # linear-probe: a separate training set (as `dataset`); None = split `dataset` (probe.test_fraction).
    probe_train: str | None = None
    # The linear probe's splits and its search for the regularisation strength C (task=linear-probe).
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # Parquet datasets: the column holding the encoded image bytes.
    image_col: str = "image"
    # Parquet classification datasets: the column holding the integer label (an index into the class names).
    label_col: str = "label"
    # Parquet retrieval datasets: the caption column (a string, or a list of strings per image).
    caption_col: str = "caption"
    # Images per inference batch in each actor.
    batch_size: int = 64
    # Max embedding actors (1 CPU each); None = cluster CPUs - 1, so read/decode tasks keep a CPU.
    workers: int | None = None
    # A set of at most this many images is embedded in this process, with the model it loads for the text side,
    # instead of by actors that each start and load the checkpoint (about 4 CPU-seconds per actor on a 2-core
    # machine, for a tiny model: more than embedding a few hundred images); 0 = always the actors.
    local_images: int = 1024
    # Connection settings for s3:// checkpoints, datasets, train_manifest and output.
    s3: S3Options = field(default_factory=S3Options)
    ray: RayConfig = field(default_factory=RayConfig)
    # Write confusion-matrix and per-class accuracy PNGs next to results.json (classification tasks).
    plots: bool = True

    def __post_init__(self) -> None:
        for name in ("checkpoint", "dataset", "output"):
            if not getattr(self, name):
                raise ValueError(f"evaluate {name} must be given")
        if self.activation not in (None, "quick_gelu", "gelu"):
            raise ValueError(f"evaluate activation must be quick_gelu, gelu or null, got {self.activation!r}")
        if self.task not in TASKS:
            raise ValueError(f"evaluate task must be one of {list(TASKS)}, got {self.task!r}")
        if not 0 <= self.overlap_hamming <= 32:
            raise ValueError(f"evaluate overlap_hamming must be in [0, 32], got {self.overlap_hamming}")
        if self.batch_size < 1:
            raise ValueError(f"evaluate batch_size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"evaluate workers must be >= 1, got {self.workers}")
        if self.local_images < 0:
            raise ValueError(f"evaluate local_images must be >= 0, got {self.local_images}")
        if self.single_template.count("{}") != 1:
            raise ValueError(f"evaluate single_template must hold one '{{}}', got {self.single_template!r}")
        if self.train_manifest and self.task == "retrieval":
            raise ValueError("evaluate train_manifest: the overlap analysis reports classification accuracy; "
                             "use it with task=zeroshot or task=linear-probe")
        if self.probe_train and self.task != "linear-probe":
            raise ValueError(f"evaluate probe_train only applies to task=linear-probe, not {self.task}")
