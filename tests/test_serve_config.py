"""serve/config.yaml and `medgpt serve`: the config is valid for Ray Serve, and wrong
checkpoints or args fail at once with one line (before any Ray or replica starts)."""

from __future__ import annotations

import pytest
import yaml

from medgpt.cli import main
from medgpt.serving import ServeConfig
from tests.conftest import REPO

CONFIG = REPO / "serve" / "config.yaml"


def test_config_file_is_a_valid_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "medgpt.serving:app_builder"
    cfg = ServeConfig(**app.args)
    assert cfg.checkpoint == "models:/medgpt@champion"
    deployment = raw["applications"][0]["deployments"][0]
    # The engine, not Serve's router, should decide when to push back.
    assert deployment["max_ongoing_requests"] >= cfg.max_batch_size + cfg.max_queue


def test_serve_run_accepts_the_configs_builder(tmp_path) -> None:
    """What `serve run serve/config.yaml` does with import_path and args, through Serve's own
    code: the builder is accepted (one parameter) and called — the missing checkpoint is then
    our error, not Serve's TypeError about the builder's signature."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    from medgpt.errors import CheckpointError

    app = yaml.safe_load(CONFIG.read_text())["applications"][0]
    builder = import_attr(app["import_path"])
    args = {**app["args"], "checkpoint": str(tmp_path / "nope"), "storage_path": str(tmp_path)}
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        call_user_app_builder_with_args_if_necessary(builder, args)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--checkpoint", "/no/such/folder"], "no such checkpoint"),
        (["--checkpoint", "models:/nosuch@champion"], "no MLflow store at"),
    ],
)
def test_serve_with_a_bad_checkpoint_exits_2(flags, message, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc = main(["serve", *flags, "--storage-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_serve_with_bad_args_in_the_config_exits_2(tmp_path, capsys) -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    raw["applications"][0]["args"]["max_batch"] = 4  # a typo of max_batch_size
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "max_batch" in err and len(err.strip().splitlines()) == 1, err
