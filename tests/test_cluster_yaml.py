"""Every `ray up` file at the repository root (cluster*.yaml) passes Ray's own validation and
our policy for a cluster that is reachable from the internet.

Ray's validation is the part of `ray up` that needs no cloud: ``prepare_config`` merges the
provider's defaults.yaml shipped in the wheel (the defaults are read from a file, not from an
SDK) and ``validate_config`` checks the result against ``ray-schema.json``: types, required
keys, unknown keys. What `ray up` does next (``bootstrap_config``, and on AWS filling in
missing node resources) calls EC2/GCE APIs through boto3 or the Google client, so it is not
run here; the ``offline`` fixture makes any network access an error, so a Ray version that
started calling out from these two functions would fail loudly instead of hanging.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(REPO.glob("cluster*.yaml"))
CLOUD_SDKS = ("boto3", "botocore", "googleapiclient", "google.cloud", "azure")


def _ids(path: Path) -> str:
    return path.name


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access during offline validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), f"{path.name}: not a mapping"
    return config


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before it talks to the cloud; returns the merged config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def head_type(config: dict[str, Any]) -> dict[str, Any]:
    return config["available_node_types"][config["head_node_type"]]


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {k: v for k, v in config["available_node_types"].items() if k != head}


def ray_start(commands: list[str], what: str) -> str:
    """The one start command that runs `ray start` (with everything exported before it)."""
    found = [c for c in commands if re.search(r"\bray start\b", c)]
    assert len(found) == 1, f"{what}: expected one `ray start` command, found {len(found)}"
    return found[0]


def test_cluster_files_exist() -> None:
    assert REPO / "cluster.yaml" in CLUSTER_FILES


# --- Ray's own validation ---------------------------------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_ray_validation_passes_offline(path: Path, offline: None) -> None:
    before = set(sys.modules)
    prepared = ray_validate(load(path))
    imported = {m for m in set(sys.modules) - before if m.startswith(CLOUD_SDKS)}
    assert not imported, f"offline validation imported cloud SDKs: {sorted(imported)}"
    # The shipped defaults must not leak in where we mean to override them.
    assert "0.0.0.0" not in json.dumps(prepared), "a Ray default with 0.0.0.0 survived the merge"
    for name, node_type in prepared["available_node_types"].items():
        assert node_type["min_workers"] <= node_type["max_workers"], name


def _first_gpu_worker(config: dict[str, Any]) -> str:
    return next(k for k, v in worker_types(config).items() if v.get("resources", {}).get("GPU"))


def _fractional_gpu(config: dict[str, Any]) -> None:
    config["available_node_types"][_first_gpu_worker(config)]["resources"]["GPU"] = 0.5


def _missing_resources(config: dict[str, Any]) -> None:
    del config["available_node_types"][_first_gpu_worker(config)]["resources"]


def _unknown_top_level_key(config: dict[str, Any]) -> None:
    config["worker_count"] = 3


BROKEN = {
    # (edit, text the error must contain, a key the error's path must contain or None)
    "fractional-gpu": (_fractional_gpu, "0.5 is not of type 'integer'", "GPU"),
    "missing-resources": (_missing_resources, "'resources' is a required property", None),
    "unknown-top-level-key": (_unknown_top_level_key, "'worker_count' was unexpected", None),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_ray_validation_rejects_broken_variant(path: Path, case: str, offline: None) -> None:
    edit, message, key = BROKEN[case]
    config = load(path)
    ray_validate(config)  # the real file passes, so the edit is what breaks it
    broken = copy.deepcopy(config)
    edit(broken)
    with pytest.raises(jsonschema.ValidationError) as excinfo:
        ray_validate(broken)
    assert message in excinfo.value.message
    if key is not None:
        assert key in list(excinfo.value.absolute_path), list(excinfo.value.absolute_path)


# --- our policy --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_no_listener_on_every_interface(path: Path) -> None:
    assert "0.0.0.0" not in path.read_text()


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_head_takes_no_work(path: Path) -> None:
    config = load(path)
    head = head_type(config)
    assert head["resources"].get("CPU") == 0, "Train/Tune/Serve must never be placed on the head"
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_gpu_worker_types(path: Path) -> None:
    workers = worker_types(load(path))
    gpus = {name: t["resources"].get("GPU", 0) for name, t in workers.items()}
    assert 1 in gpus.values(), f"no single-GPU type for serving: {gpus}"
    assert any(n > 1 for n in gpus.values()), f"no multi-GPU type for training: {gpus}"
    for name, t in workers.items():
        assert t["resources"].get("CPU", 0) >= 1, name
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], name
        assert t["max_workers"] >= 1, name


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_dashboard_on_localhost(path: Path) -> None:
    start = ray_start(load(path)["head_start_ray_commands"], "head_start_ray_commands")
    hosts = re.findall(r"--dashboard-host[= ](\S+)", start)
    assert hosts == ["127.0.0.1"], f"dashboard host: {hosts}"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_token_auth_on_every_node(path: Path) -> None:
    config = load(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = ray_start(config[key], key)
        assert "RAY_AUTH_MODE=token" in start, f"{key}: token auth is not enabled"
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=\"?([^\"\s]+)", start)
        assert token_path, f"{key}: RAY_AUTH_TOKEN_PATH not set"
        # `ray up` does not distribute tokens: the path must be one that file_mounts fills.
        remote = token_path.group(1).replace("$HOME/", "~/")
        assert remote in config["file_mounts"], f"{key}: {remote} is not in file_mounts"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_network_is_pre_created(path: Path) -> None:
    """Without these, Ray opens SSH to the whole internet (AWS: a security group it creates;
    GCP: the default network and its firewall rules)."""
    config = load(path)
    provider = config["provider"]["type"]
    for name, t in config["available_node_types"].items():
        node = t["node_config"]
        if provider == "aws":
            groups = node.get("SecurityGroupIds") or []
            assert groups and all(g.startswith("sg-") for g in groups), name
        elif provider == "gcp":
            interfaces = node.get("networkInterfaces") or []
            assert interfaces, f"{name}: no networkInterfaces (Ray would use the default network)"
            for interface in interfaces:
                where = interface.get("subnetwork") or interface.get("network") or ""
                assert where and not where.endswith("/default"), f"{name}: {where!r}"
        else:
            pytest.fail(f"{path.name}: no network policy for provider {provider!r}")
    assert "security_group" not in config["provider"], "let Ray manage no security group"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_nodes_are_fully_specified(path: Path) -> None:
    """Image, identity and login are ours, not Ray's fallbacks (an old image, a role without
    storage access on the workers, a key pair Ray makes up)."""
    config = load(path)
    provider = config["provider"]["type"]
    for name, t in config["available_node_types"].items():
        node = t["node_config"]
        if provider == "aws":
            for key in ("InstanceType", "ImageId", "KeyName", "IamInstanceProfile"):
                assert node.get(key), f"{name}: {key} missing"
        elif provider == "gcp":
            assert node.get("machineType"), name
            assert any(d.get("initializeParams", {}).get("sourceImage") for d in node["disks"])
            if name != config["head_node_type"]:
                assert node.get("serviceAccounts"), f"{name}: no service account for storage"
    if provider == "aws":
        assert config["auth"].get("ssh_private_key"), "a pre-created key pair"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_idle_timeout(path: Path) -> None:
    timeout = load(path).get("idle_timeout_minutes")
    assert isinstance(timeout, (int, float)) and timeout > 0


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_project_is_mounted_and_installed(path: Path) -> None:
    config = load(path)
    mounts = config["file_mounts"]
    repo_targets = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert repo_targets, "the repository is not in file_mounts"
    setup = " ".join(config["setup_commands"])
    # Installed with the cluster extra (boto3, psycopg, ...): `-e "$HOME/medgpt[cluster]"`.
    installs = re.findall(r"pip install [^&;]*?-e \"?(\S+?)\[cluster\]\"?(?:\s|$)", setup)
    assert installs, "the project is not installed with its cluster extra"
    assert {i.replace("$HOME/", "~/") for i in installs} <= set(repo_targets), installs
    assert re.search(r"torch==\d", setup), "torch is not pinned"
    excluded = set(config["rsync_exclude"])
    for entry in (".venv", "/runs", "/data", ".git"):
        assert entry in excluded, f"rsync_exclude lacks {entry}"


# --- storage and tracking: object storage, MLflow on PostgreSQL, nothing on the shared disk ------

OBJECT_SCHEME = {"aws": "s3://", "gcp": "gs://"}
MLFLOW_PORT = 5001


def _scheme(config: dict[str, Any]) -> str:
    return OBJECT_SCHEME[config["provider"]["type"]]


def _all_commands(config: dict[str, Any]) -> list[str]:
    keys = [k for k in config if k.endswith("_commands")]
    return [c for k in keys for c in config[k] or []]


def node_env(config: dict[str, Any]) -> dict[str, str]:
    """The variables the common setup writes into ~/medgpt.env (every node sources it)."""
    writes = [c for c in config["setup_commands"] if re.search(r"(?<!>)> ~/medgpt\.env", c)]
    assert len(writes) == 1, f"expected one command that writes ~/medgpt.env, found {len(writes)}"
    return dict(re.findall(r"'export ([A-Z_][A-Z0-9_]*)=([^']*)'", writes[0]))


def mlflow_server(config: dict[str, Any]) -> str:
    found = [c for c in config["head_start_ray_commands"] if re.search(r"mlflow\"? server\b", c)]
    assert len(found) == 1, f"expected one `mlflow server` command on the head, found {len(found)}"
    return found[0]


def _option(command: str, name: str) -> str:
    m = re.search(rf"{name}[= ](\"[^\"]*\"|\S+)", command)
    assert m, f"{name} not given"
    return m.group(1).strip('"')


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_mlflow_on_postgresql_with_artifacts_in_the_bucket(path: Path) -> None:
    config = load(path)
    server = mlflow_server(config)
    store = _option(server, "--backend-store-uri")
    assert store.startswith("postgresql+psycopg://"), f"backend store: {store}"
    # The password comes from ~/.pgpass (PGPASSFILE), never the URI: user@host, no user:pass@.
    assert not re.match(r"postgresql\+psycopg://[^@/]*:[^@/]*@", store), "password in the URI"
    artifacts = _option(server, "--artifacts-destination")
    assert artifacts.startswith(_scheme(config)), f"artifacts: {artifacts}"
    storage = node_env(config)["MEDGPT_STORAGE"]
    assert _bucket(artifacts) == _bucket(storage), "MLflow artifacts and runs in different buckets"
    assert _option(server, "--port") == str(MLFLOW_PORT)
    assert _option(server, "--host") == "$MEDGPT_HEAD_IP", "MLflow must bind the private address"
    assert "PGPASSFILE=" in server
    head_setup = " ".join(config["head_setup_commands"])
    assert "umask 077" in head_setup and "~/.pgpass" in head_setup, "no private ~/.pgpass"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_no_database_on_the_shared_disk(path: Path) -> None:
    config = load(path)
    commands = _all_commands(config)
    text = "\n".join(commands)
    assert "sqlite" not in text, "an sqlite store: one node's file, not a cluster's database"
    assert not re.search(r"/mnt/shared/mlflow|mlflow\.db", text), "MLflow data on NFS"
    # The MLflow service runs outside the mount; the mount is for datasets only.
    server = mlflow_server(config)
    workdir = re.search(r"WorkingDirectory=\"?([^\"\s]+)", server)
    assert workdir and not workdir.group(1).startswith("/mnt"), workdir
    for c in commands:
        if re.search(r"\bmount -t nfs", c):
            mount_point = re.findall(r"(\S+:\S*)\s+(/\S+)", c)
            assert all(mp == "/mnt/shared" for _, mp in mount_point), mount_point
    mkdirs = " ".join(re.findall(r"mkdir -p ([^&;]+)", text))
    assert "/mnt/shared/" not in mkdirs.replace("/mnt/shared/data", ""), mkdirs


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_storage_and_tracking_on_every_node(path: Path) -> None:
    config = load(path)
    env = node_env(config)
    storage = env.get("MEDGPT_STORAGE", "")
    assert re.fullmatch(rf"{_scheme(config)}[a-z0-9.\-_A-Z]+/runs", storage), storage
    # Both start commands source the file before `ray start`, so the raylet and with it every
    # Ray worker (Train, Tune, Serve) inherit MEDGPT_STORAGE and MLFLOW_TRACKING_URI.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = ray_start(config[key], key)
        assert start.index("source ~/medgpt.env") < start.index("ray start"), key
    for key in ("head_setup_commands", "worker_setup_commands"):
        lines = [c for c in config[key] if "MLFLOW_TRACKING_URI" in c]
        assert len(lines) == 1, f"{key}: MLFLOW_TRACKING_URI is not exported"
        assert f'MLFLOW_TRACKING_URI="http://$MEDGPT_HEAD_IP:{MLFLOW_PORT}"' in lines[0], lines[0]
        assert ">> ~/medgpt.env" in lines[0], key
    # The setup commands run before the head/worker ones, which append to the file it wrote.
    assert "MEDGPT_HEAD_IP" in " ".join(config["worker_setup_commands"])


SECRETS = [
    r"AWS_ACCESS_KEY_ID",
    r"AWS_SECRET_ACCESS_KEY",
    r"AWS_SESSION_TOKEN",
    r"\bAKIA[0-9A-Z]{16}\b",  # an AWS access key id
    r"GOOGLE_APPLICATION_CREDENTIALS",
    r"BEGIN [A-Z ]*PRIVATE KEY",
    r"\"private_key\"",  # a service-account key file pasted in
    r"PGPASSWORD",
    r"MLFLOW_TRACKING_PASSWORD",
    r"postgres(?:ql)?(?:\+\w+)?://[^@\s/\"]*:[^@\s/\"]*@",  # user:password@ in a database URI
]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids)
def test_no_credentials_in_the_file(path: Path) -> None:
    """Instance profiles / service accounts give the nodes their rights; the database password
    is fetched on the head from SSM / Secret Manager."""
    text = path.read_text()
    for pattern in SECRETS:
        assert not re.search(pattern, text), f"{path.name}: matches {pattern}"


@pytest.mark.parametrize("pattern", SECRETS)
def test_credential_patterns_catch_what_they_name(pattern: str) -> None:
    samples = {
        "AWS_ACCESS_KEY_ID": "export AWS_ACCESS_KEY_ID=x",
        "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY: y",
        "AWS_SESSION_TOKEN": "AWS_SESSION_TOKEN=z",
        "AKIA": "key AKIAABCDEFGHIJKLMNOP here",
        "GOOGLE_APPLICATION": "GOOGLE_APPLICATION_CREDENTIALS=/k.json",
        "PRIVATE KEY": "-----BEGIN RSA PRIVATE KEY-----",
        "private_key": '{"private_key": "..."}',
        "PGPASSWORD": "PGPASSWORD=secret",
        "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD=p",
        "postgres": "--backend-store-uri postgresql+psycopg://mlflow:hunter2@db:5432/mlflow",
    }
    sample = next(v for k, v in samples.items() if k in pattern)
    assert re.search(pattern, sample)
    assert not re.search(pattern, "postgresql+psycopg://mlflow@db:5432/mlflow?sslmode=require")
