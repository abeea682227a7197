"""The contract between a stage and the DAG runner.

Each stage package (pipelines/crawl, filter, dedup, shard, train, evaluate) defines one `Stage` in its
stage.py; `pipelines/run/dag.py` lists them in order and knows nothing else about them. Adding a stage
is one new package and one entry in that list. A stage's `run` commits its own manifest, so
`python -m pipelines.<stage>` alone and the runner produce the same committed output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipelines.core.manifest import Manifest
from pipelines.core.runtime import RayConfig
from pipelines.core.storage import S3Options


@dataclass(frozen=True)
class Wiring:
    """What the runner fills into a stage's config: where it reads and writes, and how to reach them."""

    #: The committed directory of the stage it reads (`Stage.upstream`); None for the first stage.
    input: str | None
    #: Where this stage commits; "" while the runner only computes its fingerprint.
    output: str
    #: Every committed directory so far, by stage name (a stage may read more than its upstream).
    dirs: Mapping[str, str]
    s3: S3Options
    ray: RayConfig


@dataclass(frozen=True)
class Stage:
    name: str
    #: The type of the stage's section in the run config, and its default (None: the section is required).
    section: Any
    #: One line for `--help` and the docs.
    doc: str
    #: The stage whose committed output it reads (None: it reads inputs of its own, like URL lists).
    upstream: str | None
    #: Dotted keys of the section that the runner sets; a run config that sets them is refused.
    wired: tuple[str, ...]
    #: The section with `Wiring` applied: the config `fingerprint` and `run` take.
    wire: Callable[[Any, Wiring], Any]
    #: What `run(cfg)` would commit under: result-shaping settings plus the inputs' manifests.
    fingerprint: Callable[[Any], str]
    #: Does the work and commits the manifest (in the config's output directory).
    run: Callable[[Any], Manifest]
    #: Checks that need the world (files exist, model names are known), run for every stage before any
    #: stage starts, so a typo in the last stage does not surface after hours of the first.
    validate: Callable[[Any], None] = lambda cfg: None
    #: The section's default value factory (None = the run config must give the section).
    default: Callable[[], Any] | None = None
    #: Commits part by part (a killed run resumes from `_parts/`), as the data stages do.
    parts: bool = False
    #: Why the runner skips this stage for this section (e.g. no evaluate jobs), or None.
    skip_when: Callable[[Any], str | None] = field(default=lambda section: None)
    #: Why the runner should run this stage although it is committed (e.g. crawl.retry_failed), or None.
    rerun_when: Callable[[Any], str | None] = field(default=lambda cfg: None)
    #: The config for a first run, when nothing is committed yet (e.g. a crawl asked to recrawl crawls first).
    fresh: Callable[[Any], Any] = field(default=lambda cfg: cfg)


def wire_data_stage(cfg: Any, w: Wiring) -> Any:
    """The wiring every data stage shares: input (with its S3 options), output path and S3 options, Ray."""
    changes: dict[str, Any] = {"output": dataclasses.replace(cfg.output, path=w.output or cfg.output.path, s3=w.s3),
                               "ray": w.ray}
    if w.input is not None:
        changes.update(input=w.input, input_s3=w.s3)
    return dataclasses.replace(cfg, **changes)


DATA_STAGE_WIRED = ("input", "input_s3", "output.path", "output.s3", "ray")
