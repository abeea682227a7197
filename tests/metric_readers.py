"""Training metrics read back as their own tools read them: TensorBoard's EventAccumulator, and the record
log of a W&B offline run (the file `wandb sync` uploads)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pipelines.core.storage import Storage


def tensorboard_scalars(directory: Path, tag: str = "train/loss") -> dict[int, float]:
    """step -> value as TensorBoard shows it (purged steps of an earlier attempt dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def download(store: Storage, prefix: str, dest: Path) -> Path:
    for name in store.list(prefix):
        (dest / Path(name).relative_to(prefix)).parent.mkdir(parents=True, exist_ok=True)
        (dest / Path(name).relative_to(prefix)).write_bytes(store.read_bytes(name))
    return dest


def wandb_history(run_dir_: Path) -> tuple[str, dict[int, dict]]:
    """(run id, step -> logged values) from an offline run's .wandb file: W&B's LevelDB-style log (7-byte
    file header; records of crc32, little-endian length, type in 32 KiB blocks) of protobuf Records, the
    file `wandb sync` uploads."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir_.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(chunks)
            chunks = b""
    run_id, history = "", {}
    for raw in records:
        r = pb.Record()
        r.ParseFromString(raw)
        if r.WhichOneof("record_type") == "run":
            run_id = r.run.run_id
        elif r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[int(items["_step"])] = items
    return run_id, history


def wandb_logs(run_dir_: Path, tail: int = 3000) -> str:
    """For an assertion message: the offline run's files with their sizes, and the end of W&B's own logs."""
    files = ", ".join(f"{f.relative_to(run_dir_)} ({f.stat().st_size} B)" for f in sorted(run_dir_.rglob("*")) if f.is_file())
    logs = "".join(f"\n== {f.name}\n{f.read_text(errors='replace')[-tail:]}" for f in sorted(run_dir_.glob("logs/debug*.log")))
    return f"files: {files}{logs}"
