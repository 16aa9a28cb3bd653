"""The cluster manifests users apply are checked against the real schemas and against this package (no cluster).

- KubeRay: the RayCluster/RayJob fields against KubeRay's CRD (ray.io/v1, written down below); the pod templates
  against the `kubernetes` client's models (every key, recursively, must be a field of V1PodTemplateSpec's tree);
  credentials only from the Secret; GPU limits and a memory-backed /dev/shm on the GPU workers; the RayJob creates
  the same cluster as raycluster.yaml.
- The Ray cluster launcher YAML against the schema Ray ships (ray/autoscaler/ray-schema.json), after Ray fills in
  its AWS defaults, and the EFA interfaces through Ray's own AWS check.
- Every `imagen ...` command the manifests and cluster/README.md name parses with jobs/cli.py's parser, every
  config path they name exists, the Dockerfile's COPY sources exist, and the Ray versions agree with pyproject.
- pipelines/ray_env.py forwards NCCL/EFA variables to the workers, never twice.
"""
from __future__ import annotations

import json
import pathlib
import re
import shlex
import tomllib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
RAYCLUSTER = ROOT / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = ROOT / "cluster" / "kuberay" / "rayjob.yaml"
LAUNCHER = ROOT / "cluster" / "ray" / "cluster.yaml"
DOCKERFILE = ROOT / "Dockerfile"
CLUSTER_README = ROOT / "cluster" / "README.md"
SECRET = "imagen-secrets"
FROM_SECRET = ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# KubeRay's CRDs, ray.io/v1 (ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayclusters.yaml and
# ray.io_rayjobs.yaml at v1.7.0, commit feeaf72): the field names at each level and the required ones.
KUBERAY_V1 = {
    "top": {"apiVersion", "kind", "metadata", "spec", "status"},
    "RayCluster.spec": {
        "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
        "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy", "rayVersion", "suspend",
        "tlsOptions", "upgradeStrategy", "workerGroupSpecs"},
    "RayCluster.spec.required": {"headGroupSpec"},
    "headGroupSpec": {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
                      "serviceType", "template"},
    "headGroupSpec.required": {"template"},
    "workerGroupSpec": {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
                        "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"},
    "workerGroupSpec.required": {"groupName", "maxReplicas", "minReplicas", "template"},
    "autoscalerOptions": {"args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy",
                          "resources", "securityContext", "upscalingMode", "version", "volumeMounts"},
    "upscalingMode": {"Default", "Aggressive", "Conservative"},
    "RayJob.spec": {
        "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
        "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
        "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode",
        "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"},
    "submissionMode": {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"},
}
INT_FIELDS = ("replicas", "minReplicas", "maxReplicas", "numOfHosts", "idleTimeoutSeconds")


def load(path: pathlib.Path) -> dict:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(documents) == 1, f"{path}: one document expected, found {len(documents)}"
    return documents[0]


def cluster_specs() -> list[tuple[str, dict]]:
    return [("raycluster.yaml spec", load(RAYCLUSTER)["spec"]),
            ("rayjob.yaml spec.rayClusterSpec", load(RAYJOB)["spec"]["rayClusterSpec"])]


def pod_templates() -> list[tuple[str, dict]]:
    out = []
    for where, spec in cluster_specs():
        out.append((f"{where}.headGroupSpec", spec["headGroupSpec"]["template"]))
        out += [(f"{where}.workerGroupSpecs[{g['groupName']}]", g["template"]) for g in spec["workerGroupSpecs"]]
    return out


def containers() -> list[tuple[str, dict]]:
    return [(f"{where}/{c['name']}", c) for where, t in pod_templates() for c in t["spec"]["containers"]]


# -- KubeRay ------------------------------------------------------------------------------------------------

def _check_keys(where: str, data: dict, allowed: set[str], required: set[str] = frozenset()) -> None:
    assert isinstance(data, dict), f"{where}: expected a mapping"
    unknown = set(data) - allowed
    assert not unknown, f"{where}: {sorted(unknown)} are not KubeRay fields (it has {sorted(allowed)})"
    missing = set(required) - set(data)
    assert not missing, f"{where}: KubeRay requires {sorted(missing)}"


def _check_cluster_spec(where: str, spec: dict) -> None:
    _check_keys(where, spec, KUBERAY_V1["RayCluster.spec"], KUBERAY_V1["RayCluster.spec.required"])
    assert isinstance(spec["rayVersion"], str)
    options = spec.get("autoscalerOptions", {})
    _check_keys(f"{where}.autoscalerOptions", options, KUBERAY_V1["autoscalerOptions"])
    assert options.get("upscalingMode", "Default") in KUBERAY_V1["upscalingMode"]
    head = spec["headGroupSpec"]
    _check_keys(f"{where}.headGroupSpec", head, KUBERAY_V1["headGroupSpec"], KUBERAY_V1["headGroupSpec.required"])
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for group in [head, *groups]:
        params = group.get("rayStartParams", {})
        # The CRD types rayStartParams as a map of strings: `num-cpus: 0` (an int) is rejected by the API server.
        assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"
    for group in groups:
        name = f"{where}.workerGroupSpecs[{group.get('groupName')}]"
        _check_keys(name, group, KUBERAY_V1["workerGroupSpec"], KUBERAY_V1["workerGroupSpec.required"])
        for field in INT_FIELDS:
            assert isinstance(group.get(field, 0), int) and not isinstance(group.get(field, 0), bool), (name, field)
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], name


def test_kuberay_manifests_use_only_crd_fields():
    cluster, job = load(RAYCLUSTER), load(RAYJOB)
    for document, kind in ((cluster, "RayCluster"), (job, "RayJob")):
        _check_keys(kind, document, KUBERAY_V1["top"])
        assert document["apiVersion"] == "ray.io/v1" and document["kind"] == kind
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", document["metadata"]["name"])
    _check_keys("RayJob.spec", job["spec"], KUBERAY_V1["RayJob.spec"])
    assert job["spec"]["submissionMode"] in KUBERAY_V1["submissionMode"]
    assert isinstance(job["spec"]["shutdownAfterJobFinishes"], bool)
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])  # a YAML string inside the YAML
    assert set(runtime_env) <= {"working_dir", "env_vars", "pip", "py_modules", "excludes", "config"}
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values()), "env_vars values are strings"
    for where, spec in cluster_specs():
        _check_cluster_spec(where, spec)
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "the RayJob must create the cluster raycluster.yaml is"


def _unknown_keys(data, type_name: str, where: str) -> list[str]:
    """Keys in `data` that are not fields of the kubernetes client model `type_name`, recursively."""
    import kubernetes.client.models as models

    if data is None:
        return []
    # The client's type strings: "List[V1Container]", "Dict[str, str]" (older clients: "list[...]", "dict(str, ...)").
    match = re.fullmatch(r"[Ll]ist\[(.+)\]", type_name)
    if match:
        assert isinstance(data, list), f"{where}: expected a list ({type_name})"
        return [e for i, item in enumerate(data) for e in _unknown_keys(item, match[1], f"{where}[{i}]")]
    match = re.fullmatch(r"[Dd]ict[(\[]([^,]+), (.+)[)\]]", type_name)
    if match:
        assert isinstance(data, dict), f"{where}: expected a mapping ({type_name})"
        return [e for k, v in data.items() for e in _unknown_keys(v, match[2], f"{where}.{k}")]
    model = getattr(models, type_name, None)
    if model is None:  # str, int, bool, object, datetime: a leaf
        assert not isinstance(data, (dict, list)) or type_name == "object", f"{where}: {type_name} is a scalar"
        return []
    assert isinstance(data, dict), f"{where}: expected a mapping ({type_name})"
    by_json_key = {json_key: attr for attr, json_key in model.attribute_map.items()}
    errors = [f"{where}.{key} (not a field of {type_name})" for key in data if key not in by_json_key]
    for key, value in data.items():
        if key in by_json_key:
            errors += _unknown_keys(value, model.openapi_types[by_json_key[key]], f"{where}.{key}")
    return errors


def test_pod_templates_are_kubernetes_pod_templates():
    from kubernetes.client import ApiClient, V1PodTemplateSpec

    for where, template in pod_templates():
        assert not _unknown_keys(template, "V1PodTemplateSpec", where)
        pod = ApiClient()._ApiClient__deserialize(template, "V1PodTemplateSpec")
        assert isinstance(pod, V1PodTemplateSpec) and pod.spec.containers, where
        volumes = {v.name: v for v in pod.spec.volumes or []}
        for container in pod.spec.containers:
            mounts = {m.mount_path: m.name for m in container.volume_mounts or []}
            assert set(mounts.values()) <= set(volumes), f"{where}: a mount names no volume"
            shm = volumes[mounts["/dev/shm"]]
            assert shm.empty_dir is not None and shm.empty_dir.medium == "Memory", f"{where}: /dev/shm in memory"
    # The check itself catches what the API server would drop or refuse.
    bad = {"spec": {"containers": [{"name": "x", "image": "i", "resource": {}}], "nodeSelectors": {}}}
    assert sorted(_unknown_keys(bad, "V1PodTemplateSpec", "t")) == [
        "t.spec.containers[0].resource (not a field of V1Container)", "t.spec.nodeSelectors (not a field of V1PodSpec)"]


def test_gpu_workers_ask_for_gpus_and_the_head_for_none():
    for where, spec in cluster_specs():
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: the head takes no tasks"
        for group in spec["workerGroupSpecs"]:
            for container in group["template"]["spec"]["containers"]:
                resources = container["resources"]
                gpus = str(resources["limits"].get("nvidia.com/gpu", ""))  # quantities are strings in the models
                assert gpus.isdigit() and int(gpus) > 0, f"{where}: GPU workers need nvidia.com/gpu limits"
                # Extended resources cannot be overcommitted: a request, if given, equals the limit.
                for name in ("nvidia.com/gpu", "vpc.amazonaws.com/efa"):
                    assert resources.get("requests", {}).get(name, resources["limits"].get(name)) == \
                        resources["limits"].get(name), (where, name)
        for container in spec["headGroupSpec"]["template"]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})


def test_credentials_come_from_the_secret_and_nowhere_else():
    readme = CLUSTER_README.read_text()
    create = re.search(r"kubectl create secret generic (\S+)(.*?)\n```", readme, re.S)
    assert create and create[1] == SECRET, "cluster/README.md creates the Secret the manifests read"
    created_keys = set(re.findall(r"--from-literal=([a-z0-9-]+)=", create[2]))
    for where, container in containers():
        env = {e["name"]: e for e in container.get("env", [])}
        for name in FROM_SECRET:
            assert name in env, f"{where}: {name} missing"
        for name, entry in env.items():
            secret = entry.get("valueFrom", {}).get("secretKeyRef")
            if name in FROM_SECRET or name.startswith(("AWS_", "MLFLOW_")):
                assert secret and "value" not in entry, f"{where}: {name} must come from the Secret"
            if secret:
                assert secret["name"] == SECRET, (where, name)
                assert secret.get("optional") or secret["key"] in created_keys, \
                    f"{where}: {name} reads key {secret['key']!r}, which the README's Secret does not create"
    texts = [p.read_text() for p in (RAYCLUSTER, RAYJOB, LAUNCHER, DOCKERFILE)]
    for text in texts:
        assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]", text, re.I), "a credential is baked in"


def test_every_manifest_runs_the_same_image():
    images = {c["image"] for _, c in containers()}
    images.add(load(LAUNCHER)["docker"]["image"])
    assert len(images) == 1, images


# -- the Ray cluster launcher --------------------------------------------------------------------------------

def test_ray_launcher_config_passes_rays_schema_and_aws_checks():
    import jsonschema
    import ray
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(LAUNCHER)
    schema = json.loads((pathlib.Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written: no unknown top-level or node-type keys
    validate_config(prepare_config(config))  # as `ray up` validates it, AWS defaults filled in
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}, "the head takes no tasks"
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"]]
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in gpu_types} >= {"p4d", "p5"}
    for node_type in gpu_types:
        node_config = _configure_subnets_and_groups_from_network_interfaces(node_type["node_config"])
        assert node_config["SubnetIds"] and node_config["SecurityGroupIds"]
        assert all(i["InterfaceType"] == "efa" for i in node_type["node_config"]["NetworkInterfaces"])
    run_options = " ".join(config["docker"]["worker_run_options"])
    assert "FI_PROVIDER=efa" in run_options
    assert any("imagen --help" in c for c in config["setup_commands"]), "setup checks the package is installed"


# -- entry points, paths, the Dockerfile ---------------------------------------------------------------------

def _imagen_commands_in_readme() -> list[list[str]]:
    """Every `imagen ...` command line in cluster/README.md's shell blocks (continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", CLUSTER_README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if "--" in argv and "imagen" in argv[argv.index("--") + 1:]:
                argv = argv[argv.index("--") + 1:]  # ray job submit ... -- imagen ...
            if argv[:1] == ["imagen"]:
                commands.append(argv)
    return commands


def test_every_imagen_command_parses_and_names_existing_configs():
    from jobs.cli import build_parser

    entrypoint = shlex.split(load(RAYJOB)["spec"]["entrypoint"])
    commands = [entrypoint, *_imagen_commands_in_readme()]
    assert len(commands) >= 3, commands
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)
    for argv in commands:
        assert argv[0] == "imagen" and argv[1] in subcommands, (argv, sorted(subcommands))
        args = parser.parse_args(argv[1:])  # exits (SystemExit) on anything the CLI would refuse
        if argv[1] == "run":
            config = ROOT / args.config
            assert config.is_file(), f"{' '.join(argv)}: {args.config} does not exist in the repository"
            overrides = dict(s.split("=", 1) for s in args.set)
            assert overrides.get("run_dir", "").startswith("/shared/"), "the run directory is on the shared mount"
    assert entrypoint[:3] == ["imagen", "run", "cluster/run/paper.toml"]


def test_the_rayjobs_run_directory_is_on_the_volume_every_pod_mounts():
    """The entrypoint's `--set run_dir=...` lies under a mount that the head and every worker group take from the
    shared ReadWriteMany claim (every step's driver and workers read and write there)."""
    from imagen_core.config_io import load_file
    from pipelines.pipeline_config import pipeline_config_from_dict

    job = load(RAYJOB)
    argv = shlex.split(job["spec"]["entrypoint"])
    config_path, overrides = argv[2], [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert (ROOT / config_path).is_file(), f"{config_path} does not exist in the repository"
    config = pipeline_config_from_dict(load_file(str(ROOT / config_path)), overrides)
    claim = load(ROOT / "cluster" / "kuberay" / "shared-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = [(m["mountPath"], m["name"]) for c in pod["containers"] for m in c.get("volumeMounts", [])]
        shared = [path for path, name in mounts
                  if volumes[name].get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
        assert shared and str(config.root).startswith(shared[0] + "/"), (config.root, mounts)


def test_dockerfile_copies_what_exists_and_installs_the_package_non_editable():
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    instructions = [line.split(None, 1) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    copies = [rest.split() for op, rest in instructions if op.upper() in ("COPY", "ADD")]
    assert copies
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    for *sources, _destination in copies:
        for source in (s for s in sources if not s.startswith("--")):
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
            assert source.rstrip("/") not in ignored, f".dockerignore drops {source}"
    runs = " ".join(rest for op, rest in instructions if op.upper() == "RUN")
    installs = re.findall(r"pip install ([^&;]*)", runs)
    assert installs and not any(re.search(r"(^|\s)(-e|--editable)\s", i) for i in installs), installs
    assert "imagen --help" in runs, "the build fails unless `imagen` is on PATH"
    workdir = [rest.strip() for op, rest in instructions if op.upper() == "WORKDIR"][-1]
    assert any(c[-1].rstrip("/") in ("./cluster", f"{workdir}/cluster") and c[0] == "cluster" for c in copies), \
        "cluster/ is in the working directory, where `imagen run cluster/run/...` looks"
    for where, container in containers():
        assert container["workingDir"] == workdir, where
    # One Ray version everywhere: pyproject's pin, the image's ray[default], KubeRay's rayVersion.
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(re.search(r"==([\d.]+)", p)[1] for p in pins if p.startswith("ray["))
    assert f'"ray[default]=={ray_pin}"' in runs
    assert {spec["rayVersion"] for _, spec in cluster_specs()} == {ray_pin}


# -- pipelines/ray_env.py ------------------------------------------------------------------------------------

def test_nccl_and_efa_variables_are_forwarded_to_workers():
    from pipelines.ray_env import forwarded_env

    environ = {
        "NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "^lo,docker", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "OFI_NCCL_DISABLE_GDR_REQUIRED_CHECK": "1",
        "RDMAV_FORK_SAFE": "1", "GLOO_SOCKET_IFNAME": "eth0", "TORCH_DISTRIBUTED_DEBUG": "DETAIL",
        "DS_ACCELERATOR": "cuda", "TORCH_EXTENSIONS_DIR": "/tmp/ext", "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "0,1", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ACCESS_KEY_ID": "k", "HOME": "/root",
        "PATH": "/bin", "MY_NCCL_THING": "x", "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
    }
    forwarded = forwarded_env(environ)
    assert forwarded == {k: v for k, v in environ.items() if k not in (
        "CUDA_VISIBLE_DEVICES", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HOME", "PATH", "MY_NCCL_THING")}


def test_variables_a_submitted_job_sets_are_not_forwarded_twice():
    """In a job submitted with its own env_vars (RayJob runtimeEnvYAML, --runtime-env-json) Ray sets them in the
    driver too; repeating one in ray.init's runtime_env makes Ray refuse to start the driver."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from pipelines.ray_env import JOB_CONFIG_ENV, forwarded_env

    job_env = {"NCCL_DEBUG": "WARN", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    environ = {**job_env, "FI_PROVIDER": "efa", "DS_ACCELERATOR": "cuda",
               JOB_CONFIG_ENV: json.dumps({"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": job_env}})}
    forwarded = forwarded_env(environ)
    assert forwarded == {"FI_PROVIDER": "efa", "DS_ACCELERATOR": "cuda"}
    job = {"working_dir": "gcs://x.zip", "env_vars": job_env}
    assert _merge_runtime_env(job, {"env_vars": forwarded}) is not None  # what ray.init does in a job driver
    assert _merge_runtime_env(job, {"env_vars": {**forwarded, "NCCL_DEBUG": "WARN"}}) is None  # the old conflict


def test_init_ray_hands_the_forwarded_variables_to_ray(monkeypatch):
    import ray

    from pipelines import ray_env

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("NCCL_IB_DISABLE", "1")
    monkeypatch.setenv("FI_EFA_FORK_SAFE", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv(ray_env.JOB_CONFIG_ENV, raising=False)
    ray_env.init_ray(ray_env.RayConfig(address="auto"))
    env_vars = seen["runtime_env"]["env_vars"]
    assert env_vars["NCCL_IB_DISABLE"] == "1" and env_vars["FI_EFA_FORK_SAFE"] == "1"
    assert env_vars["DS_ACCELERATOR"] == "cpu" and seen["address"] == "auto" and seen["num_cpus"] is None


def test_a_local_ray_gets_the_local_settings_and_a_cluster_keeps_rays_defaults(monkeypatch):
    """LOCAL_RAY_ENV (one Parquet footer reader, no preemption watcher, a 0.5 s Train poll) reaches the workers
    of a Ray that init_ray starts here, unless this process sets a value itself; never those of a cluster."""
    import ray

    from pipelines import ray_env

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.delenv(ray_env.JOB_CONFIG_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in ray_env.LOCAL_RAY_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's own value wins (Ray reads it here)
    ray_env.init_ray(ray_env.RayConfig(num_cpus=2))
    env_vars = seen["runtime_env"]["env_vars"]
    assert env_vars["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "1"
    assert env_vars["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in env_vars and seen["num_cpus"] == 2
    ray_env.init_ray(ray_env.RayConfig(address="auto"))
    assert not set(ray_env.LOCAL_RAY_ENV) & set(seen["runtime_env"]["env_vars"])
