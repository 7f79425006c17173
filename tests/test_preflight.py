"""The preflight's refusals and probe, without a cluster: what a multi-node run may not use, and
what a probe reports (tests/test_cluster.py runs them on two Ray nodes)."""

from __future__ import annotations

import pytest

from medgpt import preflight
from medgpt.errors import ConfigError
from medgpt.testing import free_port


def test_one_node_may_use_anything() -> None:
    preflight.check_settings(1, "/data/runs", "sqlite:////data/mlflow.db", "job.storage_path")


def test_local_storage_is_refused_on_two_nodes(monkeypatch) -> None:
    monkeypatch.delenv(preflight.SHARED_STORAGE_ENV, raising=False)
    with pytest.raises(ConfigError) as e:
        preflight.check_settings(2, "/data/runs", "http://mlflow:5001", "job.storage_path")
    assert str(e.value) == (
        "job.storage_path: '/data/runs' is a local folder, but this Ray cluster has 2 nodes and "
        "they share no disk; use object storage (s3://BUCKET/runs, gs://BUCKET/runs, e.g. "
        "MEDGPT_STORAGE), or set MEDGPT_SHARED_STORAGE=1 if it is a mount every node shares"
    )
    monkeypatch.setenv(preflight.SHARED_STORAGE_ENV, "1")
    preflight.check_settings(2, "/data/runs", "http://mlflow:5001", "job.storage_path")


@pytest.mark.parametrize(
    "uri", ["sqlite:////data/mlflow.db", "file:///data/mlruns", "/data/mlruns", "mlruns"]
)
def test_local_tracking_is_refused_on_two_nodes(uri) -> None:
    with pytest.raises(ConfigError, match=r"MLflow tracking URI .* is a local store, but this Ray "
                       r"cluster has 3 nodes.*MLFLOW_TRACKING_URI=http://HOST:PORT"):  # fmt: skip
        preflight.check_settings(3, "s3://b/runs", uri, "job.storage_path")


def test_remote_settings_pass_on_two_nodes() -> None:
    preflight.check_settings(2, "s3://b/runs", "https://mlflow.example.com", "job.storage_path")
    preflight.check_settings(2, "gs://b/runs", "http://10.0.0.2:5001", "job.storage_path")


def test_probe_names_an_unreachable_server() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    problems = preflight.probe_here(None, dead)
    assert len(problems) == 1 and problems[0].startswith(f"tracking: {dead}/health not reachable")
    assert preflight.probe_here("/local/runs", "sqlite:///x.db") == []  # nothing to probe
    with pytest.raises(preflight.PreflightError, match="preflight: tracking: "):
        preflight.check_local(None, dead)
