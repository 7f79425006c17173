"""serve/config.yaml and `medgpt serve`: the config is valid for Ray Serve, and wrong
checkpoints or args fail at once with one line (before any Ray or replica starts)."""

from __future__ import annotations

import pytest
import yaml

from medgpt.cli import main
from medgpt.errors import ConfigError
from medgpt.serving import DEFAULT_CONFIG, ServeConfig, load_serve_file
from medgpt.testing import own_lines

CONFIG = DEFAULT_CONFIG


def test_config_file_is_a_valid_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "medgpt.serving:app_builder"
    cfg = ServeConfig.from_dict(app.args)
    assert cfg.checkpoint == "models:/medgpt@champion"
    # The replica's options are set in args, once: no deployments section to disagree with.
    assert "deployments" not in raw["applications"][0]
    options = cfg.deployment_options()
    # The engine, not Serve's router, should decide when to push back.
    assert options["max_ongoing_requests"] >= cfg.max_batch_size + cfg.max_queue
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    assert options["autoscaling_config"]["max_replicas"] == 2


def test_deployment_options_follow_the_config() -> None:
    cfg = ServeConfig(max_batch_size=4, max_queue=10, num_cpus=0.5)
    opts = cfg.deployment_options()
    assert opts["max_ongoing_requests"] == 4 + 10 + 16 and opts["num_replicas"] == 1
    assert opts["ray_actor_options"]["num_cpus"] == 0.5 and "autoscaling_config" not in opts
    assert ServeConfig(max_ongoing_requests=7).deployment_options()["max_ongoing_requests"] == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"max_batch": 4}, "unknown key args.max_batch (allowed: "),
        ({"max_batch_size": 0}, "args.max_batch_size: must be in 1..256"),
        ({"max_batch_size": "8"}, "args.max_batch_size: expected int"),
        ({"kv_cache_tokens": 2.5}, "args.kv_cache_tokens: expected int or null"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas <= max_replicas"),
        ({"device": "tpu"}, "allowed: auto, cpu, cuda, cuda:N"),
        ({"int8": "yes"}, "args.int8: expected bool"),
        ({"device": "cuda"}, "needs a GPU reserved for the replica (num_gpus > 0, --num-gpus)"),
        ({"int8": True, "num_gpus": 1}, "int8: the weight-only int8 linears run on CPU only"),
        (
            {"int8": True, "num_gpus": 1, "device": "cuda:0"},
            "int8: the weight-only int8 linears run on CPU only",
        ),
    ],
)
def test_bad_args_name_the_key(tmp_path, args, message) -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    raw["applications"][0]["args"].update(args)
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=None) as e:
        load_serve_file(bad)
    assert str(e.value).startswith(f"{bad}: ") and message in str(e.value), e.value


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
    assert rc == 2 and message in err and len(own_lines(err)) == 1, err


def test_serve_with_bad_args_in_the_config_exits_2(tmp_path, capsys) -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    raw["applications"][0]["args"]["max_batch"] = 4  # a typo of max_batch_size
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "max_batch" in err and len(own_lines(err)) == 1, err


def test_demo_with_a_bad_checkpoint_exits_2_before_starting_anything(tmp_path, capsys) -> None:
    rc = main(["demo", "--checkpoint", str(tmp_path / "nope"), "--storage", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 2 and "no such checkpoint" in captured.err, captured
    assert len(own_lines(captured.err)) == 1, captured.err


@pytest.mark.parametrize(
    ("args", "device"),
    [
        ({}, "cpu"),  # no GPU reserved: the CPU, whatever the replica can see
        ({"num_gpus": 1}, "cuda"),
        ({"num_gpus": 0.5, "device": "cuda:0"}, "cuda:0"),
        ({"num_gpus": 1, "device": "cpu"}, "cpu"),
    ],
)
def test_replica_device_follows_the_reserved_gpus(args, device) -> None:
    from medgpt.serving.config import ServeConfig

    assert ServeConfig.from_dict(args).replica_device() == device


def test_serve_refuses_int8_on_a_gpu_before_deploying(capsys) -> None:
    """`medgpt serve --int8 --num-gpus 1` used to deploy and crash-loop inside the replica."""
    from medgpt.cli import main

    assert main(["serve", "--int8", "--num-gpus", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int8: the weight-only int8 linears run on CPU only" in err[0], err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"dtype": "float64"}, "args.dtype: 'float64' (allowed: float32, bfloat16, float16)"),
        ({"dtype": "bf16"}, "args.dtype: 'bf16' (allowed: float32, bfloat16, float16)"),
        ({"dtype": 16}, "args.dtype: expected str"),
        # Half precision on a CPU replica: no GPU reserved, or the CPU chosen beside one.
        ({"dtype": "bfloat16"}, "args.dtype: bfloat16 on a CPU replica (num_gpus 0 or device cpu)"),
        ({"dtype": "float16"}, "args.dtype: float16 on a CPU replica"),
        ({"dtype": "bfloat16", "num_gpus": 1, "device": "cpu"}, "bfloat16 on a CPU replica"),
        ({"dtype": "bfloat16", "int8": True}, "args.dtype: bfloat16 with int8: int8 replaces"),
        ({"dtype": "float16", "int8": True}, "args.dtype: float16 with int8"),
        # int8 on a GPU is refused as before, whatever the dtype.
        ({"dtype": "bfloat16", "int8": True, "num_gpus": 1}, "int8: the weight-only int8 linears"),
    ],
)
def test_bad_dtypes_name_the_key_and_what_to_do(tmp_path, args, message) -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    raw["applications"][0]["args"].update(args)
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_serve_file(bad)
    assert str(e.value).startswith(f"{bad}: ") and message in str(e.value), e.value
    assert len(str(e.value).splitlines()) == 1


def test_the_cpu_refusal_of_half_dtypes_says_why_and_what_instead() -> None:
    with pytest.raises(ConfigError) as e:
        ServeConfig(dtype="bfloat16")
    msg = str(e.value)
    assert "far slower than float32" in msg and "CPU decode kernels are float32" in msg
    assert "use dtype float32" in msg and "num_gpus > 0" in msg, msg


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"dtype": "float32", "int8": True},
        {"dtype": "bfloat16", "num_gpus": 1},
        {"dtype": "float16", "num_gpus": 0.5, "device": "cuda:0"},
        {"dtype": "bfloat16", "num_gpus": 1, "device": "cuda"},
    ],
)
def test_good_dtypes_are_accepted(args) -> None:
    cfg = ServeConfig.from_dict(args)
    assert cfg.dtype == args.get("dtype", "float32")
    assert cfg.to_dict()["dtype"] == cfg.dtype


def test_the_config_file_serves_float32() -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    assert raw["applications"][0]["args"]["dtype"] == "float32"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtype", "bfloat16"], "args.dtype: bfloat16 on a CPU replica"),
        (["--dtype", "float16", "--device", "cpu"], "args.dtype: float16 on a CPU replica"),
        (["--dtype", "bfloat16", "--num-gpus", "1", "--device", "cpu"], "on a CPU replica"),
        (["--dtype", "bfloat16", "--int8"], "args.dtype: bfloat16 with int8"),
        (["--dtype", "float16", "--int8", "--num-gpus", "1"], "int8: the weight-only int8"),
    ],
)
def test_serve_refuses_bad_dtypes_before_deploying(flags, message, capsys) -> None:
    """Checked with the serve file, before Ray starts: one line, exit 2."""
    assert main(["serve", *flags]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0], err
    assert err[0].startswith("medgpt serve: error: "), err


def test_serve_dtype_flag_takes_only_the_known_dtypes(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--dtype", "float64"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype: invalid choice: 'float64'" in err and "bfloat16" in err, err
