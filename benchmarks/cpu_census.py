"""Where a command's CPU goes: run it, sample every process on the machine once a second, and sum CPU time by
what each process is (a Ray actor by its class, a Ray Data operator, Ray's system processes, pytest, ...).

Made for the suite (`python -m benchmarks.cpu_census -- .venv/bin/python -m pytest tests -n 2 --dist loadfile`),
whose time is CPU on a 2-core machine: it says which processes that CPU is spent in. A process born during the
run counts from zero; one that lived before it counts from the first sample. A process that starts and ends
between two samples is missed (short-lived helpers; the summary says how many processes were seen).
Ray renames its workers after they start (`ray::IDLE`, then `ray::ClassName.method`), so a worker is named by
the first title past IDLE that a sample saw. A task worker goes back to `ray::IDLE` after each task, so one that
only ran tasks shorter than the gap between samples counts as "only ever seen idle": that group is an upper
bound on workers that never ran anything.

Run: .venv/bin/python -m benchmarks.cpu_census [--out benchmarks/out] -- COMMAND [ARGS...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time

import psutil

_GROUPS = (  # (group, test on the process's name); the first that matches wins
    ("Ray Train workers", lambda n: n.startswith("ray::RayTrainWorker")),
    ("Ray Train helper actors", lambda n: any(k in n for k in (
        "TrainController", "SynchronizationActor", "DatasetManager", "PlacementGroupCleaner", "PreemptionWatcher",
        "AutoscalingCoordinator")) and n.startswith("ray::")),
    ("training loaders", lambda n: n.startswith("ray::SliceLoader")),
    ("Ray Data actor-pool workers", lambda n: n.startswith("ray::MapWorker")),
    ("Ray workers only ever seen idle", lambda n: n in ("ray::IDLE", "ray worker (untitled)")),
    ("Ray system processes", lambda n: n in ("raylet", "gcs_server", "log_monitor", "dashboard", "dashboard agent",
                                             "runtime env agent", "autoscaler monitor") or
     n.startswith(("ray::_StatsActor", "ray::DashboardAgent", "ray::RuntimeEnvAgent"))),
    ("other Ray tasks and actors", lambda n: n.startswith("ray::")),
)


def _name(p: psutil.Process) -> str | None:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return None
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    line = " ".join(cmd)
    base = os.path.basename(cmd[0])
    if "default_worker.py" in line:
        return "ray worker (untitled)"
    for key, name in (("gcs_server", "gcs_server"), ("log_monitor.py", "log_monitor"), ("dashboard/agent.py", "dashboard agent"),
                      ("dashboard/dashboard.py", "dashboard"), ("runtime_env/agent", "runtime env agent"),
                      ("autoscaler/_private/monitor.py", "autoscaler monitor")):
        if key in line:
            return name
    if base == "raylet":
        return "raylet"
    if any("pytest" in c for c in cmd[:3]) or (base.startswith("python") and cmd[1:3] == ["-u", "-c"]):
        return "pytest (test code and in-process drivers)"  # pytest itself and its xdist workers
    if base.startswith("python") and "-m" in cmd[:-1]:
        return f"python -m {cmd[cmd.index('-m') + 1]}"
    return base


def group_of(name: str) -> str:
    return next((g for g, test in _GROUPS if test(name)), name)


class Census:
    def __init__(self) -> None:
        self.start = time.time()
        self.seen: dict[int, list] = {}  # pid -> [name, CPU at first sample (0 if born during the run), last CPU]
        self.stop = threading.Event()

    def sample(self) -> None:
        for p in psutil.process_iter():
            try:
                t = p.cpu_times()
                cpu = t.user + t.system
                entry = self.seen.get(p.pid)
                if entry is None:
                    name = _name(p)
                    if name is not None:
                        self.seen[p.pid] = [name, 0.0 if p.create_time() >= self.start else cpu, cpu]
                    continue
                entry[2] = cpu
                if entry[0] in ("ray::IDLE", "ray worker (untitled)"):
                    entry[0] = _name(p) or entry[0]
            except psutil.Error:
                continue

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(1.0)

    def summary(self) -> dict:
        by_name: collections.Counter = collections.Counter()
        by_group: collections.Counter = collections.Counter()
        procs: collections.Counter = collections.Counter()
        for name, first, last in self.seen.values():
            used = max(0.0, last - first)
            by_name[name] += used
            by_group[group_of(name)] += used
            procs[group_of(name)] += 1
        total = sum(by_group.values())
        return {"wall_s": round(time.time() - self.start, 1), "cpu_s": round(total, 1), "processes": len(self.seen),
                "groups": [{"group": g, "cpu_s": round(v, 1), "share": round(v / total, 3) if total else 0.0,
                            "processes": procs[g]} for g, v in by_group.most_common()],
                "top_names": [{"name": n, "cpu_s": round(v, 1)} for n, v in by_name.most_common(40)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to measure after --")
    census = Census()
    sampler = threading.Thread(target=census.run, daemon=True)
    sampler.start()
    rc = subprocess.call(command)
    census.stop.set()
    sampler.join()
    result = {"command": command, "returncode": rc, **census.summary()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_census.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# CPU census: {' '.join(command)}", "",
             f"{result['cpu_s']:.0f} CPU s in {result['wall_s']:.0f} s wall, {result['processes']} processes seen, "
             f"exit code {rc}.", "", "| group | CPU s | share | processes |", "|---|---|---|---|"]
    lines += [f"| {g['group']} | {g['cpu_s']:.1f} | {g['share']:.1%} | {g['processes']} |" for g in result["groups"][:15]]
    with open(os.path.join(args.out, "cpu_census.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rc


if __name__ == "__main__":
    sys.exit(main())
