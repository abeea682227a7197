"""Where a stage runs: the Ray cluster it joins or starts, and the resources its data tasks ask for."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class RayConfig:
    # Ray cluster address; None = $RAY_ADDRESS if set (e.g. under `ray job submit`), else a local Ray.
    address: str | None = None
    # Local Ray only: logical CPUs. Ray Train workers hold their CPUs for the whole run, so a local
    # Ray needs more logical CPUs than cores or data tasks starve (default: max(4, 2 * cores)).
    num_cpus: int | None = None
    # Ray Data's shuffle for groupbys and sorts. Ray 2.60 defaults to an actor-based hash shuffle whose
    # fixed cost was 20-30 s per groupby on a 2-core machine, against 1-2 s for the pull-based sort
    # shuffle; on large clusters "hash_shuffle" may pay off. null = Ray's default.
    shuffle_strategy: str | None = "sort_shuffle_pull_based"
    # Ray 2.60 reads Parquet through its DataSourceV2 by default, which starts a pool of 32 footer-reader actors
    # for every read_parquet call: 6-7 s per read of three small files on a 2-core machine, against 0.3-0.5 s for
    # the V1 reader (1.6 s with 2 footer actors). Every stage reads the explicit file list of a manifest, so V2's
    # listing and footer push-down buy nothing here; true = Ray's V2 reader.
    parquet_datasource_v2: bool = False
    # Local Ray only: start Ray's dashboard on 127.0.0.1 (port 8265, or the next free one); the command prints its
    # URL once at start. It shows the cluster's tasks, actors, memory and the Ray Data and Ray Train views.
    dashboard: bool = True
    # Custom resources every data-stage task and actor asks for, e.g. {data_node: 0.001}: on a cluster whose
    # CPU node group advertises `data_node` (cluster/aws.yaml, cluster/kuberay-*.yaml) the data stages then
    # land only there, while training asks for GPUs and lands on the GPU group. {} = anywhere.
    data_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"ray.num_cpus must be >= 1, got {self.num_cpus}")
        allowed = ("sort_shuffle_pull_based", "sort_shuffle_push_based", "hash_shuffle", "shuffle_v2")
        if self.shuffle_strategy is not None and self.shuffle_strategy not in allowed:
            raise ValueError(f"ray.shuffle_strategy must be one of {allowed} or null, got {self.shuffle_strategy!r}")
        if any(v <= 0 for v in self.data_resources.values()):
            raise ValueError(f"ray.data_resources amounts must be > 0, got {self.data_resources}")


_DATA_RESOURCES: dict[str, float] = {}


def local_system_config(num_cpus: int) -> dict:
    """Ray's system settings for a Ray this project starts on one machine (a command's local Ray, the tests').

    Metrics export off: nothing scrapes it on a laptop, and its exporter thread has crashed workers at
    shutdown (ray-project/ray#36885). An idle worker is kept for a minute, then stopped. Ray stops idle workers
    only while the workers (actors' included) outnumber `num_workers_soft_limit`, by default the logical CPUs,
    after `idle_worker_killing_time_threshold_ms`, by default 1 s: so after each actor pool every stage of a DAG
    started its task workers again, and up to one idle worker per CPU stayed for the Ray's whole life. Measured
    on 2 cores, the same 148-row dedup run twice: its 12-image eval index took 7.6 s the second time (new workers
    importing the stage), 0.4 s with workers kept; the whole stage 22.8 -> 12.9 s. A kept idle worker holds
    ~150 MB and burns 0.5 CPU s a minute, nearly all on its main thread: with the soft limit at two per CPU, 8
    tasks on a 4-CPU Ray left 7 idle workers that were still there 80 s later (and would have stayed for the
    Ray's life, the tests' session Rays included); with 0, every worker idle for a minute goes, and one that was
    busy in the last minute is reused."""
    return {"enable_metrics_collection": False, "idle_worker_killing_time_threshold_ms": 60_000,
            "num_workers_soft_limit": 0}


def cluster_address(cfg: RayConfig) -> str | None:
    """The running cluster a command joins (ray.address, else $RAY_ADDRESS); None when it starts or reuses a
    Ray on this machine."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def actors_for(rows: int, rows_per_actor: int, cpus_per_actor: int = 1) -> int:
    """How many actors a stage starts when its `workers` is unset: one per `rows_per_actor` input rows, at most
    one per `cpus_per_actor` of the cluster's logical CPUs, at least one. An actor's start (a process, its
    imports, its state) cost 2-3 CPU-s on a 2-core machine: a small input should not pay for actors it cannot use."""
    import ray

    cap = int(ray.cluster_resources().get("CPU", 1)) // cpus_per_actor
    return max(1, min(cap, -(-rows // rows_per_actor)))


def data_args() -> dict:
    """Extra Ray remote args for every data-stage map: the custom resources of RayConfig.data_resources."""
    return {"resources": dict(_DATA_RESOURCES)} if _DATA_RESOURCES else {}


def init_ray(cfg: RayConfig) -> None:
    import ray
    import ray.data

    _DATA_RESOURCES.clear()
    _DATA_RESOURCES.update(cfg.data_resources)
    if cfg.shuffle_strategy is not None:
        from ray.data.context import ShuffleStrategy

        ray.data.DataContext.get_current().shuffle_strategy = ShuffleStrategy(cfg.shuffle_strategy)
    ray.data.DataContext.get_current().use_datasource_v2 = cfg.parquet_datasource_v2
    from pipelines.core import console

    if ray.is_initialized():
        console.attach_ray()
        return
    console.attach_ray()  # Ray's start-up messages go to a command's log file too
    # A local Ray's processes inherit this process's environment: its workers get the variable (albumentations,
    # which img2dataset imports, then makes no update check over the network) without a runtime env. A job-level
    # runtime env, even env_vars alone, starts every worker through Ray's setup_worker.py, a second Python that
    # imports Ray and then execs the real worker: 0.93 against 0.57 CPU s per worker, and 4 one-second tasks on a
    # fresh Ray returned after 3.07 against 1.66 s (means of 6 rounds, benchmarks/bench_ray_workers.py). On a
    # cluster the variable belongs in the job's runtime env (cluster/runtime_env.yaml).
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    address = cluster_address(cfg)
    if address:
        ctx = ray.init(address=address, log_to_driver=True)
    else:
        num_cpus = cfg.num_cpus or max(4, 2 * (os.cpu_count() or 1))
        # address="local": a new Ray for this command. Without it ray.init joins the newest `ray start` cluster
        # on the machine (and then refuses num_cpus); a command joins a cluster only when told (ray.address /
        # RAY_ADDRESS, which `ray job submit` sets). A local Ray listens on loopback only: by default its
        # services bind the address of the machine's outward interface.
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=cfg.dashboard, dashboard_host="127.0.0.1",
                       _node_ip_address="127.0.0.1",
                       log_to_driver=True, _system_config=local_system_config(num_cpus))
    console.attach_ray()  # now the workers' output, which the driver receives, goes there as well
    if getattr(ctx, "dashboard_url", None):
        # Ray 2.60 clusters use token authentication: the dashboard asks for the token this command prints.
        print(f"ray dashboard: http://{ctx.dashboard_url} (token: ray get-auth-token)", flush=True)
