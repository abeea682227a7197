"""Training throughput: the full Ray Train + DeepSpeed + Ray Data path against a bare single-process
PyTorch loop of the same model and global batch, 1 vs 2 workers, and model FLOP utilisation (MFU)
against a torch.matmul peak measured on this machine, all in one run.

- bare loop: pre-decoded tensors in memory, torch AdamW, the same ClipLoss, no Ray, no DeepSpeed:
  the compute-only ceiling for this model and batch with all of torch's threads.
- bare pairs: two 1-thread bare loops at once on half the batch each, without any communication (the
  cores' ceiling for 1 -> 2) and in lockstep as plain data parallel over gloo (global-batch loss, one flat
  gradient all-reduce per step: the ceiling of any synchronous data-parallel trainer on this machine).
- full path: `pipelines.train.run_training` on generated shards (read + decode + augment + tokenise in
  each worker's loader actors, ZeRO-2, gloo), several epochs so that epoch boundaries are inside the
  measurement. Rates: over all steps after the first (data waits and epoch starts included), the
  median step, and end to end (steps x batch / driver wall time); start-up (to the first batch) is
  printed apart, and the data wait per step as mean, p99 and max.
- FLOPs per step: torch's FlopCounterMode over one forward + backward of the global batch
  (2 FLOPs per multiply-add, attention on SDPA's math path so it is counted).

Run: .venv/bin/python -m benchmarks.bench_train [--model small-vit] [--batch 64] [--rows 512] [--steps 200]
     .venv/bin/python -m benchmarks.bench_train --model ViT-B/32 --batch 32 --rows 128 --steps 20 --bare-steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clip_model import build_loss, build_model, get_config
from clip_model.optim import adamw, param_groups


def matmul_peak_gflops(n: int = 1024, reps: int = 20, trials: int = 5) -> float:
    """Best fp32 GEMM rate over a few trials (the machine is shared: take the least disturbed)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def synthetic_batch(model_name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = get_config(model_name)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tokens = torch.randint(1, 49000, (batch, cfg.text.context_length), generator=g)
    tokens[:, -1] = 49407  # EOT
    return images, tokens


def step_flops(model_name: str, batch: int) -> int:
    model = build_model(get_config(model_name))
    images, tokens = synthetic_batch(model_name, batch)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        img, txt, scale = model(images, tokens)
        build_loss("clip")(img, txt, scale).backward()
    return counter.get_total_flops()


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """Plain synchronous data parallel's exchange: every gradient, flattened into one buffer, all-reduced over
    the default process group and averaged in place (what DDP does, without its buckets)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def bare_loop(model_name: str, batch: int, steps: int, threads: int, optimizer: str = "fused",
              exchange: tuple[int, int] | None = None) -> dict:
    """optimizer "fused": the training loop's own (clip_model.optim.adamw); "default": torch.optim.AdamW with
    its defaults on the same groups, the loop a user writes first (per-tensor kernels on CPU).

    exchange=(rank, world): plain data parallel over the gloo group the caller set up, what any synchronous
    data-parallel trainer must do at least: the loss over the global batch (embeddings gathered, as
    clip_model.loss does for the training loop) and one all-reduce of all gradients, flattened, per step."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(get_config(model_name))
    opt = adamw(model, 1e-3, 0.1) if optimizer == "fused" else torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    loss_fn = build_loss("clip", world_size=exchange[1], rank=exchange[0]) if exchange else build_loss("clip")
    images, tokens = synthetic_batch(model_name, batch)
    times = []
    for _ in range(steps + 1):
        if exchange:
            dist.barrier()  # each step starts together, as synchronous workers do
        start = time.perf_counter()
        img, txt, scale = model(images, tokens)
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if exchange:
            average_gradients(model, exchange[1])
        opt.step()
        times.append(time.perf_counter() - start)
    # The first step pays allocator and kernel warm-up; the median resists the shared machine's spikes.
    steady = statistics.median(times[1:])
    return {"threads": threads, "optimizer": optimizer, "steps": steps, "step_s": steady, "samples_per_s": batch / steady}


def _bare_process(model_name: str, batch: int, steps: int, ready, start, out, rank: int = 0,
                  gloo_port: int | None = None) -> None:
    exchange = None
    if gloo_port is not None:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank, world_size=2)
        exchange = (rank, 2)
    ready.put(True)  # imported: torch and the model code are loaded
    start.wait()
    out.put(bare_loop(model_name, batch, steps, 1, exchange=exchange))


def bare_pair(model_name: str, batch: int, steps: int, exchange: bool = False) -> dict:
    """This machine's own ceiling for 1 -> 2 workers: two processes of 1 thread each, started together, each
    running the bare loop on half the global batch (what each of 2 workers computes).

    exchange=False: no communication at all, the ceiling of the cores alone. exchange=True: plain synchronous
    data parallel over gloo (the global-batch loss and one flat all-reduce of the gradients per step, no
    DeepSpeed, no Ray, no loaders): the ceiling for any trainer that exchanges gradients every step on this
    machine. Their summed rate over the 1-thread bare loop on the whole batch is the most 2 x 1 can gain
    here; on 2 cores both processes share the memory bandwidth and the turbo budget."""
    import multiprocessing as mp

    from pipelines.core.ports import free_ports

    ctx = mp.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    port = free_ports(1)[0] if exchange else None
    procs = [ctx.Process(target=_bare_process, args=(model_name, batch // 2, steps, ready, start, out, rank, port))
             for rank in range(2)]
    for p in procs:
        p.start()
    for _ in procs:  # both imported and waiting, so both loops start together
        ready.get(timeout=600)
    start.set()
    runs = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    # With exchange both processes step in lockstep; the slower one sets the pace of the pair.
    rate = 2 * min(r["samples_per_s"] for r in runs) if exchange else sum(r["samples_per_s"] for r in runs)
    return {"processes": 2, "batch_each": batch // 2, "exchange": exchange, "step_s": [r["step_s"] for r in runs],
            "samples_per_s": rate}


def full_path(model_name: str, batch: int, workers: int, shards: str, steps: int, root: str) -> dict:
    from pipelines.train.config import OptimConfig, TrainConfig, TrainDataConfig
    from pipelines.train.stage import resolve_paths, run_training

    cfg = resolve_paths(TrainConfig(
        model=model_name, global_batch_size=batch, max_steps=steps, zero_stage=2, optim=OptimConfig(lr=1e-3),
        checkpoint_every=10**6, keep_checkpoints=1, storage_path=root, run_name=f"bench-{model_name.replace('/', '')}-{workers}w",
        num_workers=workers, cpus_per_worker=1.0, log_every=10**6,
        data=TrainDataConfig(manifest=shards, chunk_rows=64, loader_num_cpus=0.5, prefetch_steps=4)))
    summary = run_training(cfg)
    history = [json.loads(line) for line in Path(root, cfg.run_name, "metrics.jsonl").read_text().splitlines()]
    rest = history[1:]  # the first step includes DeepSpeed's, the loaders' and the allocator's warm-up
    waits = sorted(h["data_wait_ms"] for h in rest)
    train_s = sum(h["step_s"] for h in history)
    return {"workers": workers, "steps": summary["steps"],
            "samples_per_s": batch * len(rest) / sum(h["step_s"] for h in rest),
            "median_step_samples_per_s": batch / statistics.median(h["step_s"] for h in rest),
            "mean_data_wait_ms": statistics.mean(waits), "p99_data_wait_ms": waits[min(len(waits) - 1, int(0.99 * len(waits)))],
            "max_data_wait_ms": waits[-1],
            "startup_s": summary["startup"].get("first_batch_s"), "engine_s": summary["startup"].get("engine_s"),
            "outside_steps_s": summary["driver_wall_s"] - train_s,
            "wall_s": summary["driver_wall_s"], "end_to_end_samples_per_s": summary["steps"] * batch / summary["driver_wall_s"]}


def _rate(x: float) -> str:
    """A samples/s figure with three significant digits at least (ViT-B/32 runs at 1-4 samples/s here)."""
    return f"{x:.1f}" if x >= 100 else f"{x:.2f}" if x >= 10 else f"{x:.3f}"


def write_report(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    tag = result["model"].replace("/", "")
    with open(os.path.join(out, f"bench_train_{tag}.json"), "w") as f:
        json.dump(result, f, indent=2)
    peak = result["matmul_peak_gflops"]
    lines = [
        f"# Training throughput: {result['model']} at {result['image_size']} px, global batch {result['global_batch']}, "
        f"{result['full'][0]['steps']} steps ({result['rows']} rows: {result['steps_per_epoch']} steps per epoch)",
        "",
        f"Machine: {result['cpus']} CPUs, load average {result['load_average_before']} before / "
        f"{result['load_average_after']} after (shared with other jobs). Matmul peak (fp32 1024^3 GEMM, "
        f"{result['threads']} threads): {peak:.1f} GFLOP/s, 1 thread: {result['matmul_peak_1t_gflops']:.1f}. "
        f"FLOPs per step (fwd+bwd): {result['flops_per_step'] / 1e9:.2f} GFLOP.",
        "",
        "| path | workers x threads | samples/s (all steps after the 1st) | samples/s (median step) "
        "| samples/s (end to end) | data wait ms (mean / p99 / max) | start-up s (to 1st batch) | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in result["bare"]:
        peak_b = result["matmul_peak_1t_gflops"] if b["threads"] == 1 else peak
        what = "fused AdamW (the training optimizer)" if b["optimizer"] == "fused" else "torch.optim.AdamW defaults"
        lines.append(f"| bare PyTorch loop, tensors in memory, {what} | 1 x {b['threads']} | - | {_rate(b['samples_per_s'])} | - | - | - "
                     f"| {b['flops_per_s'] / 1e9 / peak_b:.1%} of {b['threads']}-thread peak |")
    pair = result["bare_pair"]
    lines.append(f"| two bare loops at once (fused AdamW), each on half the batch, no gradient exchange | 2 x 1 | - | "
                 f"{_rate(pair['samples_per_s'])} | - | - | - | - |")
    pair_x = result["bare_pair_exchange"]
    lines.append(f"| two bare loops in lockstep, plain data parallel over gloo (global-batch loss, one gradient "
                 f"all-reduce per step) | 2 x 1 | - | {_rate(pair_x['samples_per_s'])} | - | - | - | - |")
    for r in result["full"]:
        peak_r = result["matmul_peak_1t_gflops"] * r["workers"]
        lines.append(f"| Ray Train + DeepSpeed ZeRO-2 + loaders | {r['workers']} x 1 | {_rate(r['samples_per_s'])} | "
                     f"{_rate(r['median_step_samples_per_s'])} | {_rate(r['end_to_end_samples_per_s'])} | "
                     f"{r['mean_data_wait_ms']:.1f} / {r['p99_data_wait_ms']:.1f} / {r['max_data_wait_ms']:.1f} | "
                     f"{r['startup_s']:.1f} | {r['flops_per_s'] / 1e9 / peak_r:.1%} of {r['workers']} x 1-thread peak |")
    ratios = result["ratios"]
    lines += ["", f"Full path 1 worker x 1 thread / bare loop 1 thread: {ratios['full1_vs_bare1']:.2f} (goal >= 0.9; same "
              f"optimizer), {ratios['full1_vs_bare1_default_adamw']:.2f} against the bare loop with torch's default AdamW. "
              f"2 workers / 1 worker: {ratios['scaling_1_to_2']:.2f} (goal >= 1.7), against this machine's own "
              f"ceiling of {ratios['machine_1_to_2']:.2f} (two 1-thread bare loops at once, each on half the batch, "
              f"no gradient exchange: {_rate(result['bare_pair']['samples_per_s'])} samples/s together), and "
              f"{ratios['exchange_1_to_2']:.2f} for plain data parallel with the gradient all-reduce every "
              f"synchronous trainer needs; the full path reaches {ratios['full2_vs_exchange_pair']:.2f} of that pair. "
              f"Full path 2 x 1 / bare loop {result['threads']} threads: {ratios['full2_vs_bare_all']:.2f}.",
              "Rates over all steps after the first include every data wait and every epoch boundary. Each Ray "
              "Train worker runs 1 torch thread (1 CPU); its loader actor holds 0.5 CPU on the same 2 cores."]
    with open(os.path.join(out, f"bench_train_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small-vit")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--bare-steps", type=int, default=10)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()

    import ray

    from pipelines.core.storage import Storage
    from tests.test_train import write_shards

    load = os.getloadavg()[0]
    threads = torch.get_num_threads()
    peak = matmul_peak_gflops()
    torch.set_num_threads(1)
    peak_1t = matmul_peak_gflops(reps=5)
    torch.set_num_threads(threads)
    flops = step_flops(args.model, args.batch)
    bare = [bare_loop(args.model, args.batch, args.bare_steps, t) for t in sorted({1, threads})]
    bare.append(bare_loop(args.model, args.batch, args.bare_steps, 1, optimizer="default"))
    pair = bare_pair(args.model, args.batch, args.bare_steps)
    pair_exchange = bare_pair(args.model, args.batch, args.bare_steps, exchange=True)
    torch.set_num_threads(threads)
    for b in bare:
        b["flops_per_s"] = flops / b["step_s"]
    size = get_config(args.model).vision.image_size
    with tempfile.TemporaryDirectory() as tmp:
        shards = str(Path(tmp, "shards"))
        write_shards(Storage.from_uri(shards), args.rows, px=size, row_group_size=64)
        ray.init(num_cpus=6, include_dashboard=False, runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}},
                 _system_config={"enable_metrics_collection": False})
        try:
            full = [full_path(args.model, args.batch, int(w), shards, args.steps, str(Path(tmp, "runs")))
                    for w in args.workers.split(",")]
        finally:
            ray.shutdown()
    for r in full:
        r["flops_per_s"] = flops * r["samples_per_s"] / args.batch
    bare1 = next(b for b in bare if b["threads"] == 1 and b["optimizer"] == "fused")
    bare1_default = next(b for b in bare if b["optimizer"] == "default")
    bare_all = next(b for b in bare if b["threads"] == threads and b["optimizer"] == "fused")
    rate = {r["workers"]: r["samples_per_s"] for r in full}
    result = {"model": args.model, "image_size": size, "global_batch": args.batch, "rows": args.rows,
              "steps_per_epoch": args.rows // args.batch, "cpus": os.cpu_count(), "threads": threads,
              "load_average_before": round(load, 1), "load_average_after": round(os.getloadavg()[0], 1),
              "matmul_peak_gflops": peak, "matmul_peak_1t_gflops": peak_1t, "flops_per_step": flops,
              "bare": bare, "bare_pair": pair, "bare_pair_exchange": pair_exchange, "full": full,
              "ratios": {"full1_vs_bare1": rate.get(1, float("nan")) / bare1["samples_per_s"],
                         "machine_1_to_2": pair["samples_per_s"] / bare1["samples_per_s"],
                         "exchange_1_to_2": pair_exchange["samples_per_s"] / bare1["samples_per_s"],
                         "full2_vs_exchange_pair": rate.get(2, float("nan")) / pair_exchange["samples_per_s"],
                         "full1_vs_bare1_default_adamw": rate.get(1, float("nan")) / bare1_default["samples_per_s"],
                         "scaling_1_to_2": rate.get(2, float("nan")) / rate.get(1, float("nan")),
                         "full2_vs_bare_all": rate.get(2, float("nan")) / bare_all["samples_per_s"]}}
    write_report(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
