"""What a local Ray's workers cost to start, with and without a job-level runtime env.

A command's local Ray (`pipelines.core.runtime.init_ray` without a cluster address) used to pass
`runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}` to ray.init. Any runtime env, env_vars alone
included, makes the raylet start each worker as `python setup_worker.py ...`, which imports Ray, then execs
`python default_worker.py ...`, which imports Ray again. Now the variable reaches the workers by inheritance.

Two ways, each round in fresh processes, their order rotated round by round:
- ours: `init_ray(RayConfig(num_cpus=4, dashboard=False))`, what a command runs (and the tests' shared Ray).
- runtime-env: the same ray.init arguments plus the runtime env above (what init_ray did before).
Each child starts its Ray, runs 4 one-second tasks at once (4 new workers) and reports the workers' CPU (user +
system of each worker process, Ray's double start included: exec keeps the process) and the wall time from
submitting them to their results. Both check that the variable reaches every worker.

Run: .venv/bin/python -m benchmarks.bench_ray_workers --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.spread import spread, write_report

CHILD = r"""
import json, os, sys, time
import psutil, ray
from pipelines.core.runtime import RayConfig, init_ray, local_system_config
os.environ.pop("RAY_ADDRESS", None)
if sys.argv[1] == "ours":
    init_ray(RayConfig(num_cpus=4, dashboard=False))
else:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}, _system_config=local_system_config(4))

@ray.remote(num_cpus=1)
def task():
    time.sleep(1)
    return os.getpid(), os.environ.get("NO_ALBUMENTATIONS_UPDATE")

start = time.perf_counter()
out = ray.get([task.remote() for _ in range(4)])
wall = time.perf_counter() - start
pids = sorted({p for p, _ in out})
cpu = [sum(psutil.Process(p).cpu_times()[:2]) for p in pids]
print(json.dumps({"workers": len(pids), "cpu_per_worker_s": sum(cpu) / len(cpu), "wall_s": wall,
                  "env": sorted({e for _, e in out}, key=str)}))
ray.shutdown()
"""


def run_once(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "NO_ALBUMENTATIONS_UPDATE")}
    r = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{r.stderr[-3000:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    if row["env"] != ["1"]:
        raise SystemExit(f"{mode}: NO_ALBUMENTATIONS_UPDATE did not reach every worker: {row['env']}")
    return {"mode": mode, **row}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    modes = ["ours", "runtime-env"]
    rows = []
    for i in range(args.rounds):
        order = modes[i % 2:] + modes[:i % 2]
        by = {m: run_once(m) for m in order}
        rows += by.values()
        print(f"round {i + 1}: " + ", ".join(f"{m} {by[m]['cpu_per_worker_s']:.2f} CPU s/worker, {by[m]['wall_s']:.2f} s"
                                             for m in modes), flush=True)
    stats = {m: {k: spread([r[k] for r in rows if r["mode"] == m]) for k in ("cpu_per_worker_s", "wall_s")}
             for m in modes}
    ratio = {k: spread([o[k] / b[k] for o, b in zip([r for r in rows if r["mode"] == "ours"],
                                                    [r for r in rows if r["mode"] == "runtime-env"])])
             for k in ("cpu_per_worker_s", "wall_s")}
    lines = [f"# A local Ray's first 4 workers, with and without a job-level runtime env; {args.rounds} rounds, fresh "
             "processes, order rotated", "", f"Machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} after.",
             "", "| mode | CPU s per worker: mean | median | max | wall s to 4 results: mean | median | max |",
             "|---|---|---|---|---|---|---|"]
    for m in modes:
        c, w = stats[m]["cpu_per_worker_s"], stats[m]["wall_s"]
        lines.append(f"| {m} | {c['mean']:.2f} | {c['median']:.2f} | {c['max']:.2f} | {w['mean']:.2f} | {w['median']:.2f} | "
                     f"{w['max']:.2f} |")
    lines += ["", f"- ours / runtime-env, round by round: CPU per worker mean {ratio['cpu_per_worker_s']['mean']:.3f} "
                  f"(worst {ratio['cpu_per_worker_s']['max']:.3f}); wall mean {ratio['wall_s']['mean']:.3f} "
                  f"(worst {ratio['wall_s']['max']:.3f})."]
    write_report(args.out, "bench_ray_workers", lines, {"rounds": rows, "stats": stats, "ratio_of_ours_to_runtime_env": ratio})


if __name__ == "__main__":
    main()
