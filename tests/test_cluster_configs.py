"""cluster/: the `ray up` config, the KubeRay manifests and the job runtime env are valid, and the
resource convention they carry (data stages on `data_node` CPU nodes, training on GPU nodes) makes
a real Ray autoscaler launch and remove the right nodes.

What cannot be checked offline: AWS itself (`ray up` resolves AMIs, subnets and security groups
through the EC2 API) and the KubeRay CRD schema (not shipped with any installed package). The
`ray up` YAML goes through Ray's own schema and validate_config; the KubeRay manifests are checked
field by field for what the operator requires, each checker shown to reject a broken copy.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import jsonschema
import psutil
import pytest
import ray
import ray.cluster_utils
import ray.runtime_env
import ray.util.scheduling_strategies
import yaml

from pipelines.core.ports import free_port
from tests.conftest import restart_shared_ray

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_schema() -> dict:
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------------- ray up (AWS)


def _ray_validate(config: dict) -> None:
    """What `ray up` does before it talks to AWS: fill defaults, then Ray's validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def convention_problems(config: dict) -> list[str]:
    """The structure the pipeline relies on, as a list of violations (empty = fine)."""
    problems = []
    types = config["available_node_types"]
    head_name = config["head_node_type"]
    head = types[head_name]
    if head["resources"].get("CPU") != 0:
        problems.append(f"head {head_name} must advertise CPU: 0 (no tasks on the head)")
    if "data_node" in head["resources"] or "GPU" in head["resources"]:
        problems.append(f"head {head_name} must not advertise data_node or GPU")
    workers = {k: v for k, v in types.items() if k != head_name}
    gpu_types = [k for k, v in workers.items() if v["resources"].get("GPU", 0) > 0]
    cpu_types = [k for k in workers if k not in gpu_types]
    if not gpu_types or not cpu_types:
        problems.append(f"need both a CPU data group and a GPU group, got cpu={cpu_types} gpu={gpu_types}")
    for name in gpu_types:
        res = workers[name]["resources"]
        if "data_node" in res:
            problems.append(f"GPU type {name} advertises data_node: data stages would take its CPUs")
        if res["GPU"] != 8:
            problems.append(f"GPU type {name} should be an 8-GPU node, has {res['GPU']}")
    for name in cpu_types:
        res = workers[name]
        if res["resources"].get("data_node", 0) < 1:
            problems.append(f"CPU type {name} must advertise data_node (custom resources are never auto-detected)")
        elif res["resources"]["data_node"] != res["resources"].get("CPU"):
            problems.append(f"CPU type {name}: data_node should equal CPU (one unit per CPU)")
        if res["node_config"].get("InstanceMarketOptions", {}).get("MarketType") != "spot":
            problems.append(f"CPU type {name} should run on spot")
    for name, t in workers.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        if hi is None or not 0 <= lo <= hi:
            problems.append(f"{name}: need 0 <= min_workers <= max_workers, got {lo}, {hi}")
    if sum(t.get("min_workers", 0) for t in workers.values()) > config["max_workers"]:
        problems.append("sum of min_workers exceeds max_workers")
    if sum(t.get("max_workers", 0) for t in workers.values()) > config["max_workers"]:
        problems.append("a group's max_workers is unreachable under the global max_workers")
    return problems


def test_aws_yaml_passes_ray_schema_and_validate_config():
    config = _load("aws.yaml")
    jsonschema.validate(config, _ray_schema())
    _ray_validate(config)
    assert config["provider"]["type"] == "aws"
    assert 0 < config["idle_timeout_minutes"] <= 60


@pytest.mark.parametrize(
    "mutation",
    [
        pytest.param(lambda c: c.update(idle_timeout_minute=5), id="misspelled-top-level-key"),
        pytest.param(lambda c: c["available_node_types"]["cpu_data"].update(max_workers="24"), id="max_workers-as-string"),
        pytest.param(lambda c: c["available_node_types"]["cpu_data"]["resources"].update(data_node=0.5),
                     id="fractional-custom-resource"),
        pytest.param(lambda c: c["available_node_types"]["gpu_train"].pop("node_config"), id="missing-node_config"),
        pytest.param(lambda c: c["available_node_types"]["gpu_train"].update(min_worker=1), id="misspelled-node-type-key"),
    ],
)
def test_broken_aws_yaml_fails_validation(mutation):
    config = _load("aws.yaml")
    mutation(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())
    with pytest.raises(jsonschema.ValidationError):
        _ray_validate(config)


def test_aws_yaml_follows_resource_convention():
    config = _load("aws.yaml")
    assert convention_problems(config) == []
    # The install step pins torch exactly as the Makefile's TORCH_SPEC default does.
    torch_spec = re.search(r"^TORCH_SPEC \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert any(torch_spec in cmd for cmd in config["setup_commands"]), (torch_spec, config["setup_commands"])
    assert any("pip install" in cmd and "-e" in cmd for cmd in config["setup_commands"])
    # Containers run the installed Ray version.
    images = [config["docker"]["image"]] + [t.get("docker", {}).get("worker_image", config["docker"]["image"])
                                            for t in config["available_node_types"].values()]
    assert all(img.startswith(f"rayproject/ray:{ray.__version__}-py311") for img in images), images


@pytest.mark.parametrize(
    "mutation",
    [
        pytest.param(lambda t: t["gpu_train"]["resources"].update(data_node=96), id="data_node-on-gpu"),
        pytest.param(lambda t: t["cpu_data"]["resources"].pop("data_node"), id="cpu-without-data_node"),
        pytest.param(lambda t: t["head"]["resources"].update(CPU=8), id="head-takes-tasks"),
        pytest.param(lambda t: t["cpu_data"].update(min_workers=30), id="min-above-max"),
    ],
)
def test_convention_check_rejects_broken_copies(mutation):
    config = _load("aws.yaml")
    mutation(config["available_node_types"])
    assert convention_problems(config)


# ------------------------------------------------------------------------------------- KubeRay


def _start_param_resources(params: dict) -> dict:
    """The resources KubeRay's `ray start` gets from rayStartParams.resources.

    KubeRay pastes the value into a shell command line (`ray start ... --resources=VALUE`), hence
    the documented form '"{\\"data_node\\": 16}"': the shell strips the quotes and backslashes.
    """
    raw = params.get("resources")
    if raw is None:
        return {}
    args = shlex.split(raw)
    assert len(args) == 1, f"resources must be one shell word, got {raw!r}"
    return json.loads(args[0])


def cluster_spec_problems(spec: dict) -> list[str]:
    """Fields the KubeRay operator needs in a RayClusterSpec, plus our groups and convention."""
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} != installed Ray {ray.__version__}")
    head = spec.get("headGroupSpec") or {}
    if not isinstance(head.get("rayStartParams"), dict):
        problems.append("headGroupSpec.rayStartParams must be a mapping")
    elif head["rayStartParams"].get("num-cpus") != "0":
        problems.append("head must start with num-cpus '0' (no tasks on the head)")
    elif "data_node" in _start_param_resources(head["rayStartParams"]):
        problems.append("head must not advertise data_node")

    def containers(group: dict, where: str) -> list[dict]:
        cs = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        if not cs:
            problems.append(f"{where}: template.spec.containers is empty")
        for c in cs:
            if not c.get("name") or not c.get("image"):
                problems.append(f"{where}: every container needs name and image")
            elif not c["image"].startswith(f"rayproject/ray:{ray.__version__}"):
                problems.append(f"{where}: image {c['image']} is not Ray {ray.__version__}")
        return cs

    containers(head, "headGroupSpec")
    groups = {}
    for g in spec.get("workerGroupSpecs") or []:
        name = g.get("groupName")
        if not name:
            problems.append("every workerGroupSpec needs groupName")
            continue
        groups[name] = g
        lo, n, hi = g.get("minReplicas"), g.get("replicas"), g.get("maxReplicas")
        if not all(isinstance(v, int) for v in (lo, n, hi)) or not 0 <= lo <= n <= hi or hi < 1:
            problems.append(f"{name}: need integers 0 <= minReplicas <= replicas <= maxReplicas, maxReplicas >= 1")
        if not isinstance(g.get("rayStartParams"), dict):
            problems.append(f"{name}: rayStartParams must be a mapping (may be empty)")
        for c in containers(g, name):
            limits = (c.get("resources") or {}).get("limits") or {}
            gpus = int(limits.get("nvidia.com/gpu", 0))
            data = _start_param_resources(g.get("rayStartParams") or {}).get("data_node", 0)
            if gpus and data:
                problems.append(f"{name}: a GPU group must not advertise data_node")
            if not gpus and not data:
                problems.append(f"{name}: a CPU group must advertise data_node")
            if data and str(data) != str(limits.get("cpu")):
                problems.append(f"{name}: data_node {data} should equal the cpu limit {limits.get('cpu')}")
    if set(groups) != {"cpu-data", "gpu-train"}:
        problems.append(f"expected groups cpu-data and gpu-train, got {sorted(groups)}")
    elif int(groups["gpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) != 8:
        problems.append("gpu-train must request 8 nvidia.com/gpu per pod")
    return problems


def manifest_problems(doc: dict) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name is required")
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        problems += cluster_spec_problems(spec)
    elif doc.get("kind") == "RayJob":
        if not spec.get("entrypoint"):
            problems.append("RayJob needs spec.entrypoint")
        if spec.get("shutdownAfterJobFinishes") is not True or not isinstance(spec.get("ttlSecondsAfterFinished"), int):
            problems.append("RayJob must shut its cluster down (shutdownAfterJobFinishes, ttlSecondsAfterFinished)")
        if "rayClusterSpec" not in spec:
            problems.append("RayJob needs spec.rayClusterSpec")
        else:
            problems += cluster_spec_problems(spec["rayClusterSpec"])
    else:
        problems.append(f"unexpected kind {doc.get('kind')!r}")
    return problems


def _single_doc(name: str) -> dict:
    docs = list(yaml.safe_load_all((CLUSTER / name).read_text()))
    assert len(docs) == 1, f"{name}: expected one YAML document, got {len(docs)}"
    return docs[0]


@pytest.mark.parametrize("name,kind", [("kuberay-raycluster.yaml", "RayCluster"), ("kuberay-rayjob.yaml", "RayJob")])
def test_kuberay_manifest_has_what_the_operator_needs(name, kind):
    doc = _single_doc(name)
    assert doc["kind"] == kind
    assert manifest_problems(doc) == []


def test_rayjob_runs_the_pipeline_with_the_clusters_groups():
    job = _single_doc("kuberay-rayjob.yaml")["spec"]
    cluster = _single_doc("kuberay-raycluster.yaml")["spec"]
    assert job["entrypoint"] == "python -m pipelines.run --config configs/cluster.yaml"
    assert (REPO / "pipelines" / "run" / "__main__.py").is_file()
    env = yaml.safe_load(job["runtimeEnvYAML"])
    ray.runtime_env.RuntimeEnv(**env)
    assert "pip" not in env and "working_dir" in env
    assert env["env_vars"]["NO_ALBUMENTATIONS_UPDATE"] == "1"

    def shape(spec):  # what decides scheduling: start params, images, resource limits
        return {g["groupName"]: (g["rayStartParams"], [(c["image"], c["resources"]) for c in g["template"]["spec"]["containers"]])
                for g in spec["workerGroupSpecs"]} | {"head": (spec["headGroupSpec"]["rayStartParams"], None)}

    assert shape(job["rayClusterSpec"]) == shape(cluster)


@pytest.mark.parametrize(
    "mutation",
    [
        pytest.param(lambda s: s["workerGroupSpecs"][0]["rayStartParams"].clear(), id="cpu-group-without-data_node"),
        pytest.param(lambda s: s["workerGroupSpecs"][0]["rayStartParams"].update(resources='{"data_node": 16}'),
                     id="unquoted-resources-string"),
        pytest.param(lambda s: s["workerGroupSpecs"][1].update(minReplicas=3), id="minReplicas-above-maxReplicas"),
        pytest.param(lambda s: s["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"]
                     .pop("nvidia.com/gpu"), id="gpu-group-without-gpus"),
        pytest.param(lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"), id="head-without-image"),
        pytest.param(lambda s: s.pop("enableInTreeAutoscaling"), id="no-autoscaling"),
        pytest.param(lambda s: s["workerGroupSpecs"][1].pop("groupName"), id="group-without-name"),
    ],
)
def test_kuberay_checker_rejects_broken_copies(mutation):
    doc = _single_doc("kuberay-raycluster.yaml")
    assert doc["spec"]["workerGroupSpecs"][0]["groupName"] == "cpu-data"
    mutation(doc["spec"])
    try:
        problems = manifest_problems(doc)
    except (AssertionError, ValueError) as e:  # a resources string the shell/JSON cannot parse
        problems = [str(e)]
    assert problems


# --------------------------------------------------------------------------------- runtime env


def test_runtime_env_builds_and_excludes_prune_large_dirs(tmp_path):
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    env = _load("runtime_env.yaml")
    ray.runtime_env.RuntimeEnv(**env)
    # Only these fields: no pip/conda/uv (the nodes have the deps), no misspelled keys
    # (RuntimeEnv takes unknown keys as plugin names and would silently ignore a typo).
    assert set(env) == {"excludes", "env_vars"}
    assert env["env_vars"]["NO_ALBUMENTATIONS_UPDATE"] == "1"
    assert not any(re.search(r"(KEY|SECRET|TOKEN)", k) for k in env["env_vars"]), "no credentials in the runtime env"

    # A fake repo, walked by Ray's own packaging code with .gitignore off (the excludes alone).
    kept_files = ["pipelines/run/dag.py", "configs/cluster.yaml", "cluster/aws.yaml", "benchmarks/bench.py",
                  "clip_model/assets/bpe_simple_vocab_16e6.txt.gz", "README.md"]
    dropped = [".venv/lib/torch/x.so", ".git/objects/ab/cd", "demo_out/run/report.html", "out/run/x.parquet",
               "runs/r1/ckpt.pt", "benchmarks/out/b.json", "clip_on_ray.egg-info/PKG-INFO",
               "pipelines/run/__pycache__/dag.cpython-311.pyc", ".pytest_cache/v/cache", "urls.parquet"]
    for rel in kept_files + dropped:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    visited = []
    _dir_travel(tmp_path, [_get_excludes(tmp_path, env["excludes"])], visited.append, include_gitignore=False)
    rel_visited = {p.relative_to(tmp_path).as_posix() for p in visited}
    assert {f for f in rel_visited if (tmp_path / f).is_file()} == set(kept_files)
    # Excluded directories are pruned at the top, not walked file by file (.venv holds ~100k files).
    assert not rel_visited & {".venv", ".git", "demo_out", "out", "runs", "benchmarks/out", "clip_on_ray.egg-info"}

    # The real working tree, as `ray job submit --working-dir .` would upload it: far under Ray's 500 MiB cap.
    total = 0

    def add(p: Path):
        nonlocal total
        total += p.stat().st_size if p.is_file() else 0

    _dir_travel(REPO, [_get_excludes(REPO, env["excludes"])], add, include_gitignore=False)
    assert total < 100 * 2**20, f"working_dir upload would be {total / 2**20:.0f} MiB"


# ------------------------------------------------------------------- local autoscaling cluster


# ray/autoscaler/_private/fake_multi_node/example.yaml from Ray's source tree: AutoscalingCluster
# loads it, but the Ray 2.60 wheel does not ship it, so its settings are repeated here.
FAKE_MULTINODE_BASE = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default",
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}


class LocalAutoscalingCluster(ray.cluster_utils.AutoscalingCluster):
    """ray.cluster_utils.AutoscalingCluster (fake_multinode provider: the real Ray autoscaler
    launches and terminates Ray nodes as local processes), made safe on a shared machine.

    Upstream start()/shutdown() run `ray stop --force`, which kills every Ray process of the user
    (other jobs included), and `ray start`, which records its address in /tmp/ray so that a plain
    ray.init() elsewhere would join this cluster. Here the head is started in-process on a free
    port with its own temp dir, and shutdown ends only the processes this cluster started.
    """

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = copy.deepcopy(FAKE_MULTINODE_BASE)
        config["available_node_types"] = dict(worker_node_types)
        config["available_node_types"]["ray.head.default"] = {"resources": head_resources, "node_config": {}, "max_workers": 0}
        config.update(config_kwargs)
        return config

    def start(self) -> str:
        from ray._private.node import Node
        from ray._private.parameter import RayParams

        assert os.environ.get("RAY_FAKE_CLUSTER") == "1"
        self.head = None
        self._before = {p.pid for p in psutil.Process().children(recursive=True)}
        self._dir = tempfile.mkdtemp(prefix="ray-as-")  # short: socket paths live below it
        # Ray's default address, not 127.0.0.1: a driver's ray.init(address="127.0.0.1:port") is rewritten to
        # the machine's outward address, so a head bound to loopback only cannot be joined.
        ip = ray._private.services.get_node_ip_address()
        address = f"{ip}:{free_port()}"
        self._config["provider"]["gcs_address"] = address  # else the fake provider assumes port 6379
        jsonschema.validate(self._config, _ray_schema())
        path = os.path.join(self._dir, "autoscaling.json")
        with open(path, "w") as f:
            json.dump(self._config, f)
        head = dict(self._head_resources)
        params = RayParams(
            node_ip_address=ip, gcs_server_port=int(address.rsplit(":", 1)[1]), temp_dir=self._dir,
            num_cpus=head.pop("CPU", 0), num_gpus=head.pop("GPU", 0), resources=head,
            object_store_memory=100 * 2**20, include_dashboard=False, autoscaling_config=path,
            min_worker_port=0, max_worker_port=0)
        self.head = Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
        return address

    def shutdown(self) -> None:
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in self._before]
        if getattr(self, "head", None) is not None:
            self.head.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        # Worker nodes are children of the autoscaler process; end any still running, by pid.
        alive = [p for p in started if p.is_running()]
        for p in alive:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        ray._private.services.find_gcs_addresses.cache_clear()
        shutil.rmtree(self._dir, ignore_errors=True)


def scaled_worker_types(config: dict) -> dict:
    """cluster/aws.yaml's worker node types with the same resource names, shrunk to fit here:
    2 CPUs, 1 (fake) GPU, 2 units of any custom resource, at most one node per type."""
    out = {}
    for name, t in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        res = {k: (1 if k == "GPU" else 2) for k in t["resources"]}
        res["object_store_memory"] = 100 * 2**20
        out[name] = {"resources": res, "node_config": {}, "min_workers": 0, "max_workers": 1}
    return out


DEADLINE_S = 120


def _alive_workers() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def _node(node_id: str) -> dict:
    return next(n for n in ray.nodes() if n["NodeID"] == node_id)


def _wait(cond, what: str, timeout: float = DEADLINE_S):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; nodes: "
                         f"{[(n['NodeID'][:8], n['Alive'], n['Resources']) for n in ray.nodes()]}")


@pytest.fixture
def autoscaling_cluster(monkeypatch):
    shared = ray.is_initialized()  # the session's shared Ray (tests/conftest.py): brought back afterwards
    if shared:
        ray.shutdown()
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")  # required by the fake provider in the autoscaler
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    aws = _load("aws.yaml")
    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 0}, worker_node_types=scaled_worker_types(aws),
        idle_timeout_minutes=0.1, max_workers=len(aws["available_node_types"]) - 1)
    try:
        address = cluster.start()
        ray.init(address=address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if shared:
            monkeypatch.undo()  # the fake-cluster settings must not reach the shared Ray's workers
            restart_shared_ray()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_autoscaler_places_data_on_data_nodes_and_training_on_gpu_nodes(autoscaling_cluster):
    assert _wait(lambda: any(n["Alive"] for n in ray.nodes()), "the head")
    assert _alive_workers() == [], "cluster should start with the head only (min_workers 0)"
    assert "data_node" not in ray.cluster_resources() and "GPU" not in ray.cluster_resources()

    # Training-shaped demand ({"GPU": 1, "CPU": 1}, as a Ray Train worker with use_gpu=True) brings
    # up a GPU node; held by an actor so the node stays while the data work is placed.
    @ray.remote(num_gpus=1, num_cpus=1)
    class TrainWorker:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    trainer = TrainWorker.remote()
    gpu_node = ray.get(trainer.node.remote(), timeout=DEADLINE_S)
    gpu_res = _node(gpu_node)["Resources"]
    assert gpu_res.get("GPU") == 1 and "data_node" not in gpu_res, gpu_res

    # Control: the GPU node has a free CPU, so placement below is decided by data_node, not by room.
    @ray.remote(num_cpus=1)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(gpu_node, soft=False)
    assert ray.get(where.options(scheduling_strategy=strategy).remote(), timeout=60) == gpu_node

    # Data-stage-shaped demand (ray.data_resources {data_node: 0.001}) waits for a CPU data node
    # even though the GPU node could run it, and never makes a second GPU node.
    data_task = where.options(resources={"data_node": 0.001})
    data_nodes = set(ray.get([data_task.remote() for _ in range(4)], timeout=DEADLINE_S))
    for node_id in data_nodes:
        res = _node(node_id)["Resources"]
        assert node_id != gpu_node and res.get("data_node") == 2 and "GPU" not in res, res
    assert sum(1 for n in _alive_workers() if n["Resources"].get("GPU")) == 1

    # Idle for idle_timeout_minutes (6 s here): the autoscaler removes every worker node again.
    ray.kill(trainer)
    _wait(lambda: _alive_workers() == [], "the worker nodes to scale down")
    assert "GPU" not in ray.cluster_resources() and "data_node" not in ray.cluster_resources()
