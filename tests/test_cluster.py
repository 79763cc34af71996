"""The cluster/ folder: KubeRay manifests against the KubeRay CRDs, the `ray up` config against the
schema in the ray wheel, the run configuration against the config model, the cross-references
between them, the CLI and docs/cluster.md, and the local S3 service of the demo.

The CRDs are looked up in `<repo>/../shared/kuberay-crds/` (or $WSSS_KUBERAY_CRDS); where that
folder is absent the CRD tests skip and say so.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import boto3
import jsonschema
import pytest
import ray.autoscaler
import yaml

from cluster import local_s3
from cluster.local_s3 import LocalS3
from pipelines import storage
from pipelines.cli import COMMANDS
from pipelines.config import load_config

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
AWS_CONFIG = REPO / "cluster" / "aws" / "cluster.yaml"
DOCS = REPO / "docs" / "cluster.md"
CRD_DIR = Path(os.environ.get("WSSS_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# What each job runs, in order; and the commands the cluster and its docs rely on.
JOB_COMMANDS = {
    "rayjob-train.yaml": ["train-classifier", "train-affinity"],
    "rayjob-label.yaml": ["label"],
    "raycronjob-relabel.yaml": ["relabel"],
}
REQUIRED_COMMANDS = ["train-classifier", "train-affinity", "label", "relabel", "run"]
WSSS_COMMAND = re.compile(r"(?<![\w/.-])wsss[ \t]+([a-z][a-z-]*)")


# libyaml's loader when present: the CRDs are 56,000 lines, 9 s for the pure-Python one.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_documents(path: Path) -> list[dict]:
    documents = yaml.load_all(path.read_text(), Loader=SAFE_LOADER)
    return [doc for doc in documents if doc is not None]


def manifests() -> dict[str, list[dict]]:
    return {path.name: load_documents(path) for path in sorted(KUBERAY.glob("*.yaml"))}


def one(kind: str) -> tuple[str, dict]:
    """The file and the document of the only manifest of `kind`."""
    found = [(name, d) for name, docs in manifests().items() for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {KUBERAY}, found {len(found)}"
    return found[0]


def cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec in the manifests, by file: the RayCluster's, each RayJob's and the
    RayCronJob's job template's."""
    specs = {}
    for name, docs in manifests().items():
        for doc in docs:
            if doc["kind"] == "RayCluster":
                specs[name] = doc["spec"]
            elif doc["kind"] == "RayJob":
                specs[name] = doc["spec"]["rayClusterSpec"]
            elif doc["kind"] == "RayCronJob":
                specs[name] = doc["spec"]["jobTemplate"]["rayClusterSpec"]
    return specs


def entrypoints() -> dict[str, str]:
    out = {}
    for name, docs in manifests().items():
        for doc in docs:
            if doc["kind"] == "RayJob":
                out[name] = doc["spec"]["entrypoint"]
            elif doc["kind"] == "RayCronJob":
                out[name] = doc["spec"]["jobTemplate"]["entrypoint"]
    return out


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def run_config_text() -> str:
    _, configmap = one("ConfigMap")
    return configmap["data"]["run.yaml"]


# --- KubeRay manifests against the CRDs ---------------------------------------------------------


def kubernetes_schema(node):
    """A CRD's openAPIV3Schema as a JSON Schema that `jsonschema` checks the way the API server
    does under `kubectl apply` (strict field validation, kubectl's default). OpenAPI v3.0 schema
    objects are JSON Schema draft 4 plus Kubernetes extensions, which jsonschema ignores:

    - `x-kubernetes-int-or-string: true` (resource quantities, ports) takes an integer or a
      string. controller-gen writes `anyOf: [integer, string]` beside the flag, which jsonschema
      already checks; a schema with the flag alone gets that anyOf here.
    - `nullable: true` also takes null.
    - Unknown fields are rejected (not silently pruned) unless the object says
      `x-kubernetes-preserve-unknown-fields`; in JSON Schema that is `additionalProperties: false`.

    CEL rules (`x-kubernetes-validations`) are not evaluated: the manifests set none of the fields
    that carry them (managedBy, deletionStrategy, gcsFaultToleranceOptions)."""
    if isinstance(node, list):
        return [kubernetes_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: kubernetes_schema(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> JSON Schema, for every served version of every CRD in CRD_DIR."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (set WSSS_KUBERAY_CRDS to their folder)")
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in load_documents(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schema = kubernetes_schema(version["schema"]["openAPIV3Schema"])
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    assert schemas, f"no CustomResourceDefinition in {CRD_DIR}"
    return schemas


def crd_errors(document: dict, schemas: dict[tuple[str, str], dict]) -> list[str]:
    key = (document["apiVersion"], document["kind"])
    assert key in schemas, f"no CRD serves {key}; CRDs found for {sorted(schemas)}"
    validator = jsonschema.Draft4Validator(schemas[key])
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


@pytest.mark.parametrize("name", sorted(p.name for p in KUBERAY.glob("*.yaml")))
def test_manifest_validates_against_kuberay_crds(name, crd_schemas):
    documents = load_documents(KUBERAY / name)
    assert documents, f"{name} holds no document"
    for doc in documents:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        if doc["apiVersion"].startswith("ray.io/"):
            errors = crd_errors(doc, crd_schemas)
            assert not errors, f"{name}: {doc['kind']} fails its CRD:\n  " + "\n  ".join(errors)


def test_manifests_cover_the_pipeline():
    kinds = sorted(d["kind"] for docs in manifests().values() for d in docs)
    assert kinds == ["ConfigMap", "NetworkPolicy", "RayCluster", "RayCronJob", "RayJob", "RayJob"]


def _set(document: dict, path: str, value) -> dict:
    broken = copy.deepcopy(document)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = broken
    for part in parents:
        node = node[part]
    node[last] = value
    return broken


@pytest.mark.parametrize(
    ("path", "value", "complaint"),
    [
        ("spec.workerGroupSpecs.0.replicas", "two", "spec.workerGroupSpecs.0.replicas"),
        ("spec.workerGroupSpecs.1.minReplica", 1, "'minReplica' was unexpected"),
        (
            "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.cpu",
            2.5,  # a quantity is an integer or a string, as the API server says
            "resources.limits.cpu",
        ),
        ("spec.autoscalerOptions.upscalingMode", "Fast", "'Fast' is not one of"),
    ],
)
def test_broken_manifest_fails_validation(crd_schemas, path, value, complaint):
    _, raycluster = one("RayCluster")
    errors = crd_errors(_set(raycluster, path, value), crd_schemas)
    assert any(complaint in e for e in errors), errors


def test_int_or_string_quantity_takes_an_integer(crd_schemas):
    _, raycluster = one("RayCluster")
    path = "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.cpu"
    assert crd_errors(_set(raycluster, path, 7), crd_schemas) == []


def test_kubernetes_schema_reads_the_extensions():
    schema = kubernetes_schema(
        {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True},
                "when": {"type": "string", "nullable": True},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        }
    )
    validator = jsonschema.Draft4Validator(schema)
    assert validator.is_valid({"port": 80, "when": None, "free": {"anything": 1}})
    assert validator.is_valid({"port": "http"})
    assert not validator.is_valid({"port": 1.5})
    assert not validator.is_valid({"prot": 80})


# --- cross-references ---------------------------------------------------------------------------


def test_jobs_create_the_raycluster_spec():
    _, raycluster = one("RayCluster")
    for name, spec in cluster_specs().items():
        assert spec == raycluster["spec"], f"{name}'s cluster spec differs from raycluster.yaml's"


def test_commands_the_cluster_relies_on_exist():
    missing = [c for c in REQUIRED_COMMANDS if c not in COMMANDS]
    assert not missing, f"`wsss` lacks subcommands the cluster jobs and docs run: {missing}"


def test_entrypoints_run_wsss_commands_with_the_mounted_config():
    _, configmap = one("ConfigMap")
    (key,) = configmap["data"]
    for name, spec in cluster_specs().items():
        head = spec["headGroupSpec"]["template"]["spec"]
        volumes = [v["name"] for v in head["volumes"] if v.get("configMap", {}).get("name")]
        mounted = {v["configMap"]["name"] for v in head["volumes"] if "configMap" in v}
        assert mounted == {configmap["metadata"]["name"]}, name
        (mount,) = [
            m for c in head["containers"] for m in c["volumeMounts"] if m["name"] in volumes
        ]
        config_path = f"{mount['mountPath']}/{key}"
        if name in JOB_COMMANDS:
            entrypoint = entrypoints()[name]
            assert WSSS_COMMAND.findall(entrypoint) == JOB_COMMANDS[name], entrypoint
            configs = re.findall(r"--config\s+(\S+)", entrypoint)
            assert configs == [config_path] * len(JOB_COMMANDS[name]), entrypoint
    assert set(entrypoints()) == set(JOB_COMMANDS)


def named_commands(text: str) -> list[str]:
    """The `wsss` subcommands a document names as code: in fenced blocks, in backticks, or on
    example command lines of YAML comments (`#   wsss ...`); prose is left alone."""
    fenced = re.findall(r"```.*?```", text, re.S)
    rest = re.sub(r"```.*?```", "", text, flags=re.S)
    code = fenced + re.findall(r"`[^`\n]+`", rest) + re.findall(r"^\s*#   .*$", rest, re.M)
    return [command for snippet in code for command in WSSS_COMMAND.findall(snippet)]


def test_docs_and_configs_name_only_existing_commands():
    paths = [DOCS, AWS_CONFIG, *sorted(KUBERAY.glob("*.yaml"))]
    named = {(p.name, c) for p in paths for c in named_commands(p.read_text())}
    named |= {(name, c) for name, text in entrypoints().items() for c in WSSS_COMMAND.findall(text)}
    assert {c for _, c in named} >= set(REQUIRED_COMMANDS)
    unknown = sorted((file, c) for file, c in named if c not in COMMANDS)
    assert not unknown, f"commands the CLI does not define (file, command): {unknown}"


def test_ray_pods_run_unprivileged_and_only_their_own_cluster_reaches_them():
    _, policy = one("NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert {"podSelector": {"matchLabels": selector}} in peers
    assert all("ipBlock" not in peer for peer in peers)  # nothing from outside the cluster
    for name, spec in cluster_specs().items():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            template = group["template"]
            assert template["metadata"]["labels"].items() >= selector.items(), name
            pod = template["spec"]["securityContext"]
            assert pod["runAsNonRoot"] and pod["runAsUser"] != 0, name
            empty = {v["name"] for v in template["spec"]["volumes"] if "emptyDir" in v}
            for container in template["spec"]["containers"]:
                security = container["securityContext"]
                assert security["allowPrivilegeEscalation"] is False, name
                assert security["capabilities"]["drop"] == ["ALL"], name
                # A read-only root: what Ray and the libraries write goes to emptyDirs.
                assert security["readOnlyRootFilesystem"] is True, name
                writable = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty}
                assert writable >= {"/tmp", "/home/ray/.cache"}, name


def test_gpu_group_requests_gpus_and_cpu_group_none():
    for name, spec in cluster_specs().items():
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"gpu", "cpu"}, name
        for group_name, group in groups.items():
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            params = group["rayStartParams"]
            for container in group["template"]["spec"]["containers"]:
                limits, requests = (
                    container["resources"]["limits"],
                    container["resources"]["requests"],
                )
                assert limits == requests, f"{name} {group_name}: requests must equal limits"
                assert float(params["num-cpus"]) <= float(limits["cpu"]), f"{name} {group_name}"
                gpus = int(limits.get("nvidia.com/gpu", 0))
                assert gpus == int(params.get("num-gpus", 0)), f"{name} {group_name}"
                assert (gpus >= 1) == (group_name == "gpu"), f"{name} {group_name}"


def test_one_image_of_this_version_with_the_locked_ray():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    (ray_version,) = [p["version"] for p in lock["package"] if p["name"] == "ray"]
    images = {c["image"] for spec in cluster_specs().values() for c in containers(spec)}
    assert len(images) == 1 and next(iter(images)).endswith(f"/wsss:{version}"), images
    assert {spec["rayVersion"] for spec in cluster_specs().values()} == {ray_version}
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == [f"rayproject/ray:{ray_version}-py311"]


def test_credentials_come_from_a_secret():
    secretish = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.I)
    seen = set()
    for name, spec in cluster_specs().items():
        for container in containers(spec):
            for var in container.get("env", []):
                if secretish.search(var["name"]):
                    assert "value" not in var, f"{name}: {var['name']} is written inline"
                    assert "secretKeyRef" in var["valueFrom"], f"{name}: {var['name']}"
                    seen.add(var["name"])
            assert "envFrom" not in container, name
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= seen


def test_jobs_clean_up_and_the_nightly_run_ends_before_the_next():
    _, cron = one("RayCronJob")
    minute, hour, *rest = cron["spec"]["schedule"].split()
    assert rest == ["*", "*", "*"] and minute.isdigit() and hour.isdigit(), "expected a daily run"
    assert 0 < cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600
    jobs = [d["spec"] for docs in manifests().values() for d in docs if d["kind"] == "RayJob"]
    for job in [*jobs, cron["spec"]["jobTemplate"]]:
        assert job["shutdownAfterJobFinishes"] is True
        assert job["ttlSecondsAfterFinished"] > 0
        assert job["backoffLimit"] >= 1


def test_run_config_validates_with_the_config_model(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(run_config_text())
    cfg = load_config(path)
    assert cfg.ray.use_gpu and cfg.ray.address == "auto"
    assert storage.is_s3(cfg.output) and storage.is_s3(cfg.dataset.manifest)
    assert cfg.log_dir.startswith("/tmp/")  # writable on the pods' read-only root


def min_nodes_kuberay(spec: dict) -> list[dict[str, float]]:
    """Ray resources of each node of a RayCluster spec at its minimum size."""

    def resources(group: dict) -> dict[str, float]:
        params = group["rayStartParams"]
        return {"CPU": float(params["num-cpus"]), "GPU": float(params.get("num-gpus", 0))}

    nodes = [resources(spec["headGroupSpec"])]
    for group in spec["workerGroupSpecs"]:
        nodes += [resources(group)] * group["minReplicas"]
    return nodes


def min_nodes_aws(config: dict) -> list[dict[str, float]]:
    """Ray resources of each node of a `ray up` config at its minimum size."""
    types = config["available_node_types"]
    nodes = [types[config["head_node_type"]]["resources"]]
    for name, node_type in types.items():
        if name != config["head_node_type"]:
            nodes += [node_type["resources"]] * node_type.get("min_workers", 0)
    return [{k: float(v) for k, v in node.items()} for node in nodes]


def host(monkeypatch, nodes: list[dict[str, float]]) -> None:
    """Make `ray.cluster_resources` and `ray.nodes` describe `nodes`."""
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    monkeypatch.setattr(ray, "cluster_resources", lambda: total)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": n} for n in nodes])


@pytest.mark.parametrize("where", ["kuberay", "aws"])
def test_cluster_at_minimum_size_hosts_the_run(tmp_path, monkeypatch, where):
    """The stages' own resource checks pass on the cluster as it starts, before any autoscaling:
    they count only the nodes that are up."""
    from pipelines.label import job as label
    from pipelines.train import job as train

    path = tmp_path / "run.yaml"
    path.write_text(run_config_text())
    cfg = load_config(path)
    if where == "kuberay":
        nodes = min_nodes_kuberay(one("RayCluster")[1]["spec"])
    else:
        nodes = min_nodes_aws(yaml.safe_load(AWS_CONFIG.read_text()))
    host(monkeypatch, nodes)
    train.check_cluster(cfg)  # train-classifier
    train.check_cluster(cfg, model_actors=True)  # train-affinity: CAM actors, then workers
    label.check_cluster(cfg)  # label


def test_resource_check_fails_when_the_gpu_group_is_too_small(tmp_path, monkeypatch):
    from pipelines.runtime import InsufficientResourcesError
    from pipelines.train.job import check_cluster

    path = tmp_path / "run.yaml"
    path.write_text(run_config_text())
    cfg = load_config(path)
    spec = copy.deepcopy(one("RayCluster")[1]["spec"])
    spec["workerGroupSpecs"][0]["minReplicas"] -= 1
    host(monkeypatch, min_nodes_kuberay(spec))
    with pytest.raises(InsufficientResourcesError, match="GPUs"):
        check_cluster(cfg, model_actors=True)


# --- the `ray up` config ------------------------------------------------------------------------


def ray_schema_errors(config: dict) -> list[str]:
    schema = json.loads(RAY_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in validator.iter_errors(config)
    ]


def test_aws_config_validates_against_ray_schema():
    config = yaml.safe_load(AWS_CONFIG.read_text())
    assert ray_schema_errors(config) == []
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu"]["resources"]["GPU"] >= 1 and "GPU" not in types["cpu"]["resources"]
    assert any("uv sync --locked" in c for c in config["setup_commands"])
    assert config["file_mounts"] == {"~/wsss": "."}


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("max_workers", "many", "max_workers"),
        ("idle_timeout_minute", 5, "'idle_timeout_minute' was unexpected"),
    ],
)
def test_broken_aws_config_fails_validation(key, value, complaint):
    config = yaml.safe_load(AWS_CONFIG.read_text())
    config[key] = value
    assert any(complaint in e for e in ray_schema_errors(config))


# --- the local S3 service -----------------------------------------------------------------------


def refuses_connections(endpoint: str) -> bool:
    host, port = endpoint.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def make_folder(root: Path) -> dict[str, bytes]:
    files = {"manifest.jsonl": b'{"image": "a.png"}\n', "images/a.png": b"\x89PNG", "x/y/z": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_local_s3_serves_an_uploaded_folder(tmp_path, monkeypatch):
    files = make_folder(tmp_path / "ds")
    bucket = f"local-{uuid.uuid4().hex[:8]}"
    with LocalS3() as server:
        for name, value in server.environment().items():
            monkeypatch.setenv(name, value)  # the credentials pyarrow reads
        endpoint = server.endpoint
        server.create_bucket(bucket)
        assert server.upload(tmp_path / "ds", bucket, "datasets/ds/") == len(files)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        listed = client.list_objects_v2(Bucket=bucket)["Contents"]
        assert sorted(o["Key"] for o in listed) == sorted(f"datasets/ds/{k}" for k in files)
        # The pipelines read it through their own storage layer.
        cfg = storage.StorageConfig(s3_endpoint_url=endpoint, s3_region="us-east-1")
        uri = f"s3://{bucket}/datasets/ds/manifest.jsonl"
        assert storage.read_bytes(uri, cfg) == files["manifest.jsonl"]
    assert refuses_connections(endpoint)


# Lists the bucket through the environment only (as wsss would), records what it saw, exits 3.
LIST_AND_FAIL = """
import json, os, sys, boto3
keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=sys.argv[1])["Contents"]]
names = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
env = {k: os.environ.get(k) for k in names}
json.dump({"env": env, "keys": keys}, open(sys.argv[2], "w"))
sys.exit(3)
"""


def test_run_returns_the_command_status_and_stops_the_server(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a-real-looking-key")  # replaced for the command
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-real-session")  # dropped for the command
    files = make_folder(tmp_path / "ds")
    bucket = f"run-{uuid.uuid4().hex[:8]}"
    seen = tmp_path / "seen.json"
    command = [sys.executable, "-c", LIST_AND_FAIL, bucket, str(seen)]
    status = local_s3.main(
        ["run", "--bucket", bucket, "--upload", f"{tmp_path / 'ds'}:in", "--", *command]
    )
    assert status == 3
    record = json.loads(seen.read_text())
    assert sorted(record["keys"]) == sorted(f"in/{k}" for k in files)
    assert record["env"]["AWS_ACCESS_KEY_ID"] == local_s3.FAKE_KEY
    assert record["env"]["AWS_SESSION_TOKEN"] is None
    assert refuses_connections(record["env"]["AWS_ENDPOINT_URL_S3"])


def test_run_reports_a_command_that_cannot_start():
    assert local_s3.run(["/nonexistent/wsss-command"], bucket=f"b-{uuid.uuid4().hex[:8]}") == 127


def test_bad_arguments_are_reported_and_stop_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        local_s3.main(["run", "--bucket", "wsss-test", "--"])  # no command
    assert "needs a command" in capsys.readouterr().err
    assert (
        local_s3.main(["run", "--bucket", "wsss-test", "--upload", "no-colon", "--", "true"]) == 2
    )
    assert "DIR:PREFIX" in capsys.readouterr().err
    missing = tmp_path / "missing"
    assert (
        local_s3.main(["run", "--bucket", "wsss-test", "--upload", f"{missing}:p", "--", "true"])
        == 2
    )
    assert f"{missing} is not a folder" in capsys.readouterr().err
    assert local_s3.main(["run", "--bucket", "b", "--", "true"]) == 2  # 3 to 63 characters
    assert "--bucket 'b'" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind((local_s3.HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert (
            local_s3.main(["run", "--bucket", "wsss-test", "--port", str(port), "--", "true"]) == 2
        )
    assert f"--port {port}" in capsys.readouterr().err


# Records its pid and the endpoint (whole, by a rename), then waits to be stopped.
RECORD_AND_WAIT = """
import json, os, sys, time
with open(sys.argv[1] + ".part", "w") as f:
    json.dump({"pid": os.getpid(), "endpoint": os.environ["AWS_ENDPOINT_URL_S3"]}, f)
os.replace(sys.argv[1] + ".part", sys.argv[1])
time.sleep(120)
"""


def test_sigterm_stops_the_command_and_the_server(tmp_path):
    seen = tmp_path / "seen.json"
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "cluster.local_s3", "run", "--bucket", "wsss-test", "--"]
        + [sys.executable, "-c", RECORD_AND_WAIT, str(seen)],
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not seen.exists() and time.monotonic() < deadline:
            assert wrapper.poll() is None, wrapper.stderr.read().decode()
            time.sleep(0.1)
        record = json.loads(seen.read_text())
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(record["pid"], 0)  # the command went with it
    assert refuses_connections(record["endpoint"])
