"""The capacity model of docs/SCALING.md, computed from the measurements, published figures and assumptions below.

    .venv/bin/python -m benchmarks.scale_model [--costs benchmarks/out/scale_costs.json]
                                               [--sim benchmarks/out/scale_sim.json] [--out benchmarks/out]

Writes benchmarks/out/scale_model.{json,md}. Every input is one of three kinds, and the output says which:
MEASURED (a file and field here), PUBLISHED (a cited figure) or ASSUMED (a stated guess to replace with a
pilot run's number).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

# PUBLISHED
PAIRS = 400e6            # WIT (Radford et al. 2021, sec. 2.2)
EPOCHS = 32              # the paper's schedule (sec. 2.5)
GLOBAL_BATCH = 32_768    # the paper's batch (sec. 2.5)
POOL = 1.6e9             # MetaCLIP curated 400M from 1.6B pairs (issue 17)
A100_SAMPLES_S = {"ViT-B/16": (340, 390), "ViT-L/14": (70, 77)}  # open_clip, 224 px (issue 17)
PARAMS = {"ViT-B/16": 149_620_737, "ViT-L/14": 427_616_513}     # MEASURED: clip_model build_model, counted
S3_PREFIX_PUT_S, S3_PREFIX_GET_S = 3_500, 5_500  # S3 request rate per partitioned prefix (AWS S3 docs)
# MEASURED elsewhere in this repo: crawl CPU per photo-like JPEG (300-700 px -> 224 px) end to end, 2 cores at
# 337 img/s (README "Crawling", benchmarks/bench_crawl.py) = 2 / 337 core-seconds.
CRAWL_CORE_S_PHOTO = 2 / 337.4

# ASSUMED
CRAWL_SUCCESS = 0.70     # URLs that yield a decodable, allowed image
WEB_IMAGE_FACTOR = 2.0   # decode cost of an average web photo vs the benchmark's 300-700 px photos
ROW_BYTES = 25_000       # one row at 256 px (keep_ratio JPEG ~20 KB + caption, hashes, metadata)
NODE_VCPU, NODE_EFF = 32, 0.75  # m6i/c6i.8xlarge; share of vCPU-seconds doing stage work (stragglers, start-up)
DATA_NODES = 32          # cluster/aws.yaml: cpu_data 24 + cpu_data_c6i 8
CKPT_WRITE_GBPS_PER_NODE = 1.0  # GB/s one 8-GPU node sustains to S3 (multipart, many connections)
DATA_NODE_S3_GBPS = 1.0  # GB/s one data node (12.5 Gb/s network) moves to and from S3, reads and writes together
GPU_NODES_OPTIONS = (8, 16, 32)  # 8-GPU nodes
ROWS_PER_PART, ROWS_PER_SHARD, ROW_GROUP = 5_000, 40_000, 256  # configs/cluster.yaml
# benchmarks/scale_costs.py runs with crawl.rows_per_part 1,000: every later stage keeps the crawl's parts, so a
# stage's requests per 1,000 rows there are its requests per part, and on the cluster they scale with parts.
MEASURED_ROWS_PER_PART = 1_000


# MEASURED: an idle local Ray's CPU per wall second (benchmarks/scale_costs.py idle_burn(); the runs before
# the probe existed used the value it gave on this machine at load ~55: 0.0551). Subtracted per stage as
# idle x wall, so that a stage slowed down by other jobs on the machine does not look dearer.
IDLE_CPU_PER_S = 0.0551


def _per_row(costs: dict[str, Any], stage: str, metric: str) -> tuple[float, str]:
    """A stage's cost per row of `metric`, and which estimator gave it. On a quiet run (load average before
    it at most 3x the machine's CPU count: an otherwise idle 2-core machine shows 2-6 from the benchmark's
    own Ray processes, the loaded runs 20-110) the marginal cost
    between the two largest sizes, which leaves the stage's fixed cost out; when that comes out <= 0 (noise:
    shard's CPU fell from 3.2 to 0.6 s per 1k rows between 2,000 and 4,000 rows), or on a loaded run, whose
    marginal figures swing by more than the per-row cost itself (filter's CPU fell from 25.8 s at 2,000 rows
    to 6.8 s at 4,000 as the load eased), the larger per-1k figure of the two largest sizes: an upper bound
    with the fixed cost spread over those rows."""
    s = costs["summary"].get(stage)
    if not s:
        return float("nan"), "not measured"
    meta = costs.get("meta", {})
    quiet = meta.get("load_before", float("inf")) <= 3 * meta.get("cpus", 0)
    marginal = s[metric].get("marginal_per_1k")
    if quiet and marginal is not None and marginal > 0:
        return marginal / 1000.0, "marginal between the two largest sizes"
    # The larger of the two largest sizes' figures: the runs of 2026-11-30 lost the CPU of Ray workers that
    # exited mid-stage (curate came out at -3.6 s at 4,000 rows; benchmarks/scale_costs.py tracks each
    # process since), so one size's figure alone can be far too low.
    return max(v for v in s[metric]["per_1k"][-2:] if v is not None) / 1000.0, "per 1k rows at the largest sizes (upper bound)"


def model(costs: dict[str, Any], sim: dict[str, Any] | None) -> dict[str, Any]:
    attempted = POOL / CRAWL_SUCCESS
    rows_in = {"crawl": attempted, "filter": POOL, "dedup": POOL, "curate": POOL, "shard": PAIRS}
    stages = {}
    idle = costs.get("meta", {}).get("idle_cpu_s_per_wall_s", IDLE_CPU_PER_S)
    # Bytes on S3: rows that carry images (crawl output = pool, every later stage a subset), per ROW_BYTES.
    bytes_on_s3 = {"crawl": POOL * ROW_BYTES, "filter": POOL * 0.9 * ROW_BYTES, "dedup": POOL * 0.8 * ROW_BYTES,
                   "curate": PAIRS * ROW_BYTES, "shard": PAIRS * ROW_BYTES}
    for stage, n in rows_in.items():
        # The raw CPU per row at the largest size is the upper bound (fixed costs and Ray's background in it);
        # minus the idle Ray's CPU over the stage's wall time, shown beside it, is closer to the work itself.
        raw, how = _per_row(costs, stage, "cpu_s")
        cpu_row = raw
        net = max(raw - idle * _per_row(costs, stage, "wall_s")[0], 0.0)
        src = f"scale_costs.json summary.{stage}.cpu_s: {how}"
        if stage == "crawl":
            photo = CRAWL_CORE_S_PHOTO * WEB_IMAGE_FACTOR
            if not cpu_row >= photo:
                cpu_row, src = photo, "README bench_crawl 2 cores / 337 img/s x WEB_IMAGE_FACTOR (assumed)"
                net = CRAWL_CORE_S_PHOTO * WEB_IMAGE_FACTOR
        core_h = n * cpu_row / 3600
        req_row = _per_row(costs, stage, "s3_requests")[0]
        wr_row = _per_row(costs, stage, "s3_bytes_written")[0]
        stages[stage] = {
            "rows_in": n, "cpu_s_per_row": cpu_row, "cpu_s_per_row_idle_corrected": net, "cpu_source": src, "core_hours": core_h,
            "node_hours": core_h / (NODE_VCPU * NODE_EFF),
            "cpu_hours_on_cluster": core_h / (NODE_VCPU * NODE_EFF * DATA_NODES),
            # Bytes moved: the stage's input read from S3 (the crawl reads the web instead) and its output written.
            "io_hours_on_cluster": ((0 if stage == "crawl" else n * ROW_BYTES) + bytes_on_s3[stage])
            / (DATA_NODE_S3_GBPS * 1e9 * DATA_NODES) / 3600,
            # requests scale with parts (files), not rows: see MEASURED_ROWS_PER_PART
            "s3_requests": n / ROWS_PER_PART * req_row * MEASURED_ROWS_PER_PART if req_row == req_row else None,
            "s3_requests_per_row_measured": req_row,
            "s3_bytes_written_measured_per_row": wr_row,
        }
        st = stages[stage]  # the slower of CPU and S3 transfer bounds the stage
        st["hours_on_cluster"] = max(st["cpu_hours_on_cluster"], st["io_hours_on_cluster"])
        st["bound_by"] = "cpu" if st["cpu_hours_on_cluster"] >= st["io_hours_on_cluster"] else "s3 transfer"
    parts = attempted / ROWS_PER_PART
    peak_put_s = {}  # PUT rate if a stage's parts all finished within its hours on the cluster, per prefix
    for stage, st in stages.items():
        if st["s3_requests"] and st["hours_on_cluster"]:
            peak_put_s[stage] = st["s3_requests"] / (st["hours_on_cluster"] * 3600)
    train = {}
    for name, (lo, hi) in A100_SAMPLES_S.items():
        samples = PAIRS * EPOCHS
        gpu_h = (samples / hi / 3600, samples / lo / 3600)
        opts = []
        for nodes in GPU_NODES_OPTIONS:
            gpus = 8 * nodes
            opts.append({"nodes": nodes, "gpus": gpus, "per_gpu_batch": GLOBAL_BATCH / gpus,
                         "days": (gpu_h[0] / gpus / 24, gpu_h[1] / gpus / 24),
                         "steps": samples / GLOBAL_BATCH,
                         "read_MBps": gpus * hi * ROW_BYTES / 1e6,
                         "row_group_GET_s": gpus * hi / ROW_GROUP})
        p = PARAMS[name]
        # weights-only export fp32; a full ZeRO checkpoint: bf16 weights (2) + fp32 master, Adam m, v (12)
        ckpt = {"export_GB_fp32": p * 4 / 1e9, "train_ckpt_GB": p * 14 / 1e9}
        ckpt["save_s"] = {str(o["nodes"]): ckpt["train_ckpt_GB"] / (CKPT_WRITE_GBPS_PER_NODE * o["nodes"]) for o in opts}
        train[name] = {"samples": samples, "gpu_hours": gpu_h, "options": opts, "checkpoint": ckpt}
    out = {"inputs": {"published": {"pairs": PAIRS, "epochs": EPOCHS, "global_batch": GLOBAL_BATCH, "pool": POOL,
                                    "a100_samples_s": A100_SAMPLES_S, "s3_prefix_put_s": S3_PREFIX_PUT_S,
                                    "s3_prefix_get_s": S3_PREFIX_GET_S},
                      "assumed": {"crawl_success": CRAWL_SUCCESS, "web_image_factor": WEB_IMAGE_FACTOR,
                                  "row_bytes": ROW_BYTES, "node_vcpu": NODE_VCPU, "node_eff": NODE_EFF,
                                  "data_nodes": DATA_NODES, "ckpt_write_GBps_per_node": CKPT_WRITE_GBPS_PER_NODE,
                                  "data_node_s3_GBps": DATA_NODE_S3_GBPS},
                      "measured": {"costs": costs.get("meta"), "sim": (sim or {}).get("meta")}},
           "stages": stages, "bytes_on_s3": bytes_on_s3, "crawl_parts": parts, "requests_per_s": peak_put_s,
           "train": train}
    if sim:
        out["sim"] = {step: [r for r in recs if "error" not in r][-1:] for step, recs in sim["results"].items()}
    return out


def _g(x: float, d: int = 0) -> str:
    return "-" if x is None or x != x else f"{x:,.{d}f}"


def markdown(m: dict[str, Any]) -> str:
    lines = ["| stage | rows in | CPU per row (minus idle Ray) | core-hours | node-hours (32 vCPU) | hours on 32 nodes "
             "(CPU / S3 transfer) | S3 requests | S3 requests per row | source of CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for stage, s in m["stages"].items():
        lines.append(f"| {stage} | {s['rows_in'] / 1e9:.2f}B | {s['cpu_s_per_row'] * 1000:.2f} ms "
                     f"({s['cpu_s_per_row_idle_corrected'] * 1000:.2f}) | {_g(s['core_hours'])} | "
                     f"{_g(s['node_hours'])} | {_g(s['hours_on_cluster'], 1)} ({_g(s['cpu_hours_on_cluster'], 1)} / "
                     f"{_g(s['io_hours_on_cluster'], 1)}) | {_g(s['s3_requests'])} | "
                     f"{_g(s['s3_requests_per_row_measured'], 4)} | {s['cpu_source']} |")
    lines += ["", "| stage | TB written to S3 (at 25 KB/row, A) | mean requests/s over the stage on 32 nodes | "
              "vs one prefix's 3,500 PUT/s (GET: 5,500) |", "|---|---|---|---|"]
    for stage, b in m["bytes_on_s3"].items():
        r = m["requests_per_s"].get(stage)
        lines.append(f"| {stage} | {b / 1e12:.1f} | {_g(r, 1)} | {'-' if r is None else f'{100 * r / S3_PREFIX_PUT_S:.2f}%'} |")
    lines += ["", "| model | samples seen | A100-hours | 8-GPU nodes | GPUs | per-GPU batch | days | steps | "
              "shard read MB/s | row-group GETs/s | full checkpoint GB | save s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in m["train"].items():
        for o in t["options"]:
            lines.append(f"| {name} | {t['samples'] / 1e9:.1f}B | {_g(t['gpu_hours'][0])}-{_g(t['gpu_hours'][1])} | "
                         f"{o['nodes']} | {o['gpus']} | {o['per_gpu_batch']:.0f} | {o['days'][0]:.1f}-{o['days'][1]:.1f} | "
                         f"{o['steps']:,.0f} | {o['read_MBps']:,.0f} | {o['row_group_GET_s']:,.0f} | "
                         f"{t['checkpoint']['train_ckpt_GB']:.1f} | {t['checkpoint']['save_s'][str(o['nodes'])]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--costs", default="benchmarks/out/scale_costs.json")
    ap.add_argument("--sim", default="benchmarks/out/scale_sim.json")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    with open(args.costs) as f:
        costs = json.load(f)
    sim = None
    if os.path.exists(args.sim):
        with open(args.sim) as f:
            sim = json.load(f)
    m = model(costs, sim)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale_model.json"), "w") as f:
        json.dump(m, f, indent=2)
    text = markdown(m)
    with open(os.path.join(args.out, "scale_model.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
