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
    assert any(f"pip install --quiet -e {t}" in setup or f"-e {t}" in setup for t in repo_targets)
    assert re.search(r"torch==\d", setup), "torch is not pinned"
    excluded = set(config["rsync_exclude"])
    for entry in (".venv", "/runs", "/data", ".git"):
        assert entry in excluded, f"rsync_exclude lacks {entry}"
