"""GPU code paths that can be checked without a GPU: the MFU peak table by device name, and
restoring a checkpoint's CUDA generators on a worker that sees fewer devices."""

from __future__ import annotations

import pytest
import torch

from medgpt import training


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10G", 125e12),
        ("NVIDIA A10", 125e12),
        ("Tesla T4", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_table_matches_whole_model_names(name, peak) -> None:
    assert training.gpu_peak_flops(name) == peak


def test_rng_restore_with_fewer_visible_gpus(monkeypatch) -> None:
    """Saved on a node with 4 visible GPUs, restored where a worker sees 1: the first is set,
    nothing raises (it used to be IndexError inside set_rng_state_all)."""
    restored: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((i, s)))
    gens = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    cpu = torch.get_rng_state()
    training._set_rng_state({"torch": cpu, "cuda": gens})
    assert [(i, int(s[0])) for i, s in restored] == [(0, 0)]
    assert torch.equal(torch.get_rng_state(), cpu)
    restored.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # more than were saved
    training._set_rng_state({"torch": cpu, "cuda": gens})
    assert [i for i, _ in restored] == [0, 1, 2, 3]


def test_compile_problem_names_missing_headers_and_compiler(monkeypatch, tmp_path) -> None:
    import shutil
    import sysconfig

    real = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {**real, "include": str(tmp_path)})
    assert "the Python headers are missing" in training.compile_problem()
    (tmp_path / "Python.h").write_text("")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert training.compile_problem().startswith("no C compiler on PATH")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    assert training.compile_problem() is None


def test_compile_falls_back_to_eager_unless_required(capsys) -> None:
    from medgpt.errors import ConfigError

    assert training.use_compile(True, None, True) is True
    assert training.use_compile(False, "no headers", True) is False
    assert training.use_compile(True, "no headers", True) is False
    assert capsys.readouterr().out.count("torch.compile is off for this run: no headers") == 1
    assert training.use_compile(True, "no headers", False) is False
    assert capsys.readouterr().out == ""  # only rank 0 says it
    with pytest.raises(ConfigError, match=r"train\.compile: required, but torch\.compile cannot "
                       r"build here: no headers"):  # fmt: skip
        training.use_compile("required", "no headers", True)


def test_compile_setting_is_checked() -> None:
    from medgpt.config import TrainConfig, from_mapping
    from medgpt.errors import ConfigError

    assert from_mapping(TrainConfig, {"compile": "required"}).compile == "required"
    with pytest.raises(ConfigError, match=r"compile: 'yes' \(allowed: true, false, required\)"):
        from_mapping(TrainConfig, {"compile": "yes"})


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch) -> None:
    """Per-block recomputation (train.activation_checkpointing) with dropout on: same loss and
    gradients as keeping the activations, since the recomputed dropout masks are the same."""
    import torch.utils.checkpoint

    from medgpt.testing.models import random_ids, tiny_gpt

    calls: list[int] = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))  # fmt: skip
    grads = []
    for recompute in (False, True):
        model = tiny_gpt(seed=3, dropout=0.1)
        model.train()
        model.activation_checkpointing = recompute
        x = random_ids(seed=1)
        torch.manual_seed(7)  # the same dropout masks in both runs
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, a), (loss_b, b) = grads
    assert len(calls) == tiny_gpt().config.n_layer  # once per block, in the second run only
    assert loss_a == loss_b
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_training_agrees_with_eager(icd_data, tmp_path) -> None:
    """train.compile on the CPU (inductor's C++, the build tools the GPU path needs too): the
    same losses as eager within float rounding of its fused kernels, and really compiled."""
    import torch._dynamo

    from medgpt.config import Recipe
    from medgpt.testing.training import tiny_recipe
    from medgpt.training import discard_report, local_context, run_loop

    if training.compile_problem():
        pytest.skip(training.compile_problem())
    torch.set_num_threads(1)
    runs = {}
    for setting in (False, True):
        recipe = tiny_recipe(
            icd_data, tmp_path, f"compile-{setting}",
            **{"job.num_workers": 1, "train.compile": setting, "train.max_steps": 4,
               "train.eval_every": 2, "train.checkpoint_every": 4, "train.sample_tokens": 0},
        )  # fmt: skip
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        runs[setting] = list(
            run_loop(Recipe.from_dict(recipe), local_context(), None, None, discard_report)
        )
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == setting, graphs
    for eager, compiled in zip(runs[False], runs[True], strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in eager:
                assert compiled[key] == pytest.approx(eager[key], rel=1e-4), (eager["step"], key)
