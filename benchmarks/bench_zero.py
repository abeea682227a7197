"""What DeepSpeed's ZeRO stages cost per step against plain data parallel: 2 processes x 1 thread over gloo,
no Ray and no loaders, one synthetic batch held in memory (so only the engine differs between rows).

Modes (each a fresh pair of processes):
- local: each process trains on its half alone (loss over its own half, no communication): the cores' ceiling.
- plain: the global-batch loss (embeddings gathered, as the training loop does) and one flat all-reduce of the
  gradients per step, then torch's fused AdamW: plain synchronous data parallel, the least any trainer pays.
- zero0 / zero1 / zero2: the training loop's ContrastiveModel under deepspeed.initialize with that stage and the
  loop's own settings (fused AdamW as client optimizer, gradient clipping 1.0), gloo.
Extra ZeRO keys for every zero mode: --zero-extra '{"contiguous_gradients": false}'.

Run: .venv/bin/python -m benchmarks.bench_zero --model ViT-B/32 --batch 32 --steps 4
     .venv/bin/python -m benchmarks.bench_zero --model small-vit --batch 64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, mode: str, model_name: str, batch: int, steps: int, port: int, zero_extra: dict, out) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from benchmarks.bench_train import average_gradients, synthetic_batch
    from clip_model import build_loss, build_model, get_config
    from clip_model.optim import adamw
    from pipelines.train.ds_import import import_deepspeed
    from pipelines.train.loop import ContrastiveModel, skip_shm_comm_op

    torch.manual_seed(0)
    images, tokens = synthetic_batch(model_name, batch // 2)
    loss = build_loss("clip") if mode == "local" else build_loss("clip", world_size=2, rank=rank)
    model = ContrastiveModel(build_model(get_config(model_name)), loss)
    opt = adamw(model, 1e-4, 0.1)
    if mode in ("local", "plain"):
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            model(images, tokens)[0].backward()
            if mode == "plain":
                average_gradients(model, 2)
            opt.step()
    else:
        deepspeed = import_deepspeed()
        skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend="gloo")
        conf = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch // 2,
                "gradient_accumulation_steps": 1, "zero_optimization": {"stage": int(mode[-1]), **zero_extra},
                "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "gradient_clipping": 1.0}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=conf)

        def step() -> None:
            loss_value, _ = engine(images, tokens)
            engine.backward(loss_value)
            engine.step()
    times = []
    for _ in range(steps + 2):  # the first two pay allocator and kernel warm-up
        dist.barrier()  # lockstep, as synchronous workers are
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.put(times[2:])
    dist.destroy_process_group()


def run_mode(mode: str, model_name: str, batch: int, steps: int, zero_extra: dict) -> dict:
    from pipelines.core.ports import free_ports

    out = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(mode, model_name, batch, steps, free_ports(1)[0], zero_extra, out), nprocs=2)
    times = out.get()
    return {"mode": mode, "steps": len(times), "median_step_s": statistics.median(times),
            "mean_step_s": statistics.mean(times), "max_step_s": max(times),
            "samples_per_s": batch / statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small-vit")
    ap.add_argument("--batch", type=int, default=64, help="global batch (each process computes half)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default="local,plain,zero0,zero1,zero2")
    ap.add_argument("--zero-extra", default="{}", help="JSON merged into zero_optimization for the zero modes")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    extra = json.loads(args.zero_extra)
    rows = [run_mode(m, args.model, args.batch, args.steps, extra) for m in args.modes.split(",")]
    plain = next((r for r in rows if r["mode"] == "plain"), None)
    lines = [f"# ZeRO stages vs plain data parallel: {args.model}, global batch {args.batch}, 2 processes x 1 thread, "
             f"gloo, {args.steps} steps, no Ray", "",
             f"Machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} after. ZeRO extra keys: {extra}.", "",
             "| mode | median step s | mean step s | max step s | samples/s (median) | step / plain |", "|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['median_step_s'] / plain['median_step_s']:.3f}" if plain else "-"
        lines.append(f"| {r['mode']} | {r['median_step_s']:.3f} | {r['mean_step_s']:.3f} | {r['max_step_s']:.3f} | "
                     f"{r['samples_per_s']:.3f} | {rel} |")
    os.makedirs(args.out, exist_ok=True)
    tag = args.model.replace("/", "")
    with open(os.path.join(args.out, f"bench_zero_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"bench_zero_{tag}.json"), "w") as f:
        json.dump({"model": args.model, "batch": args.batch, "zero_extra": extra, "rows": rows}, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
