"""Test-only injection points into the training loop. The product never sets them: the DAG and `python -m
pipelines.train` call run(cfg) without hooks; tests pass a TrainHooks to run()/run_training()/main() to make a
worker die once at a given step (or inside a checkpoint's commit window), to dump the full fp32 state after every
save and load, to pace the steps, or to end an open-ended run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainHooks:
    #: Rank 1 exits hard before this step, once: the file `fail_marker` records that it did.
    fail_at_step: int | None = None
    fail_marker: str = ""
    #: Rank 0 exits hard between uploading checkpoint N and committing it, once (`fail_marker` again).
    fail_before_commit_at_step: int | None = None
    #: Rank 0 writes full fp32 weights and Adam moments here at every save and load (<name>.pt; a step
    #: saved again after a restart keeps the previous attempt's dump as <name>.earlier.pt).
    debug_dump_dir: str = ""
    #: Every rank appends the sample keys of every step it trains on here (rank<r>_pid<p>.jsonl).
    keys_dir: str = ""
    #: Sleep after every step. The live-elastic test's run trains while it waits for Ray to notice a lost and an
    #: added node; at full speed it trained 92-114 steps there (run alone), spending CPU the rest of the suite
    #: needs and stretching the comparison with the single-process reference.
    step_delay_s: float = 0.0
    #: Once this file exists, the run ends after the current step as if it were the last (checkpoint, export,
    #: sinks closed, manifest): rank 0 looks after every step and tells the others. The live-elastic test stops
    #: its open-ended run this way; killed instead, a worker could die inside MLflow's in-place rewrite of the
    #: run's meta.yaml and leave the file store unreadable.
    stop_file: str = ""

    def __post_init__(self) -> None:
        if (self.fail_at_step is not None or self.fail_before_commit_at_step is not None) and not self.fail_marker:
            raise ValueError("fail_at_step needs fail_marker (a file that makes the failure happen only once)")
