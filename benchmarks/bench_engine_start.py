"""What a training worker pays before its first step: the CPU of a fresh process that imports DeepSpeed, builds
the training loop's ZeRO engine (tiny-vit, AdamW, 1 process, gloo) and takes one step.

Four ways, in fresh processes, their order rotated round by round:
- plain: `import deepspeed`, as DeepSpeed's own examples do.
- no-mlflow: mlflow hidden from the autotuner's import only (what `import_deepspeed` did before the Muon part).
- torch-adamw: `pipelines.train.ds_import.import_deepspeed` (mlflow hidden from the autotuner's import; the Muon
  kernels' `torch.compile` deferred to their first call, so TorchInductor is not imported), and torch's own
  AdamW, whose methods import TorchDynamo on their first call.
- ours: the same import and `clip_model.optim.AdamW`, which does not import TorchDynamo (what training runs).
All build the same engine and take the same step; all but torch-adamw use `clip_model.optim.adamw`. CPU is the
child's user + system time (getrusage), so the interpreter's start-up and every import count.

Run: .venv/bin/python -m benchmarks.bench_engine_start --rounds 6
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

from benchmarks.spread import spread, write_report

CHILD = r"""
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, torch.distributed as dist
if sys.argv[1] in ("ours", "torch-adamw"):
    from pipelines.train.ds_import import import_deepspeed
    deepspeed = import_deepspeed()
elif sys.argv[1] == "no-mlflow":
    sys.modules["mlflow"] = None
    import deepspeed
    del sys.modules["mlflow"]
else:
    import deepspeed
from clip_model import build_loss, build_model, get_config
from clip_model.optim import adamw, param_groups
from pipelines.train.loop import ContrastiveModel, skip_shm_comm_op
skip_shm_comm_op()
dist.init_process_group("gloo", rank=0, world_size=1)
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
cfg = get_config("tiny-vit")
model = ContrastiveModel(build_model(cfg), build_loss("clip"))
conf = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9, "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True}
if sys.argv[1] == "torch-adamw":
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=True)
else:
    optimizer = adamw(model, 1e-3, 0.1)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=conf)
images = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size)
tokens = torch.randint(0, cfg.text.vocab_size, (4, cfg.text.context_length))
loss, _ = engine(images, tokens)
engine.backward(loss)
engine.step()
print("modules", len(sys.modules), "inductor", sum(m.startswith("torch._inductor") for m in sys.modules),
      "mlflow", "mlflow" in sys.modules, "dynamo", "torch._dynamo" in sys.modules)
"""


def run_once(mode: str) -> dict:
    from pipelines.core.ports import free_ports

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(free_ports(1)[0])], capture_output=True, text=True,
                       timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{r.stderr[-3000:]}")
    words = r.stdout.split()[-8:]
    return {"mode": mode, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "modules": int(words[1]), "inductor_modules": int(words[3]), "mlflow": words[5] == "True",
            "dynamo": words[7] == "True"}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    modes = ["plain", "no-mlflow", "torch-adamw", "ours"]
    rows = []
    for i in range(args.rounds):
        order = modes[i % len(modes):] + modes[:i % len(modes)]
        by = {m: run_once(m) for m in order}
        rows += by.values()
        print(f"round {i + 1}: " + ", ".join(f"{m} {by[m]['cpu_s']:.2f} s" for m in modes), flush=True)
    cpu = {m: [r["cpu_s"] for r in rows if r["mode"] == m] for m in modes}
    stats = {m: spread(cpu[m]) for m in modes}
    ratio = {m: spread([o / p for o, p in zip(cpu["ours"], cpu[m])]) for m in modes[:-1]}
    last = {r["mode"]: r for r in rows}
    lines = [f"# A training worker's start: import DeepSpeed, build a ZeRO-2 engine (tiny-vit), one step; {args.rounds} "
             "rounds, fresh processes, order rotated", "",
             f"Machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} after.", "",
             "| mode | mean CPU s | median | p90 | max | modules loaded | TorchInductor modules | mlflow imported | "
             "TorchDynamo imported |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        s, r = stats[mode], last[mode]
        lines.append(f"| {mode} | {s['mean']:.2f} | {s['median']:.2f} | {s['p90']:.2f} | {s['max']:.2f} | {r['modules']} | "
                     f"{r['inductor_modules']} | {r['mlflow']} | {r['dynamo']} |")
    lines.append("")
    for base, r in ratio.items():
        lines.append(f"- ours / {base}, round by round: mean {r['mean']:.3f}, median {r['median']:.3f}, worst {r['max']:.3f}; "
                     f"CPU saved per process: mean {stats[base]['mean'] - stats['ours']['mean']:.2f} s.")
    write_report(args.out, "bench_engine_start", lines, {"rounds": rows, "stats": stats, "ratio_of_ours_to": ratio})


if __name__ == "__main__":
    main()
