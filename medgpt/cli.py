"""The ``medgpt`` console script. Subcommands parse flags and call library functions; the
``jobs/`` scripts call the same entry points, so neither holds logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medgpt.errors import MedgptError

DEFAULT_QUICKSTART_DATA = "data/icd10cm"
# The tiny recipe reaches about 5.1 nats/token on held-out ICD-10-CM documents; a model that
# learned nothing scores ln(50257) = 10.8. The gate sits between, with room for run-to-run noise.
QUICKSTART_MAX_LOSS = 6.0


def _prepare_flags() -> tuple[list[Any], list[Any]]:
    """The flags of ``medgpt prepare``, declared on PrepareConfig, and on SourceSpec for the
    per-source options that apply to every --source given."""
    from medgpt.config import flags_of
    from medgpt.data.prepare import PrepareConfig
    from medgpt.data.sources import SourceSpec

    return flags_of(PrepareConfig), flags_of(SourceSpec, "source.")


def _add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    from medgpt.config import add_flags

    config_flags, source_flags = _prepare_flags()
    p.add_argument("--config", help="YAML recipe with the same keys (per-source options too)")
    add_flags(p, config_flags)
    add_flags(p, source_flags)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _prepare_config(args: argparse.Namespace) -> Any:
    import dataclasses

    from medgpt.config import ConfigError, given_flags, load_yaml
    from medgpt.data.prepare import PrepareConfig

    config_flags, source_flags = _prepare_flags()
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    source_opts = {o.rest: o.value for o in given_flags(args, source_flags)}
    given = given_flags(args, config_flags)
    for o in given:
        # --source replaces the recipe's sources; the per-source flags go with each of them.
        data[o.key] = (
            [{"uri": s, **source_opts} for s in o.value] if o.key == "sources" else o.value
        )
    if source_opts and "sources" not in {o.key for o in given}:
        raise ConfigError(f"{'/'.join(f.flag for f in source_flags)} need --source")
    required = {
        f.name
        for f in dataclasses.fields(PrepareConfig)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    for fl in config_flags:
        if fl.key in required and fl.key not in data:
            raise ConfigError(f"missing {fl.flag} (or '{fl.key}' in --config)")
    return PrepareConfig.from_dict(data)


def _print_summary(result: Any) -> None:
    """The lines of a PrepareResult: what was done, and the counts per source."""
    manifest = result.manifest
    splits = manifest["splits"]
    status = (
        "up to date (identical output already there)" if result.status == "unchanged" else "written"
    )
    print(f"dataset {result.out}: {status} in {result.seconds:.1f} s")
    print(
        f"  {'source':<28}{'train docs':>12}{'train tokens':>15}{'val docs':>10}{'val tokens':>13}"
    )
    for name, st in manifest["per_source"].items():
        print(
            f"  {name[:27]:<28}{st['train']['documents']:>12,}{st['train']['tokens']:>15,}"
            f"{st['val']['documents']:>10,}{st['val']['tokens']:>13,}"
        )
    print(
        f"  {'total':<28}{splits['train']['documents']:>12,}{splits['train']['tokens']:>15,}"
        f"{splits['val']['documents']:>10,}{splits['val']['tokens']:>13,}"
    )
    d = manifest["dropped"]
    print(f"  dropped: {d['empty']} empty, {d['duplicate']} duplicate documents")
    print(f"  content hash {manifest['content_hash'][:16]}  manifest {result.manifest_path}")


def cmd_prepare(args: argparse.Namespace) -> int:
    from medgpt.data.prepare import prepare

    cfg = _prepare_config(args)
    result = prepare(cfg, progress=False if args.quiet else None)
    if not args.quiet:
        _print_summary(result)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The README's main job on a fresh machine: prepare, train, gate and register on the
    embedded defaults, then serve the champion (Ray Serve + the prompt page) until Ctrl-C."""
    from medgpt.config import Override, Recipe, apply_overrides, load_yaml
    from medgpt.data.prepare import PrepareConfig, prepare
    from medgpt.evaluation import EvalConfig, GateRequest, run_gate
    from medgpt.launch import train

    t0 = time.perf_counter()
    steps = 3 if args.no_serve else 4
    print(f"[1/{steps}] preparing the builtin ICD-10-CM corpus into {args.data}", flush=True)
    cfg = PrepareConfig(sources=["builtin:icd10cm"], out=args.data)
    _print_summary(prepare(cfg))
    recipe_path = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
    print(f"[2/{steps}] training {recipe_path.name} on 2 Ray workers (a few minutes)", flush=True)
    data_dir = Override("train.data_dir", args.data, f"--data {args.data}")
    recipe = Recipe.from_dict(
        apply_overrides(load_yaml(recipe_path), [data_dir, *(args.set or [])])
    )
    trained = train(recipe)
    val = trained.best_val_loss
    val_text = f"{val:.4f}" if isinstance(val, float) else "not measured"
    print(f"best checkpoint: {trained.best_checkpoint} (val_loss {val_text})")
    print(f"MLflow run id:   {trained.mlflow_run_id}")
    print(f"[3/{steps}] readiness gate: held-out loss must be <= {args.max_loss}", flush=True)
    report = run_gate(
        GateRequest(
            checkpoint=trained.best_checkpoint or trained.run_dir,
            data=[args.data],
            max_loss=args.max_loss,
            register=True,
            storage_path=recipe.job.storage_path,
            eval=EvalConfig(),
        )
    )
    status = print_gate(report)
    uri = trained.mlflow_tracking_uri
    print(f"MLflow UI:       .venv/bin/mlflow ui --backend-store-uri {uri}")
    if status != 0 or args.no_serve:
        if status == 0:
            print("the page:        make demo, then open http://127.0.0.1:5000")
        print(f"quickstart finished in {time.perf_counter() - t0:.0f} s")
        return status
    print("[4/4] serving the champion on Ray Serve, and the prompt page", flush=True)
    from medgpt.demo import serve_with_page

    registered = report.registered
    assert registered is not None  # a PASS with register=True
    return serve_with_page(
        f"models:/{registered.name}@{registered.alias}",
        recipe.job.storage_path,
        args.serve_port,
        args.web_port,
        args.serve_cpus,
        started=t0,
    )


def _train_flags() -> list[Any]:
    """``medgpt train``'s flags: those declared on the recipe's dataclasses."""
    from medgpt.config import Recipe, flags_of

    return flags_of(Recipe)


def _tune_flags() -> list[Any]:
    """``medgpt tune``'s flags: the sweep's and the gate's, and the trials' storage."""
    from medgpt.config import Recipe, flag_for, flags_of
    from medgpt.tuning import GateConfig, SweepConfig

    storage = "runs folder for trials, Tune state and MLflow (job.storage_path)"
    return [
        *flags_of(SweepConfig, "sweep."),
        *flags_of(GateConfig, "gate."),
        flag_for(Recipe, "job.storage_path", help=storage),
    ]


def _load_recipe(args: argparse.Namespace) -> Any:
    from medgpt.config import Recipe, apply_overrides, given_flags, load_yaml, parse_override

    # Flags after --set: a flag given wins over a --set of the same key.
    overrides = [*map(parse_override, args.set or []), *given_flags(args, _train_flags())]
    # A value replaced here needs no environment variable its recipe names (--storage for a
    # recipe whose storage_path is ${MEDGPT_STORAGE}).
    skip = [o.key for o in overrides]
    data: dict[str, Any] = load_yaml(args.config, skip=skip) if args.config else {}
    return Recipe.from_dict(apply_overrides(data, overrides))


def cmd_train(args: argparse.Namespace) -> int:
    from medgpt.launch import train

    recipe = _load_recipe(args)
    result = train(recipe)
    print(f"best checkpoint: {result.best_checkpoint}")
    print(f"best val_loss:   {result.best_val_loss}")
    print(f"MLflow run id:   {result.mlflow_run_id}  ({result.mlflow_tracking_uri})")
    if result.result_file is not None:
        print(f"summary:         {result.result_file}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Per-GPU training memory of a recipe on a GPU type (medgpt.plan); exit 2 if it cannot fit."""
    from medgpt.errors import ConfigError
    from medgpt.plan import describe, fit_advice
    from medgpt.training import resolve_model_config

    if args.table:
        from medgpt.plan import preset_table

        print(preset_table())
        return 0
    if not args.gpu:
        raise ConfigError("--gpu: required (or --table for every GPT-2 size on 24/40/80 GB cards)")
    recipe = _load_recipe(args)
    tc = recipe.train
    text, fits = describe(
        resolve_model_config(recipe), tc.micro_batch_size, tc.seq_len,
        tc.activation_checkpointing, args.gpu, recipe.job.strategy, recipe.job.num_workers,
    )  # fmt: skip
    print(text)
    if not fits:
        raise ConfigError(
            f"train.micro_batch_size: {tc.micro_batch_size} x {tc.seq_len} does not fit on "
            f"{args.gpu} (table above): {fit_advice(recipe)}"
        )
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from medgpt.config import given_flags
    from medgpt.tuning import load_spec, run_sweep, trial_table

    overrides = [*(args.set or []), *given_flags(args, _tune_flags())]
    spec = load_spec(args.config, overrides)
    result = run_sweep(spec, register=args.register)
    print(f"sweep {result.name!r}: {len(result.trials)} trials in {result.seconds:.0f} s")
    print(trial_table(result.trials), end="")
    best = result.best
    print(f"best trial:      {best.trial_id} val_loss {best.val_loss:.4f} {best.values}")
    print(f"best checkpoint: {best.checkpoint}")
    print(f"MLflow:          parent run {result.mlflow_parent_run_id}", end=" ")
    print(f"({result.mlflow_tracking_uri})")
    print(f"summary:         {result.result_file}")
    if result.report is None:
        return 0
    return print_gate(result.report)


def _add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="the model: a checkpoint folder, a training run folder (its best checkpoint), an "
        "MLflow run id or runs:/ID, models:/NAME@ALIAS or models:/NAME/VERSION, or a Hugging "
        "Face GPT-2 folder",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="DATA",
        help="a prepared dataset folder (scored on --split), or any source `medgpt prepare` "
        "accepts, tokenised on the fly (repeatable for several sources)",
    )
    p.add_argument("--split", default="val", help="split of a prepared dataset (%(default)s)")
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="MODEL",
        help="another checkpoint or HF GPT-2 folder scored on the same tokens (repeatable)",
    )
    p.add_argument("--max-loss", type=float, help="the gate: PASS (exit 0) when loss <= this")
    from medgpt.benchmark import TASKS

    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME|FILE.yaml",
        help=f"a benchmark scored beside the loss, repeatable: {', '.join(TASKS)} (multiple "
        "choice on held-out question-answer pairs), or an lm-eval multiple_choice task file "
        "(.yaml/.yml, e.g. an --export-lm-eval): a frozen item set, scored as it is",
    )
    p.add_argument(
        "--min-accuracy",
        type=float,
        help="the gate on the tasks: PASS only when every task's acc_norm >= this",
    )
    p.add_argument(
        "--choices",
        type=int,
        metavar="N",
        help="options per question, the answer and N-1 distractors (same as --distractors N-1)",
    )
    from medgpt.config import add_flags

    add_flags(p, _benchmark_flags())
    p.add_argument(
        "--export-lm-eval",
        metavar="DIR",
        help="also write the tasks' items as a local lm-evaluation-harness task (YAML + jsonl)",
    )
    p.add_argument(
        "--register",
        action="store_true",
        help="on PASS, register the checkpoint in the MLflow registry and move the alias to it",
    )
    p.add_argument("--model-name", default="medgpt", help="registered model name (%(default)s)")
    p.add_argument("--alias", default="champion", help="alias moved on PASS (%(default)s)")
    p.add_argument("--out", help="report folder (default: <storage>/evaluations/<name>-<time>)")
    p.add_argument(
        "--storage", default="runs", help="MLflow store / downloads folder (%(default)s)"
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite under --storage)",
    )
    p.add_argument(
        "--no-mlflow",
        dest="mlflow",
        action="store_false",
        help="record nothing in MLflow (models:/ and run references are still read from it)",
    )
    p.add_argument(
        "--stride", type=int, help="window advance for long documents (half the context)"
    )
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (%(default)s)")
    p.add_argument("--no-samples", dest="samples", action="store_false", help="skip completions")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _benchmark_flags() -> list[Any]:
    from medgpt.benchmark import BenchmarkConfig
    from medgpt.config import flags_of

    return flags_of(BenchmarkConfig, "benchmark.")


def _benchmark_config(args: argparse.Namespace) -> Any:
    """The task options of ``medgpt evaluate`` (``--choices N`` is ``--distractors N-1``)."""
    from medgpt.benchmark import TASKS, BenchmarkConfig, is_task_file
    from medgpt.config import ConfigError, from_mapping, given_flags

    given = given_flags(args, _benchmark_flags())
    values = {o.rest: o.value for o in given}
    if args.choices is not None:
        if args.choices < 2:
            raise ConfigError(
                f"--choices {args.choices}: must be >= 2 (the answer and at least one distractor)"
            )
        if "distractors" in values and values["distractors"] != args.choices - 1:
            raise ConfigError(
                f"--choices {args.choices} and --distractors {values['distractors']} disagree "
                "(choices = distractors + 1); give one of them"
            )
        values["distractors"] = args.choices - 1
    if (values or args.export_lm_eval) and not args.task:
        flags = [o.given.split()[0] for o in given] + (["--choices"] if args.choices else [])
        flags += ["--export-lm-eval"] if args.export_lm_eval else []
        raise ConfigError(
            f"{', '.join(flags)}: need --task (allowed: {', '.join(TASKS)}, or a task FILE.yaml)"
        )
    if values and args.task and all(is_task_file(t) for t in args.task):
        # A task file's items are fixed: an option that would change them is a mistake.
        flags = [o.given.split()[0] for o in given] + (["--choices"] if args.choices else [])
        raise ConfigError(
            f"{', '.join(flags)}: only for the built-in tasks ({', '.join(TASKS)}); a task "
            "file's items are scored as they are"
        )
    return from_mapping(BenchmarkConfig, values)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medgpt.evaluation import EvalConfig, GateRequest, run_gate

    req = GateRequest(
        checkpoint=args.checkpoint,
        data=args.data,
        split=args.split,
        baselines=args.baseline,
        max_loss=args.max_loss,
        register=args.register,
        model_name=args.model_name,
        alias=args.alias,
        out=args.out,
        storage_path=args.storage,
        tracking_uri=args.tracking_uri,
        mlflow=args.mlflow,
        eval=EvalConfig(
            stride=args.stride,
            batch_tokens=args.batch_tokens,
            device=args.device,
            samples=args.samples,
        ),
        tasks=args.task,
        benchmark=_benchmark_config(args),
        min_accuracy=args.min_accuracy,
        export_lm_eval=args.export_lm_eval,
    )
    if args.quiet:  # MLflow's own download bars too
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    report = run_gate(req, progress=False if args.quiet else None)
    return print_gate(report)


def print_gate(report: Any) -> int:
    """A GateReport's summary lines; returns the gate's exit status (0 pass/no gate, 1 fail)."""
    for m in [report.model, *report.baselines]:
        print(
            f"{m.label:<10} loss {m.loss:.4f}  perplexity {m.perplexity:.2f}  "
            f"({m.tokens:,} tokens, {m.documents:,} documents)  {m.spec}"
        )
    from medgpt.evaluation import choices_text

    for name, entry in report.tasks.items():
        u = entry["unigram_baseline"]
        baseline = (
            "no unigram baseline (no prepared training split)"
            if u is None
            else f"unigram baseline acc {u['acc']:.4f} acc_norm {u['acc_norm']:.4f}"
        )
        print(
            f"{name}: {entry['items']:,} questions, {choices_text(*entry['choices_range'])}; "
            f"chance {entry['chance']:.4f}, {baseline}"
        )
        for m in [entry["model"], *entry["baselines"]]:
            lo, hi = m["acc_norm_ci95"]
            print(
                f"  {m['label']:<10} acc {m['acc']:.4f}  acc_norm {m['acc_norm']:.4f} "
                f"(95% CI {lo:.4f}-{hi:.4f})  {m['spec']}"
            )
        if entry.get("lm_eval_export"):
            print(f"  lm-eval task: {entry['lm_eval_export']}")
    print(f"report:    {report.markdown}")
    if report.mlflow is not None:
        print(f"MLflow:    run {report.mlflow.run_id} ({report.mlflow.tracking_uri})")
    gate = report.gate
    if gate is None:
        return 0
    print(gate.summary())
    if not gate.passed:
        return report.exit_status
    reg = report.registered
    if reg is not None and reg.reused:
        print(
            f"already registered as {reg.model_uri} (same checkpoint files); "
            f"alias {reg.alias!r} -> version {reg.version}"
        )
    elif reg is not None:
        print(f"registered {reg.model_uri}; alias {reg.alias!r} -> version {reg.version}")
    return report.exit_status


def cmd_serve(args: argparse.Namespace) -> int:
    """Deploy serve/config.yaml's application on Ray Serve (flags override its args) and keep
    serving until interrupted; like ``serve run serve/config.yaml``."""
    from ray import serve

    from medgpt.serving import DEFAULT_CONFIG, deploy

    overrides = {
        "checkpoint": args.checkpoint,
        "storage_path": args.storage_path,
        "int8": args.int8,
        "num_gpus": args.num_gpus,
        "device": args.device,
        "dtype": args.dtype,
    }
    deploy(args.config or DEFAULT_CONFIG, overrides, args.host, args.port)
    print("Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def cmd_demo(args: argparse.Namespace) -> int:
    """A model on Ray Serve and the prompt page beside it until Ctrl-C (``make demo``)."""
    from medgpt.demo import serve_with_page

    return serve_with_page(
        args.checkpoint, args.storage, args.serve_port, args.web_port, args.serve_cpus
    )


def cmd_export(args: argparse.Namespace) -> int:
    """A checkpoint as a Hugging Face folder or an ONNX model (medgpt.export); one line says
    what was written, and for ONNX how closely onnxruntime matched torch."""
    import json

    from medgpt.export import PROVENANCE, export_checkpoint

    if args.quiet_downloads:  # MLflow's download bars for models:/ and run references
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    out = export_checkpoint(
        args.checkpoint, args.format, args.out, args.overwrite, args.storage, args.tracking_uri
    )
    record = json.loads((out / PROVENANCE).read_text())
    src = record["source"]
    step = f", step {src['step']}" if src.get("step") is not None else ""
    if Path(args.checkpoint).resolve() != Path(src["path"]):  # a run folder, models:/...
        step = f" ({src['path']}{step})"
    files = ", ".join(n for n in record["files"] if n != PROVENANCE)
    if args.format == "onnx":
        check = record["onnx"]["verification"]
        shapes = " and ".join("x".join(map(str, s)) for s in check["shapes"])
        print(
            f"exported {args.checkpoint}{step} as ONNX to {out / 'model.onnx'} (opset "
            f"{record['onnx']['opset']}); onnxruntime matches torch: max abs diff "
            f"{check['max_abs_diff']:.2g} <= {check['atol']:g} on input shapes {shapes}"
        )
    else:
        print(f"exported {args.checkpoint}{step} as a Hugging Face GPT-2 folder to {out} ({files})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Move the alias (champion) to a version that passed its gate, or back (rollback); with
    --serve-url, tell the Serve app and wait until it serves that version. A refused version
    exits 1 with the reason; nothing has changed then."""
    from medgpt import registry, tracking
    from medgpt.rollout import notify_serve

    # The check downloads the version: one line of outcome, not MLflow's progress bars.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    storage = Path(args.storage)
    uri = tracking.tracking_uri_for(str(storage), args.tracking_uri)
    tracking.require_store(uri)
    cache = storage / "downloads"
    ref = f"{args.model}@{args.alias}"
    try:
        if args.command == "rollback":
            moved = registry.rollback(uri, args.model, args.alias, cache)
        else:
            moved = registry.promote(uri, args.model, args.alias, args.version, cache)
    except registry.PromotionRefused as e:
        print(f"refused: {e}; {ref} is unchanged", file=sys.stderr)
        return 1
    before = moved["previous"]
    if before == moved["version"]:
        print(f"{ref} already names version {moved['version']}")
    else:
        print(f"{ref}: version {before or '(none)'} -> {moved['version']}")
    url = args.serve_url or os.environ.get("MEDGPT_SERVE_URL")
    if url:
        served, seconds, what = notify_serve(url, moved["version"], args.wait)
        if served:
            print(f"{what} ({seconds:.1f} s after the alias moved)")
        else:
            print(f"warning: {what}; its replicas follow the alias at their next poll",
                  file=sys.stderr)  # fmt: skip
    return 0


def _stack(args: argparse.Namespace) -> Any:
    from medgpt.config import flags_of, given_flags
    from medgpt.stack import Stack, StackConfig

    return Stack.open({o.key: o.value for o in given_flags(args, flags_of(StackConfig))})


def cmd_stack(args: argparse.Namespace) -> int:
    """The local production topology: object store, PostgreSQL, MLflow server, Ray head."""
    from medgpt.stack import format_env

    stack = _stack(args)
    if args.action == "up":
        env = stack.up()
        # Only the export lines go to stdout, so that `eval "$(medgpt stack up)"` works.
        sys.stdout.write(format_env(env))
        print(f"medgpt stack: up in {stack.root} (`medgpt stack down` stops it)", file=sys.stderr)
        return 0
    if args.action == "env":
        sys.stdout.write(format_env(stack.env()))
        return 0
    if args.action == "down":
        stack.down()
        print(f"medgpt stack: stopped everything in {stack.root}", file=sys.stderr)
        return 0
    rows = stack.status()
    for r in rows:
        state = "running" if r.running else r.detail
        pid = f"pid {r.pid}" if r.pid else ""
        print(f"{r.name:<12} {state:<14} {r.url:<40} {pid}")
    return 0 if all(r.running for r in rows) else 1


def cmd_web(args: argparse.Namespace) -> int:
    """The prompt page (Flask) in front of a running Serve app; like ``python web/app.py``.
    Only the web package is imported: no torch, no model."""
    from web.app import run

    return run(args.host, args.port, args.serve_url, args.dev, args.workers, args.threads)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", help="YAML recipe (sections model/train/job), e.g. configs/tiny-cpu.yaml"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value, repeatable (e.g. --set train.lr=3e-4)",
    )
    from medgpt.config import add_flags

    add_flags(p, _train_flags())


def _registry_version(text: str) -> str:
    """argparse type of --version: MLflow numbers registry versions from 1."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a registry version: give its number (1, 2, ...)"
        )
    return str(number)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgpt",
        description="Train GPT-2-style models on medical text with Ray, gate them on held-out "
        "loss, and serve the best one.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "prepare",
        help="corpus -> token shards + manifest (read, clean, dedupe, split, tokenize)",
        description="Turn one or more corpora into GPT-2 token shards (uint16) and a "
        "manifest.json, with a deterministic document-level train/val split. Example: "
        "medgpt prepare --source builtin:icd10cm --out data/icd10cm",
    )
    _add_prepare_arguments(p)
    p.set_defaults(func=cmd_prepare)
    t = sub.add_parser(
        "train",
        help="train a GPT on prepared data with Ray Train (resumable, tracked in MLflow)",
        description="Data-parallel GPT training on Ray Train workers (CPU or GPU). Recipe from "
        "--config plus overrides; connects to RAY_ADDRESS when set, else starts a local Ray. "
        "Example: medgpt train --config configs/tiny-cpu.yaml",
    )
    _add_train_arguments(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser(
        "evaluate",
        help="held-out loss/perplexity report and the readiness gate (exit 0 PASS, 1 FAIL)",
        description="Score a model on held-out data (every token once, per source), write a "
        "JSON/Markdown/PNG report, record it in MLflow; with --max-loss, PASS (exit 0) or FAIL "
        "(exit 1); with --task medquad-mc, also multiple-choice accuracy on held-out "
        "question-answer pairs (--min-accuracy gates it, --export-lm-eval writes the items as an "
        "lm-eval task, --task FILE.yaml scores such a frozen item set); with --register, a PASS "
        "becomes a registry version with the alias moved to it. Bad input exits 2. Example: "
        "medgpt evaluate --checkpoint runs/tiny-cpu --data data/icd10cm --max-loss 5 --register",
    )
    _add_evaluate_arguments(e)
    e.set_defaults(func=cmd_evaluate)
    tn = sub.add_parser(
        "tune",
        help="hyperparameter sweep: Ray Tune over Ray Train runs (ASHA), then the gate",
        description="Search a sweep file's space (configs/tune-*.yaml), every trial a full "
        "Ray Train run recorded as an MLflow child run; ASHA stops weak trials on val_loss; "
        "the best checkpoint then goes through the readiness gate (exit 1 on FAIL) and, with "
        "--register, becomes models:/medgpt@champion. Rerunning the same sweep name resumes it. "
        "Example: medgpt tune --config configs/tune-tiny-cpu.yaml --register",
    )
    tn.add_argument("--config", required=True, help="sweep file (configs/tune-*.yaml)")
    from medgpt.config import add_flags

    add_flags(tn, _tune_flags())
    tn.add_argument(
        "--register",
        action="store_true",
        help="on PASS, register the best checkpoint and move the alias champion to it",
    )
    tn.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override: sweep.KEY / gate.KEY, space.SECTION.KEY={...}, or a recipe value for "
        "every trial (train.max_steps=40)",
    )
    tn.set_defaults(func=cmd_tune)
    s = sub.add_parser(
        "serve",
        help="serve a checkpoint or models:/medgpt@champion on Ray Serve (OpenAI-compatible)",
        description="Deploy the Serve application of serve/config.yaml (continuous batching, "
        "streaming, /v1/completions, /generate) on RAY_ADDRESS or a local Ray, and keep "
        "serving until Ctrl-C. Same as `serve run serve/config.yaml`, with overrides.",
    )
    s.add_argument(
        "--config",
        help="Serve config file (default: serve/config.yaml of this checkout)",
    )
    s.add_argument("--checkpoint", help="a checkpoint folder, run folder or models:/ URI")
    s.add_argument("--storage-path", dest="storage_path", help="MLflow store / downloads (runs)")
    s.add_argument("--int8", action="store_true", default=None, help="int8 linears (CPU)")
    s.add_argument("--num-gpus", type=float, help="GPUs reserved per replica (0: CPU replica)")
    s.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="auto: cuda with --num-gpus, else cpu"
    )
    s.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weights and KV cache on the replica's device (float32); half needs --num-gpus",
    )
    s.add_argument("--host", help="HTTP host (127.0.0.1)")
    s.add_argument("--port", type=int, help="HTTP port (8000)")
    s.set_defaults(func=cmd_serve)
    w = sub.add_parser(
        "web",
        help="the prompt page: a Flask front over a running `medgpt serve` (127.0.0.1:5000)",
        description="Serve the prompt page (Flask on gunicorn) that forwards /api/* to the Ray "
        "Serve endpoint (--serve-url, MEDGPT_SERVE_URL, else http://127.0.0.1:8000). Listening "
        "beyond 127.0.0.1 is refused unless MEDGPT_WEB_API_KEY is set. --dev runs werkzeug's "
        "development server instead.",
    )
    from web.flags import add_arguments as add_web_arguments  # argparse only: no Flask here

    add_web_arguments(w)
    w.set_defaults(func=cmd_web)
    d = sub.add_parser(
        "demo",
        help="serve a model and the prompt page together until Ctrl-C (after the quickstart)",
        description="Deploy serve/config.yaml's app with --checkpoint (default the champion) "
        "on RAY_ADDRESS or a local Ray, start the prompt page beside it once Serve answers, "
        "and stop both (and the local Ray) on Ctrl-C.",
    )
    d.add_argument(
        "--checkpoint",
        default="models:/medgpt@champion",
        help="a checkpoint folder, run folder or models:/ URI (%(default)s)",
    )
    d.add_argument("--storage", default="runs", help="MLflow store / downloads (%(default)s)")
    d.add_argument("--serve-port", type=int, default=8000, help="Ray Serve's port (%(default)s)")
    d.add_argument("--web-port", type=int, default=5000, help="the page's port (%(default)s)")
    d.add_argument("--serve-cpus", type=float, help="CPUs of the replica (serve/config.yaml)")
    d.set_defaults(func=cmd_demo)
    x = sub.add_parser(
        "export",
        help="a checkpoint as a Hugging Face GPT-2 folder or an ONNX model (checked)",
        description="Write any checkpoint reference as a folder other tools load: --format hf "
        "(transformers' GPT2LMHeadModel and AutoTokenizer, offline) or --format onnx "
        "(model.onnx with dynamic batch and sequence axes, checked against torch with "
        "onnxruntime before it is kept; needs pip install 'medgpt[export]'). Each folder carries "
        "medgpt-export.json (source, step, hashes, versions). Written atomically: complete or "
        "not at all; an existing folder is replaced only with --overwrite. Bad input exits 2. "
        "Example: medgpt export --checkpoint models:/medgpt@champion --format onnx --out "
        "exports/champion-onnx",
    )
    x.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder, a training run folder (its best checkpoint), an MLflow run "
        "id or runs:/ID, models:/NAME@ALIAS or models:/NAME/VERSION, s3:// or gs:// folders, or "
        "a Hugging Face GPT-2 folder",
    )
    x.add_argument("--format", required=True, choices=["hf", "onnx"], help="what to write")
    x.add_argument("--out", required=True, help="the folder to create (new or empty)")
    x.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export at --out as a whole"
    )
    x.add_argument("--storage", default="runs", help="MLflow store / downloads (%(default)s)")
    x.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite under --storage)",
    )
    x.add_argument(
        "--quiet", dest="quiet_downloads", action="store_true", help="no download progress bars"
    )
    x.set_defaults(func=cmd_export)
    pl = sub.add_parser(
        "plan",
        help="will a recipe fit on a GPU? per-GPU memory by part, largest micro-batch",
        description="Per-GPU training memory of a recipe (weights, gradients, AdamW moments, "
        "DDP buckets, activations at its micro-batch) with and without activation "
        "checkpointing, and the largest micro-batch that fits; exit 2 when the recipe's own "
        "setting does not. Example: medgpt plan --config configs/medquad-124m.yaml --gpu A10G",
    )
    _add_train_arguments(pl)
    from medgpt.plan import GPUS_MIB

    pl.add_argument("--gpu", choices=list(GPUS_MIB), help="the GPU type")
    pl.add_argument(
        "--table",
        action="store_true",
        help="the largest micro-batch of gpt2 ... gpt2-xl on 24/40/80 GB cards, every setting",
    )
    pl.set_defaults(func=cmd_plan)
    for command in ("promote", "rollback"):
        pr = sub.add_parser(
            command,
            help="move the champion alias to a gated version"
            if command == "promote"
            else "move the champion alias back to the version it named before",
            description="Move models:/MODEL@ALIAS to --version N (promote) or to the version it "
            "named before the current one (rollback; again goes further back). The version must "
            "carry a passing gate record (medgpt evaluate --register writes it) and its artifacts "
            "must download with their registered hash and open: otherwise exit 1 with the "
            "reason, and the alias is unchanged. With --serve-url (or MEDGPT_SERVE_URL) the Serve "
            "app is told at once and the command waits until it serves the version; without it "
            "the replicas follow the alias at their next poll (follow_poll_s). Example: medgpt "
            "promote --version 3 --serve-url http://127.0.0.1:8000",
        )
        if command == "promote":
            pr.add_argument(
                "--version",
                required=True,
                type=_registry_version,
                help="the registry version to promote (a number, as `medgpt evaluate --register` "
                "prints it)",
            )
        pr.add_argument("--model", default="medgpt", help="registered model (%(default)s)")
        pr.add_argument("--alias", default="champion", help="the alias to move (%(default)s)")
        pr.add_argument("--storage", default="runs", help="MLflow store / downloads (%(default)s)")
        pr.add_argument(
            "--tracking-uri",
            help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite under --storage)",
        )
        pr.add_argument("--serve-url", help="the Serve app to tell (default: MEDGPT_SERVE_URL)")
        pr.add_argument(
            "--wait", type=float, default=300.0, help="seconds to wait for it (%(default)s)"
        )
        pr.set_defaults(func=cmd_promote)
    st = sub.add_parser(
        "stack",
        help="run object storage, PostgreSQL, an MLflow server and a Ray head on this machine",
        description="The cluster setup on one machine, from real parts: SeaweedFS (S3), "
        "PostgreSQL, `mlflow server` on PostgreSQL with artifacts in the object store, and a Ray "
        "head with token auth, bound to 127.0.0.1, data under --dir. `up` starts what is not "
        "running and prints the client environment as export lines "
        '(eval "$(medgpt stack up)"); `env` prints them again; `status` exits 1 unless every '
        "component answers; `down` stops every process the stack started.",
    )
    st.add_argument("action", choices=["up", "status", "env", "down"])
    from medgpt.config import add_flags, flags_of
    from medgpt.stack import StackConfig

    add_flags(st, flags_of(StackConfig))
    st.set_defaults(func=cmd_stack)
    q = sub.add_parser(
        "quickstart",
        help="run the main job on the embedded defaults (offline ICD-10-CM corpus)",
        description="Prepare the builtin ICD-10-CM corpus, train configs/tiny-cpu.yaml on a "
        "local Ray cluster with MLflow tracking, gate the best checkpoint on held-out loss and "
        "register it as models:/medgpt@champion when it passes (exit 1 when it fails), then "
        "serve it on Ray Serve with the prompt page until Ctrl-C. Running it again reuses the "
        "data, the trained run and the registered version.",
    )
    q.add_argument("--data", default=DEFAULT_QUICKSTART_DATA, help="dataset folder (%(default)s)")
    q.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="recipe override")
    q.add_argument(
        "--max-loss",
        type=float,
        default=QUICKSTART_MAX_LOSS,
        help="the gate's threshold for the tiny model (%(default)s nats/token)",
    )
    q.add_argument(
        "--no-serve",
        action="store_true",
        help="stop after the gate (do not start Serve and the page)",
    )
    q.add_argument("--serve-port", type=int, default=8000, help="Ray Serve's port (%(default)s)")
    q.add_argument("--web-port", type=int, default=5000, help="the page's port (%(default)s)")
    q.add_argument(
        "--serve-cpus", type=float, help="CPUs of the model server's replica (serve/config.yaml)"
    )
    q.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MedgptError as e:
        # One line naming the problem; a stack trace tells a user nothing they can act on.
        print(f"medgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medgpt {args.command}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
