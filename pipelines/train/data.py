"""Training input: which samples each step trains on (`SamplePlan`, a pure function), and the Ray actors
that read, decode, augment and tokenise exactly those samples ahead of the loop (`StepFeeder`).

What must stay true:
- The global batch of step s is a pure function of (seed, the shard manifest's files and row counts,
  global_batch_size, chunk_rows, shuffle_window_rows): never of the worker count, timing or which
  process read what. Worker r of w trains on rows [r*G/w, (r+1)*G/w) of it. A run resumed at step k,
  at any worker count, therefore trains on the samples an uninterrupted run would have.
- Augmentation is seeded per sample by (seed, epoch, key), so it too is independent of the split.
- One stream from the resume step to the last step: epochs are a property of the plan, not of the
  input pipeline, so nothing restarts, re-plans or re-reads at an epoch boundary.

The order: each file splits into chunks of `chunk_rows` rows (the read unit; the shard stage writes row
groups of the same size); an epoch permutes the chunks, cuts the permuted list into windows of
`shuffle_window_rows` rows, and permutes the rows inside each window. Only the chunk permutation is
computed per epoch (one int per chunk); a window's row order when a step first needs it. Within a global
batch the rows are ordered by chunk position, so each worker's slice comes from about 1/w of the
window's chunks and no two workers read the same chunk twice over (a global shuffle would make every
worker read every chunk of a window).

Why not Ray Data's `streaming_split`: which rows reach which worker depends on timing (mid-epoch resume
can only skip a count, not the same rows), and a dataset re-executes its plan at every epoch (measured:
0.6-5.7 s per epoch start, issue 13).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.manifest import read_committed
from pipelines.core.storage import S3Options, Storage

# The only columns the trainer needs; the rest of SAMPLE_SCHEMA is never read from the shards.
READ_COLUMNS = ["key", "image", "caption"]


@functools.cache
def load_tokenizer():
    """One tokenizer per process (the BPE load takes seconds)."""
    from clip_model.tokenizer import ClipTokenizer

    return ClipTokenizer.from_openai_bpe()


def committed_files(manifest_uri: str, s3=None) -> tuple[Storage, list[str], int]:
    """(storage, files, rows) of the shard stage's committed output."""
    storage, files, rows = committed_layout(manifest_uri, s3)
    return storage, files, sum(rows)


def committed_layout(manifest_uri: str, s3=None) -> tuple[Storage, list[str], list[int]]:
    """(storage, files, rows per file), in manifest order: the input of the plan."""
    storage, manifest = read_committed(manifest_uri, s3, "data.manifest (the shard stage's output)", producer="shard")
    if not manifest.files:
        raise ValueError(f"data.manifest {manifest_uri!r} lists no files")
    return storage, manifest.file_paths(), [f.rows for f in manifest.files]


def prepare_rows(images: Sequence[bytes], captions: Sequence[str], transform, tokenizer,
                 context_length: int) -> dict[str, np.ndarray]:
    """Encoded images + captions -> the training columns (also the single-process reference path)."""
    pixels = np.stack([transform.array(bytes(b)) for b in images])  # B, 3, S, S
    tokens = tokenizer.token_array([str(c) for c in captions], context_length=context_length)  # B, ctx
    return {"image": pixels.astype(np.float32, copy=False), "tokens": tokens.astype(np.int64, copy=False)}


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """The augmentation seed of one sample in one epoch: differs between epochs, not between splits."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest(), "little")


def steps_per_epoch(rows: int, global_batch: int) -> int:
    """Full global batches per epoch (the last partial one is dropped; the shuffle varies what it holds)."""
    steps = rows // global_batch
    if steps < 1:
        raise ValueError(f"the dataset has {rows} rows: too few for one global batch of {global_batch} "
                         "(lower global_batch_size or add data)")
    return steps


# -- the plan -----------------------------------------------------------------------------------
class SamplePlan:
    """Which rows every step trains on. Cheap to build (one entry per chunk) and to send to actors."""

    def __init__(self, rows_per_file: Sequence[int], global_batch: int, seed: int, chunk_rows: int,
                 window_rows: int) -> None:
        self.rows_per_file = tuple(int(r) for r in rows_per_file)
        self.global_batch, self.seed, self.chunk_rows = global_batch, seed, chunk_rows
        # chunk c = rows [start, stop) of file `file`
        spans = [(f, s, min(s + chunk_rows, n)) for f, n in enumerate(self.rows_per_file) for s in range(0, n, chunk_rows)]
        self.chunks = np.asarray(spans, dtype=np.int64).reshape(-1, 3)  # C, (file, start, stop)
        self.window_chunks = max(1, window_rows // chunk_rows)
        self.rows = sum(self.rows_per_file)
        self.steps_per_epoch = steps_per_epoch(self.rows, global_batch)
        # Small caches: the current epoch's chunk order and the windows the current steps draw from.
        self._epochs: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._windows: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()

    def __reduce__(self):
        return SamplePlan, (self.rows_per_file, self.global_batch, self.seed, self.chunk_rows,
                            self.window_chunks * self.chunk_rows)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk order, first epoch position of each window) of one epoch."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.chunks))
            lengths = self.chunks[order, 2] - self.chunks[order, 1]
            per_window = np.add.reduceat(lengths, np.arange(0, len(order), self.window_chunks))
            self._epochs[epoch] = (order, np.concatenate([[0], np.cumsum(per_window)]))
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _window(self, epoch: int, w: int) -> np.ndarray:
        if (epoch, w) not in self._windows:
            self._windows[(epoch, w)] = self._window_rows(epoch, w)
            while len(self._windows) > 4:
                self._windows.popitem(last=False)
        return self._windows[(epoch, w)]

    def _window_rows(self, epoch: int, w: int) -> np.ndarray:
        """Rows of window w in epoch order, as (position of the chunk in the epoch's order, row in chunk)."""
        order, _ = self._epoch(epoch)
        positions = np.arange(w * self.window_chunks, min((w + 1) * self.window_chunks, len(order)))
        lengths = self.chunks[order[positions], 2] - self.chunks[order[positions], 1]
        pos = np.repeat(positions, lengths)
        offset = np.arange(len(pos)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        perm = np.random.default_rng([self.seed, epoch, 1, w]).permutation(len(pos))
        return np.stack([pos[perm], offset[perm]], axis=1)  # N_w, 2

    def global_rows(self, step: int) -> np.ndarray:
        """Step `step` (0-based, counted over all epochs) -> its global batch as (file, row) pairs, G x 2."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order, starts = self._epoch(epoch)
        a, b = i * self.global_batch, (i + 1) * self.global_batch
        parts = []
        for w in range(int(np.searchsorted(starts, a, side="right")) - 1, len(starts) - 1):
            if starts[w] >= b:
                break
            rows = self._window(epoch, w)
            parts.append(rows[max(a, starts[w]) - starts[w]:min(b, starts[w + 1]) - starts[w]])
        picked = np.concatenate(parts)
        picked = picked[np.lexsort((picked[:, 1], picked[:, 0]))]  # by chunk position, then row
        chunk = self.chunks[order[picked[:, 0]]]
        return np.stack([chunk[:, 0], chunk[:, 1] + picked[:, 1]], axis=1)

    def worker_rows(self, step: int, rank: int, world: int) -> np.ndarray:
        per = self.global_batch // world
        return self.global_rows(step)[rank * per:(rank + 1) * per]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


# -- reading and decoding -----------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """What a loader needs besides the plan (small and picklable: it travels to every loader actor)."""
    manifest: str
    s3: S3Options
    files: tuple[str, ...]
    image_size: int
    context_length: int
    crop_scale: tuple[float, float]
    seed: int
    # Decoded row groups a loader keeps (reads of neighbouring steps hit the same chunks).
    cache_row_groups: int = 64


class SliceLoader:
    """A Ray actor: reads, decodes, augments and tokenises one worker's slice of a step. Keeps the row
    groups it read (LRU), since a window's steps keep coming back to the same chunks."""

    def __init__(self, spec: InputSpec, plan: SamplePlan) -> None:
        self.spec, self.plan = spec, plan
        self.storage = Storage.from_uri(spec.manifest, spec.s3)
        self._open_files: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._starts: dict[int, np.ndarray] = {}
        self._groups: collections.OrderedDict[tuple[int, int], Any] = collections.OrderedDict()

    def ready(self) -> bool:
        load_tokenizer()
        return True

    def _open(self, f: int):
        """File f's ParquetFile (a few stay open) and the first row of each of its row groups."""
        import pyarrow.parquet as pq

        if f in self._open_files:
            self._open_files.move_to_end(f)
            return self._open_files[f], self._starts[f]
        pf = pq.ParquetFile(self.storage.open_input(self.spec.files[f]))
        if f not in self._starts:
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
            self._starts[f] = np.concatenate([[0], np.cumsum(sizes)])
        self._open_files[f] = pf
        while len(self._open_files) > 16:
            self._open_files.popitem(last=False)
        return pf, self._starts[f]

    def _row_group(self, f: int, g: int):
        table = self._groups.get((f, g))
        if table is not None:
            self._groups.move_to_end((f, g))
            return table
        table = self._open(f)[0].read_row_group(g, columns=READ_COLUMNS)
        self._groups[(f, g)] = table
        while len(self._groups) > self.spec.cache_row_groups:
            self._groups.popitem(last=False)
        return table

    def _take(self, rows: np.ndarray) -> tuple[list[str], list[bytes], list[str]]:
        keys, images, captions = [], [], []
        for f, r in rows.tolist():
            starts = self._starts[f] if f in self._starts else self._open(f)[1]
            g = int(np.searchsorted(starts, r, side="right")) - 1
            table, i = self._row_group(f, g), r - int(starts[g])
            keys.append(table.column("key")[i].as_py())
            images.append(table.column("image")[i].as_py())
            captions.append(table.column("caption")[i].as_py())
        return keys, images, captions

    def load(self, step: int, rank: int, world: int) -> dict[str, np.ndarray]:
        from clip_model.transforms import TrainTransform

        start = time.perf_counter()
        keys, images, captions = self._take(self.plan.worker_rows(step, rank, world))
        epoch, s = self.plan.epoch_of(step), self.spec
        # NumPy throughout: a loader never imports torch (~1.5 s of CPU per loader process).
        pixels = np.stack([TrainTransform(s.image_size, scale=tuple(s.crop_scale),
                                          seed=sample_seed(s.seed, epoch, k)).array(img)
                           for k, img in zip(keys, images)])  # B, 3, S, S
        tokens = load_tokenizer().token_array([str(c) for c in captions], context_length=s.context_length)  # B, ctx
        return {"step": np.int64(step), "key": np.asarray(keys), "image": pixels.astype(np.float32, copy=False),
                "tokens": tokens.astype(np.int64, copy=False), "load_s": np.float64(time.perf_counter() - start)}


class StepFeeder:
    """One worker's input from `start` to `stop`: `prefetch` steps in flight on `loaders` actors, handed
    over in step order. The actors belong to this worker (they die with it, e.g. on a resize). With
    `loaders` 0 one SliceLoader runs on a thread of the worker itself: no process to start per worker (2-3
    CPU-s each on a 2-core machine), for CPU runs whose decode keeps up beside the step."""

    def __init__(self, spec: InputSpec, plan: SamplePlan, rank: int, world: int, start: int, stop: int,
                 loaders: int, cpus: float, prefetch: int, resources: dict[str, float] | None = None) -> None:
        import ray

        if loaders == 0:
            from concurrent.futures import ThreadPoolExecutor

            self.thread = ThreadPoolExecutor(1, thread_name_prefix="slice-loader")
            self.actors = []
            self.local = SliceLoader(spec, plan)
        else:
            actor = ray.remote(SliceLoader).options(num_cpus=cpus, resources=resources or {},
                                                    scheduling_strategy="SPREAD" if loaders > 1 else "DEFAULT")
            self.thread, self.local = None, None
            self.actors = [actor.remote(spec, plan) for _ in range(loaders)]
        self.rank, self.world, self.next_step, self.stop = rank, world, start, stop
        self.prefetch = max(1, prefetch)
        self.pending: collections.deque = collections.deque()
        self._fill()

    def _fill(self) -> None:
        while len(self.pending) < self.prefetch and self.next_step < self.stop:
            if self.thread is not None:
                job = self.thread.submit(self.local.load, self.next_step, self.rank, self.world)
            else:
                # Consecutive steps share windows and so chunks: keep runs of steps on one actor.
                actor = self.actors[(self.next_step // 4) % len(self.actors)]
                job = actor.load.remote(self.next_step, self.rank, self.world)
            self.pending.append((self.next_step, job))
            self.next_step += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import ray

        while self.pending:
            step, job = self.pending.popleft()
            self._fill()
            batch = job.result() if self.thread is not None else ray.get(job)
            assert int(batch["step"]) == step, (int(batch["step"]), step)
            yield batch

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        if self.thread is not None:
            self.thread.shutdown(wait=False, cancel_futures=True)
        self.actors, self.pending = [], collections.deque()
