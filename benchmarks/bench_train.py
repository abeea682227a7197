"""Training throughput: the full Ray Train + DeepSpeed + Ray Data path against a bare single-process
PyTorch loop of the same model and global batch, 1 vs 2 workers, and model FLOP utilisation (MFU)
against a torch.matmul peak measured on this machine, all in one run.

- bare loop: pre-decoded tensors in memory, torch AdamW, the same ClipLoss, no Ray, no DeepSpeed:
  the compute-only ceiling for this model and batch with all of torch's threads.
- full path: `pipelines.train.run_training` on generated shards (decode + augment + tokenise in Ray
  Data, ZeRO-2, gloo). Two rates: the steady step rate (mean over steps after the first, what
  the loop measures) and end to end (steps x batch / driver wall time, start-up included).
- FLOPs per step: torch's FlopCounterMode over one forward + backward of the global batch
  (2 FLOPs per multiply-add, attention on SDPA's math path so it is counted).

Run: .venv/bin/python -m benchmarks.bench_train [--model small-vit] [--batch 64] [--rows 256] [--out benchmarks/out]
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
from clip_model.optim import param_groups


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


def bare_loop(model_name: str, batch: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(get_config(model_name))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    loss_fn = build_loss("clip")
    images, tokens = synthetic_batch(model_name, batch)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        img, txt, scale = model(images, tokens)
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    # The first step pays allocator and kernel warm-up; the median resists the shared machine's spikes.
    steady = statistics.median(times[1:])
    return {"threads": threads, "steps": steps, "step_s": steady, "samples_per_s": batch / steady}


def full_path(model_name: str, batch: int, workers: int, shards: str, epochs: int, root: str) -> dict:
    from pipelines.train.config import OptimConfig, TrainConfig, TrainDataConfig
    from pipelines.train.stage import resolve_paths, run_training

    cfg = resolve_paths(TrainConfig(
        model=model_name, global_batch_size=batch, epochs=epochs, zero_stage=2, optim=OptimConfig(lr=1e-3),
        checkpoint_every=10**6, keep_checkpoints=1, storage_path=root, run_name=f"bench-{workers}w",
        num_workers=workers, cpus_per_worker=1.0, log_every=10**6,
        data=TrainDataConfig(manifest=shards, map_batch_size=64, map_num_cpus=0.5)))
    summary = run_training(cfg)
    history = [json.loads(line) for line in Path(root, cfg.run_name, "metrics.jsonl").read_text().splitlines()]
    steps = history[1:]  # the first step includes DeepSpeed's and Ray Data's warm-up
    samples = summary["steps"] * batch
    return {"workers": workers, "steps": summary["steps"],
            # Epoch starts (Ray Data re-executes its plan per epoch) count: this is what training sees.
            "steady_samples_per_s": batch * len(steps) / sum(h["step_s"] for h in steps),
            "median_step_samples_per_s": batch / statistics.median(h["step_s"] for h in steps),
            "mean_data_wait_ms": statistics.mean(h["data_wait_ms"] for h in steps),
            "median_data_wait_ms": statistics.median(h["data_wait_ms"] for h in steps),
            "wall_s": summary["driver_wall_s"], "end_to_end_samples_per_s": samples / summary["driver_wall_s"]}


def write_report(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_train.json"), "w") as f:
        json.dump(result, f, indent=2)
    peak = result["matmul_peak_gflops"]
    lines = [
        f"# Training throughput: {result['model']}, global batch {result['global_batch']}",
        "",
        f"Machine: {result['cpus']} CPUs, load average {result['load_average_before']} before / {result['load_average_after']} after the run "
        "(a shared machine: other jobs ran concurrently). "
        f"Matmul peak (fp32 1024^3 GEMM, all {result['cpus']} cores): {peak:.1f} GFLOP/s. "
        f"FLOPs per step (fwd+bwd): {result['flops_per_step'] / 1e9:.2f} GFLOP.",
        "",
        "| path | workers | samples/s (steady) | samples/s (median step) | samples/s (end to end) "
        "| data wait ms/step (mean / median) | MFU (steady) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in result["bare"]:
        lines.append(f"| bare PyTorch loop, tensors in memory, {b['threads']} thread(s) | 1 process | - | "
                     f"{b['samples_per_s']:.1f} | - | - | {b['mfu']:.1%} (median step) |")
    for r in result["full"]:
        lines.append(f"| Ray Train + DeepSpeed ZeRO-2 + Ray Data | {r['workers']} | {r['steady_samples_per_s']:.1f} | "
                     f"{r['median_step_samples_per_s']:.1f} | {r['end_to_end_samples_per_s']:.1f} | "
                     f"{r['mean_data_wait_ms']:.0f} / {r['median_data_wait_ms']:.0f} | {r['mfu']:.1%} |")
    lines += ["", "Steady = all samples / all step time after the first step (data wait included, so epoch "
              "starts count: Ray Data re-executes its plan every epoch); median step = the typical step "
              "inside an epoch; end to end = steps x batch / driver wall time, including Ray, DeepSpeed and "
              "Ray Data start-up. Each Ray Train worker runs 1 torch thread (1 CPU each).",
              f"Scaling 1 -> 2 workers (steady): x{result['scaling_1_to_2']:.2f}."]
    with open(os.path.join(out, "bench_train.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small-vit")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--bare-steps", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()

    import ray

    from pipelines.core.storage import Storage
    from tests.test_train import write_shards

    load = os.getloadavg()[0]
    peak = matmul_peak_gflops()
    flops = step_flops(args.model, args.batch)
    threads = torch.get_num_threads()
    bare = [bare_loop(args.model, args.batch, args.bare_steps, t) for t in sorted({1, threads})]
    torch.set_num_threads(threads)
    for b in bare:
        b["mfu"] = flops / b["step_s"] / (peak * 1e9)
    with tempfile.TemporaryDirectory() as tmp:
        shards = str(Path(tmp, "shards"))
        write_shards(Storage.from_uri(shards), args.rows, px=get_config(args.model).vision.image_size)
        ray.init(num_cpus=6, include_dashboard=False, runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
        try:
            full = [full_path(args.model, args.batch, w, shards, args.epochs, str(Path(tmp, "runs"))) for w in (1, 2)]
        finally:
            ray.shutdown()
    for r in full:
        r["mfu"] = flops * r["steady_samples_per_s"] / args.batch / (peak * 1e9)
    result = {"model": args.model, "global_batch": args.batch, "rows": args.rows, "cpus": os.cpu_count(),
              "load_average_before": round(load, 1), "load_average_after": round(os.getloadavg()[0], 1), "matmul_peak_gflops": peak, "flops_per_step": flops,
              "bare": bare, "full": full,
              "scaling_1_to_2": full[1]["steady_samples_per_s"] / full[0]["steady_samples_per_s"]}
    write_report(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
