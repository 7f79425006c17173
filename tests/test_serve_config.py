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
