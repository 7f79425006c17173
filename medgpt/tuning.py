"""Hyperparameter sweeps: Ray Tune over full Ray Train runs, recorded in MLflow, then the gate.

The Train V2 + Tune pattern of Ray 2.60: each trial is a Tune *function* that builds and fits a
``TorchTrainer`` (the same trainer ``medgpt train`` builds), with ``TuneReportCallback`` passing
the workers' reports to Tune. ASHA stops weak trials on ``val_loss`` (time = training step). Each
trial's Train run is named after its Tune trial id, so restoring an interrupted sweep
(``Tuner.restore``) also resumes every unfinished trial from its latest checkpoint.

MLflow gets one parent run for the sweep and a child run per trial (the trial's own training
run, with its params and per-step curves); the parent carries the trial table and a PNG of the
val_loss curves. The best checkpoint of all trials then goes through the readiness gate.

``sweep.metric`` picks the winner: ``val_loss`` (lowest; the default) or a task's accuracy,
``medquad_mc_acc_norm`` or ``medquad_mc_acc`` (highest): every trial's best checkpoint (by its
val_loss) is then scored on the task's items, built once, and the trial with the highest
accuracy wins (ties: the lower val_loss). ASHA and the search algorithm still see val_loss,
the only figure a trial reports while it trains; the task decides which model is gated.

A sweep file (``configs/tune-*.yaml``) has these sections:

    recipe: tiny-cpu.yaml        # the training recipe every trial starts from (or a mapping)
    overrides: {train.max_steps: 60}          # applied to every trial
    space:                                    # section.key of the recipe -> distribution
      train.lr: {loguniform: [3.0e-4, 3.0e-3]}
      model.n_embd: {choice: [64, 128]}
    sweep: {name: tune-tiny-cpu, num_samples: 4, grace_period: 20}
    gate: {max_loss: 6.0}        # and/or min_accuracy with tasks: [medquad-mc]
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medgpt.benchmark import BenchmarkConfig, check_tasks, task_metrics
from medgpt.config import (
    ModelConfig,
    Override,
    Recipe,
    TrainConfig,
    from_mapping,
    load_yaml,
    option,
    parse_override,
    set_path,
)
from medgpt.errors import ConfigError, MedgptError

if TYPE_CHECKING:  # evaluation imports torch: only a sweep with a gate needs it
    from medgpt.evaluation import GateReport

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCHABLE = {"model": ModelConfig, "train": TrainConfig}
SEARCH_ALGORITHMS = ("auto", "random", "optuna", "hyperopt")
SCHEDULERS = ("asha", "fifo")
SPEC_FILE = "medgpt-sweep-spec.json"  # what a sweep folder was started with (restore check)
RESULT_FILE = "medgpt-sweep.json"
MAX_COMBINATIONS_CHECKED = 512


class SweepError(MedgptError):
    """The sweep ran but produced nothing usable (every trial failed)."""


@dataclasses.dataclass
class Distribution:
    """One searched value: ``kind`` in DISTRIBUTIONS; ``args`` the values or the [low, high]."""

    key: str
    kind: str
    args: list[Any]

    @classmethod
    def parse(cls, key: str, spec: Any) -> Distribution:
        where = f"space.{key}"
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise ConfigError(
                f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r} "
                "(a fixed value belongs in overrides)"
            )
        ((kind, args),) = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {kind!r} (allowed: "
                              f"{', '.join(DISTRIBUTIONS)})")  # fmt: skip
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) for a in args
            ):
                raise ConfigError(f"{where}.{kind}: expected [low, high] numbers, got {args!r}")
            lo, hi = args
            if not lo < hi:
                raise ConfigError(f"{where}.{kind}: low must be below high, got {args!r}")
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"{where}.loguniform: low must be > 0, got {lo}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{where}.randint: expected [low, high] integers, got {args!r}")
        return cls(key, kind, list(args))

    def probe_values(self) -> list[Any]:
        """Values that must all make a valid recipe: every listed one, or both ends."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        lo, hi = self.args
        if self.kind == "randint":
            return [lo, hi]
        return [float(lo), float(hi)]

    def to_tune(self) -> Any:
        from ray import tune

        lo_hi = self.args
        if self.kind == "choice":
            return tune.choice(self.args)
        if self.kind == "grid":
            return tune.grid_search(self.args)
        if self.kind == "uniform":
            return tune.uniform(float(lo_hi[0]), float(lo_hi[1]))
        if self.kind == "loguniform":
            return tune.loguniform(float(lo_hi[0]), float(lo_hi[1]))
        return tune.randint(lo_hi[0], lo_hi[1] + 1)  # inclusive high, as the file says


@dataclasses.dataclass
class SweepConfig:
    """How the search runs."""

    # The sweep folder <storage>/<name> and the MLflow parent run; rerun = resume.
    name: str = option(
        "sweep", flag="--name", help="sweep name (sweep.name); rerun a name to resume it"
    )
    # Trials (times the grid's size when the space has grid entries).
    num_samples: int = option(4, flag="--num-samples", help="trials (sweep.num_samples)")
    # 0 = as many as the cluster's CPUs/GPUs hold at once.
    max_concurrent_trials: int = option(
        0, flag="--max-concurrent", help="at most this many trials at once (0 = fit cluster)"
    )
    search: str = "auto"  # auto (optuna if installed, else random) | random | optuna | hyperopt
    seed: int = 0  # the search algorithm's seed: the same file samples the same trials
    scheduler: str = "asha"  # asha (early stopping on val_loss) | fifo (run every trial out)
    grace_period: int = 0  # steps before ASHA may stop a trial; 0 = train.eval_every
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor at each rung
    trial_memory_mb: int = 256  # reserved for each trial's driver (it holds no CPU)
    # What picks the best trial: val_loss (lowest) or a task's accuracy (highest), see above.
    metric: str = option("val_loss", flag="--metric", help="val_loss | medquad_mc_acc_norm | "
                         "medquad_mc_acc: what picks the best trial (sweep.metric)")  # fmt: skip

    @property
    def mode(self) -> str:
        return "min" if self.metric == "val_loss" else "max"

    @property
    def task(self) -> str | None:
        """The task whose accuracy is the metric, if it is one."""
        return task_metrics().get(self.metric)

    def __post_init__(self) -> None:
        allowed = ["val_loss", *task_metrics()]
        if self.metric not in allowed:
            raise ConfigError(f"metric: {self.metric!r} (allowed: {', '.join(allowed)})")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name: must be a plain folder name, got {self.name!r}")
        for field in ("num_samples", "trial_memory_mb"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{field}: must be >= 1, got {getattr(self, field)}")
        for field in ("max_concurrent_trials", "grace_period"):
            if getattr(self, field) < 0:
                raise ConfigError(f"{field}: must be >= 0, got {getattr(self, field)}")
        if self.search not in SEARCH_ALGORITHMS:
            raise ConfigError(f"search: {self.search!r} (allowed: {', '.join(SEARCH_ALGORITHMS)})")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler: {self.scheduler!r} (allowed: {', '.join(SCHEDULERS)})")
        if not self.reduction_factor > 1:
            raise ConfigError(f"reduction_factor: must be > 1, got {self.reduction_factor}")


@dataclasses.dataclass
class GateConfig:
    """The readiness gate applied to the sweep's best checkpoint."""

    max_loss: float | None = option(  # None: report the best trial, gate nothing
        None, flag="--max-loss", help="the gate's threshold (gate.max_loss)"
    )
    data: list[str] | None = None  # default: the recipe's dataset (its val split)
    # Benchmarks scored with the gate (medgpt evaluate --task); min_accuracy gates their acc_norm.
    tasks: list[str] = option(  # noqa: RUF009 - a dataclasses.field
        default_factory=list, flag="--task", help="a benchmark the gate scores, repeatable"
    )
    min_accuracy: float | None = option(
        None, flag="--min-accuracy", help="the gate on every task's acc_norm (gate.min_accuracy)"
    )
    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)

    def __post_init__(self) -> None:
        if self.max_loss is not None and not (self.max_loss > 0 and math.isfinite(self.max_loss)):
            raise ConfigError(f"max_loss: must be a positive number of nats, got {self.max_loss}")
        self.tasks = check_tasks(self.tasks)
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            raise ConfigError(
                f"min_accuracy: must be a fraction in [0, 1], got {self.min_accuracy}"
            )

    @property
    def defined(self) -> bool:
        """Whether the sweep file asks for a gate (a loss or an accuracy threshold)."""
        return self.max_loss is not None or self.min_accuracy is not None


@dataclasses.dataclass
class TuneSpec:
    """A whole sweep file, resolved: the base recipe mapping, the space and the settings."""

    recipe: dict[str, Any]
    space: list[Distribution]
    sweep: SweepConfig
    gate: GateConfig

    def fingerprint(self) -> str:
        """What a restored sweep must match: the trials' recipe and the search."""
        # The metric only ranks finished trials: changing it does not change the trials.
        body = {
            "recipe": self.recipe,
            "space": [dataclasses.asdict(d) for d in self.space],
            "sweep": {
                k: v
                for k, v in dataclasses.asdict(self.sweep).items()
                if k not in ("max_concurrent_trials", "trial_memory_mb", "metric")
            },
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


SECTIONS = ("recipe", "overrides", "space", "sweep", "gate")
TRIAL_STATUSES = ("completed", "stopped early", "error", "no result")


@dataclasses.dataclass
class TrialResult:
    """One trial of a sweep: how it ended, its sampled values and its best checkpoint."""

    trial_id: str
    status: str  # one of TRIAL_STATUSES
    values: dict[str, Any]  # searched key -> the value this trial got
    last_step: int | None
    val_loss_curve: list[tuple[int, float]]
    best_val_loss: float | None
    best_checkpoint: str | None
    mlflow_run_id: str | None
    error: str | None  # the last line of the trial's error
    # With a task as sweep.metric: its metrics on the best checkpoint (medquad_mc_acc, ...).
    metrics: dict[str, float] | None = None


@dataclasses.dataclass
class BestTrial:
    """The trial whose checkpoint had the lowest val_loss of the whole sweep, or, with a task
    as ``sweep.metric``, the highest ``metric_value``."""

    trial_id: str
    values: dict[str, Any]
    val_loss: float
    checkpoint: str
    mlflow_run_id: str | None
    metric: str = "val_loss"
    metric_value: float | None = None


@dataclasses.dataclass
class SweepResult:
    """What a sweep left: every trial, the best one, the MLflow parent run and, when the sweep
    file has a gate, the gate's report. :meth:`to_dict` is ``<sweep dir>/medgpt-sweep.json``."""

    name: str
    mlflow_parent_run_id: str
    mlflow_tracking_uri: str
    trials: list[TrialResult]
    best: BestTrial
    seconds: float = 0.0
    sweep_dir: str = ""
    report: GateReport | None = None  # the gate on the best checkpoint; None without one

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(t.status == s for t in self.trials) for s in TRIAL_STATUSES}

    @property
    def result_file(self) -> Path:
        return Path(self.sweep_dir) / RESULT_FILE

    def to_dict(self) -> dict[str, Any]:
        # The task fields appear only when a task ranked the trials: the file keeps its shape.
        trials = [dataclasses.asdict(t) for t in self.trials]
        for t in trials:
            if t["metrics"] is None:
                del t["metrics"]
        best = dataclasses.asdict(self.best)
        if best["metric"] == "val_loss":
            del best["metric"], best["metric_value"]
        out: dict[str, Any] = {
            "name": self.name,
            "mlflow_parent_run_id": self.mlflow_parent_run_id,
            "mlflow_tracking_uri": self.mlflow_tracking_uri,
            "trials": trials,
            "best": best,
            "counts": self.counts,
            "seconds": self.seconds,
            "sweep_dir": self.sweep_dir,
            "gate": None,
        }
        if self.report is not None:
            out["gate"] = self.report.data["gate"]
            out["registered"] = self.report.data.get("registered")
        return out


OVERRIDE_FORM = "key=value (e.g. sweep.num_samples=8)"


def load_spec(path: str | Path, overrides: list[str | Override] | None = None) -> TuneSpec:
    """Read a sweep file; ``overrides`` are ``key=value`` strings (or parsed overrides, e.g.
    from flags): ``sweep.*``/``gate.*`` set those sections, ``space.section.key=<distribution>``
    a searched value, anything else (``train.max_steps=20``) a fixed recipe value for every
    trial."""
    p = Path(path)
    data = load_yaml(p)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{p}: unknown section {unknown[0]!r} (allowed: {', '.join(SECTIONS)})")
    for section in ("overrides", "space", "sweep", "gate"):
        if data.get(section) is None:
            data[section] = {}
        if not isinstance(data[section], Mapping):
            raise ConfigError(f"{p}: {section}: expected a mapping, got {data[section]!r}")
    for item in overrides or []:
        o = item if isinstance(item, Override) else parse_override(item, OVERRIDE_FORM, True)
        # sweep.KEY, gate.KEY and space.SECTION.KEY land in their sections; the sections
        # "overrides" and "space" are keyed by the recipe's dotted keys, as in the file.
        section = o.head if o.head in ("sweep", "gate", "space") else "overrides"
        if section in ("sweep", "gate"):  # gate.benchmark.KEY is a nested section's key
            data[section] = set_path(data[section], o.rest.split("."), o.value, o.given or o.key)
        else:
            data[section] = {
                **data[section],
                (o.key if section == "overrides" else o.rest): o.value,
            }

    base = data.get("recipe")
    if base is None:
        raise ConfigError(f"{p}: recipe: name the training recipe the trials start from")
    if isinstance(base, str):
        recipe_path = Path(base)
        if not recipe_path.is_absolute():
            recipe_path = p.parent / recipe_path
        recipe = load_yaml(recipe_path)
    elif isinstance(base, Mapping):
        recipe = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    else:
        raise ConfigError(f"{p}: recipe: expected a file name or a mapping, got {base!r}")
    for key, value in data["overrides"].items():
        if "." not in str(key):
            raise ConfigError(f"overrides.{key}: expected section.key (e.g. train.max_steps)")
        recipe = set_path(recipe, str(key).split("."), value, f"overrides.{key}={value!r}")
    # The recipe on its own must be valid before anything is searched.
    Recipe.from_dict(recipe)

    sweep = from_mapping(SweepConfig, data["sweep"], prefix="sweep.")
    gate = from_mapping(GateConfig, data["gate"], prefix="gate.")
    space = [_parse_key(str(k), v) for k, v in data["space"].items()]
    if not space:
        raise ConfigError(
            f"{p}: space: empty search space (add e.g. train.lr: {{loguniform: [1.0e-4, 3.0e-3]}})"
        )
    if gate.min_accuracy is not None and not gate.tasks and sweep.task is None:
        raise ConfigError(
            "gate.min_accuracy: needs gate.tasks (or a task as sweep.metric): the accuracy of "
            "which benchmark?"
        )
    spec = TuneSpec(recipe, space, sweep, gate)
    check_space(spec)
    return spec


def _parse_key(key: str, value: Any) -> Distribution:
    section, _, field = key.partition(".")
    if section == "job":
        raise ConfigError(
            f"space.{key}: job settings decide where a trial runs, not how it learns; set them "
            "in the recipe or overrides (searchable sections: model, train)"
        )
    if section not in SEARCHABLE or not field:
        raise ConfigError(f"space.{key}: unknown hyperparameter (expected model.KEY or train.KEY)")
    allowed = sorted(f.name for f in dataclasses.fields(SEARCHABLE[section]))
    if field not in allowed:
        raise ConfigError(
            f"space.{key}: unknown hyperparameter {field!r} in {section} "
            f"(allowed: {', '.join(allowed)})"
        )
    if section == "train" and field in ("data_dir", "init_from", "max_steps"):
        raise ConfigError(
            f"space.{key}: fixed for the whole sweep (trials must share data, start and "
            "length for ASHA to compare them); set it in overrides"
        )
    return Distribution.parse(key, value)


def trial_recipe(base: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    recipe = dict(base)
    for key, value in values.items():
        recipe = set_path(recipe, key.split("."), value, f"{key}={value!r}")
    return recipe


def check_space(spec: TuneSpec) -> None:
    """Every value the search can produce must make a valid recipe: each listed value and
    range end alone, then the combinations of the listed values (up to a bound)."""
    for d in spec.space:
        for v in d.probe_values():
            try:
                Recipe.from_dict(trial_recipe(spec.recipe, {d.key: v}))
            except ConfigError as e:
                raise ConfigError(
                    f"space.{d.key}: value {v!r} makes an invalid recipe: {e}"
                ) from None
    grids = [[(d.key, v) for v in d.probe_values()] for d in spec.space]
    for i, combo in enumerate(itertools.product(*grids)):
        if i >= MAX_COMBINATIONS_CHECKED:
            break
        try:
            recipe = Recipe.from_dict(trial_recipe(spec.recipe, dict(combo)))
            recipe.train.grad_accum_steps(recipe.job.num_workers)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in combo)
            raise ConfigError(
                f"space: the combination {shown} makes an invalid recipe: {e}"
            ) from None
    if spec.sweep.search == "optuna" or spec.sweep.search == "hyperopt":
        grid = [d.key for d in spec.space if d.kind == "grid"]
        if grid:
            raise ConfigError(
                f"space.{grid[0]}: grid is not supported by search {spec.sweep.search!r} "
                "(use choice, or search: random)"
            )


# ---------------------------------------------------------------------------------------------
# Resources


def plan_concurrency(spec: TuneSpec, cluster: Mapping[str, float], trials: int) -> int:
    """How many trials run at once: what the cluster holds (never more, or a trial's worker
    group would wait for CPUs another trial holds), at most ``max_concurrent_trials``."""
    from medgpt.launch import worker_group_resources

    recipe = Recipe.from_dict(spec.recipe)
    need = worker_group_resources(recipe)
    if os.environ.get("MEDGPT_ALLOW_AUTOSCALE") and spec.sweep.max_concurrent_trials:
        # An autoscaling cluster may start with no GPU node at all: trust the stated limit.
        return min(trials, spec.sweep.max_concurrent_trials)
    fits = []
    for res, amount in need.items():
        have = float(cluster.get(res, 0.0))
        if amount > have and not os.environ.get("MEDGPT_ALLOW_AUTOSCALE"):
            raise ConfigError(
                f"a trial needs {amount:g} {res} (job.num_workers {recipe.job.num_workers} x "
                f"{'1 GPU' if res == 'GPU' else f'{recipe.job.cpus_per_worker:g} CPU'}) but the "
                f"cluster has {have:g}; lower job.num_workers or job.cpus_per_worker in the "
                "recipe or overrides"
            )
        fits.append(int(have // amount) if amount > 0 else trials)
    n = max(1, min([trials, *fits]))
    if spec.sweep.max_concurrent_trials:
        n = min(n, spec.sweep.max_concurrent_trials)
    return n


def count_trials(spec: TuneSpec) -> int:
    grid = math.prod(len(d.args) for d in spec.space if d.kind == "grid")
    return spec.sweep.num_samples * grid


# ---------------------------------------------------------------------------------------------
# The trial


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: the training run ``<sweep>-<trial id>`` with the sampled values."""
    import ray.tune

    from medgpt import tracking
    from medgpt.launch import fit_and_record, validate

    trial_id = ray.tune.get_context().get_trial_id()
    values = {k: config[k] for k in ctx["keys"]}
    data = trial_recipe(ctx["recipe"], values)
    data["job"] = {**data["job"], "name": f"{ctx['sweep']}-{trial_id}",
                   "storage_path": ctx["trials_dir"]}  # fmt: skip
    recipe = Recipe.from_dict(data)
    manifest = validate(recipe)
    run_id, _ = tracking.start_or_resume_run(
        ctx["uri"],
        recipe.job.experiment,
        recipe.job.name,
        recipe.to_dict(),
        {
            "mlflow.parentRunId": ctx["parent_run_id"],
            "medgpt.sweep": ctx["sweep"],
            "medgpt.trial_id": trial_id,
            "medgpt.hparams": json.dumps(values, sort_keys=True),
            "data_manifest_hash": manifest["content_hash"],
            "mlflow.source.name": "medgpt tune",
        },
    )
    fit_and_record(recipe, ctx["uri"], run_id, manifest, callbacks=[_eval_reports()])


def _eval_reports() -> Any:
    """A TuneReportCallback that passes on only the reports carrying val_loss (built here:
    ray.tune is imported only when a sweep runs)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReports(TuneReportCallback):
        """Pass Tune only the reports that carry val_loss: Tune errors the trial on a result
        without its metric, and the steps between evaluations decide nothing (the MLflow child
        run keeps every step)."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
            if metrics and "val_loss" in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return EvalReports()


# ---------------------------------------------------------------------------------------------
# The driver


def _search_algorithm(
    sweep: SweepConfig, space: list[Distribution], concurrency: int
) -> tuple[Any, str]:
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    wanted = sweep.search
    has_grid = any(d.kind == "grid" for d in space)
    if wanted == "auto":
        wanted = "random"
        if not has_grid:
            try:
                import optuna  # noqa: F401

                wanted = "optuna"
            except ImportError:
                pass
    # Tune ignores TuneConfig.max_concurrent_trials (with only a warning) when search_alg is
    # a BasicVariantGenerator, and every trial starts at once: the limit goes in here.
    if wanted == "random":
        return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrency), wanted
    try:
        if wanted == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            searcher: Any = OptunaSearch(seed=sweep.seed)
        else:
            from ray.tune.search.hyperopt import HyperOptSearch

            searcher = HyperOptSearch(random_state_seed=sweep.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=concurrency), wanted
    except (ImportError, AssertionError):
        raise ConfigError(
            f"sweep.search: {wanted!r} needs the {wanted} package (pip install {wanted}); "
            "or use search: random"
        ) from None


def _asha(max_steps: int, grace_period: int, reduction_factor: float) -> Any:
    """ASHA on training steps, which never stops a trial at its last step: a stop kills the
    trial function at once, before it closes its MLflow run and writes its result, and at the
    last step there is nothing left to save anyway."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class FinishingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if result.get("step", 0) >= max_steps:
                return TrialScheduler.CONTINUE
            return action

    return FinishingASHA(
        time_attr="step",  # the default counts reports, which depend on log_every
        max_t=max_steps,
        grace_period=min(max_steps, grace_period),
        reduction_factor=reduction_factor,
    )


def _entries(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def run_sweep(spec: TuneSpec, register: bool = False, log: Any = print) -> SweepResult:
    """Run (or resume) the sweep; gate its best checkpoint."""
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from medgpt import preflight, tracking
    from medgpt.launch import connect_ray, resolve_paths, validate

    if register and not spec.gate.defined:
        raise ConfigError(
            "--register needs a gate: set gate.max_loss (or --max-loss) or gate.min_accuracy"
        )
    # Of the file as written (recipe + overrides, space, search): defaults that a newer medgpt
    # adds to the recipe must not make a sweep unresumable.
    fingerprint = spec.fingerprint()
    base = resolve_paths(Recipe.from_dict(spec.recipe))
    spec = dataclasses.replace(spec, recipe=base.to_dict())
    manifest = validate(base)
    job, sweep = base.job, spec.sweep
    if "://" in job.storage_path:
        raise ConfigError(
            "job.storage_path: sweeps keep their Tune state in a local or shared folder "
            f"(got {job.storage_path!r}); mount the bucket (e.g. NFS) and give its path"
        )
    sweep_dir = Path(job.storage_path) / sweep.name
    trials_dir = sweep_dir / "trials"
    _search_algorithm(sweep, spec.space, 1)  # a missing package fails before Ray starts
    restoring = tune.Tuner.can_restore(str(sweep_dir))
    spec_file = sweep_dir / SPEC_FILE
    if restoring and spec_file.is_file():
        before = json.loads(spec_file.read_text()).get("fingerprint")
        if before != fingerprint:
            raise ConfigError(
                f"sweep {sweep.name!r} in {sweep_dir} was started with a different recipe, "
                "space or search; give another sweep.name (or remove that folder)"
            )
    elif not restoring and any(p.name != SPEC_FILE for p in _entries(sweep_dir)):
        raise ConfigError(
            f"{sweep_dir}: exists but holds no sweep to resume; give another sweep.name"
        )

    # With the dashboard, whose State API frees the placement group of a trial ASHA stopped
    # (connect_ray tells the workers where it is; FIELD-NOTES: the leak that hangs sweeps).
    connect_ray(base)
    trials = count_trials(spec)
    concurrency = plan_concurrency(spec, ray.cluster_resources(), trials)
    search_alg, search_name = _search_algorithm(sweep, spec.space, concurrency)
    uri = tracking.tracking_uri_for(job.storage_path, job.mlflow_tracking_uri)
    # Tune's state lives in job.storage_path: on several nodes it must be a shared mount.
    preflight.check_cluster(job.storage_path, uri, "job.storage_path")
    parent_params = {
        "sweep": {k: v for k, v in dataclasses.asdict(sweep).items()},
        "space": {d.key: {d.kind: d.args} for d in spec.space},
        "gate": dataclasses.asdict(spec.gate),
        "search_algorithm": search_name,
        "trials": trials,
        "concurrency": concurrency,
    }
    parent_id, _ = tracking.start_or_resume_run(
        uri, job.experiment, sweep.name, parent_params,
        {"medgpt.kind": "sweep", "data_manifest_hash": manifest["content_hash"],
         "mlflow.source.name": "medgpt tune"},
    )  # fmt: skip
    sweep_dir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps({"fingerprint": fingerprint, "space": parent_params}, indent=2))
    log(
        f"medgpt tune: sweep {sweep.name!r} ({'resuming' if restoring else 'new'}): {trials} "
        f"trials, {concurrency} at a time, {job.num_workers} worker(s) each, search "
        f"{search_name}, scheduler {sweep.scheduler}; MLflow parent run {parent_id} at {uri}"
    )

    ctx = {
        "recipe": spec.recipe,
        "keys": [d.key for d in spec.space],
        "sweep": sweep.name,
        "trials_dir": str(trials_dir),
        "uri": uri,
        "parent_run_id": parent_id,
    }
    # The trial function only waits on its Train run: it holds memory, not a CPU, so a trial
    # of N one-CPU workers fits N CPUs (Tune's default of one CPU per trial would not).
    trainable = tune.with_resources(
        tune.with_parameters(_trial, ctx=ctx), {"CPU": 0, "memory": sweep.trial_memory_mb * 2**20}
    )
    max_steps = base.train.max_steps
    scheduler = (
        _asha(max_steps, sweep.grace_period or base.train.eval_every, sweep.reduction_factor)
        if sweep.scheduler == "asha"
        else FIFOScheduler()
    )
    if restoring:
        tuner = tune.Tuner.restore(
            str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={d.key: d.to_tune() for d in spec.space},
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                num_samples=sweep.num_samples,
                scheduler=scheduler,
                search_alg=search_alg,
            ),
            run_config=tune.RunConfig(name=sweep.name, storage_path=job.storage_path, verbose=1),
        )
    started = time.time()
    grid = tuner.fit()
    summary = summarize(grid, spec, trials_dir, uri, parent_id, max_steps)
    data = spec.gate.data or [base.train.data_dir]
    if sweep.task is not None:
        from medgpt.evaluation import score_checkpoints

        log(f"medgpt tune: ranking the trials by {sweep.metric} (their best checkpoints)")
        rank_trials(
            summary,
            sweep.metric,
            lambda paths: score_checkpoints(
                paths,
                [sweep.task],
                spec.gate.benchmark,
                data,
                storage_path=job.storage_path,
                tracking_uri=job.mlflow_tracking_uri,
            ),
        )
        client = tracking.mlflow_client(uri)
        for t in summary.trials:
            for name, value in (t.metrics or {}).items():
                if t.mlflow_run_id and math.isfinite(value):
                    client.log_metric(t.mlflow_run_id, name, value)
    summary.seconds = round(time.time() - started, 1)
    summary.sweep_dir = str(sweep_dir)
    record_parent(uri, parent_id, summary)

    if spec.gate.defined:
        from medgpt.evaluation import EvalConfig, GateRequest, run_gate

        tasks = [*spec.gate.tasks, *([sweep.task] if sweep.task else [])]
        report = run_gate(
            GateRequest(
                checkpoint=summary.best.checkpoint,
                data=data,
                max_loss=spec.gate.max_loss,
                register=register,
                storage_path=job.storage_path,
                tracking_uri=job.mlflow_tracking_uri,
                eval=EvalConfig(samples=False),
                tasks=tasks,
                benchmark=spec.gate.benchmark,
                min_accuracy=spec.gate.min_accuracy,
            ),
            progress=False,
            log=log,
        )
        summary.report = report
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        gate = report.gate
        assert gate is not None  # max_loss was given
        client.set_tag(parent_id, "gate", "PASS" if gate.passed else "FAIL")
        if gate.loss is not None:
            client.log_metric(parent_id, "gate_eval_loss", gate.loss)
        for task, acc in (gate.accuracy or {}).items():
            client.log_metric(parent_id, f"gate_{task.replace('-', '_')}_acc_norm", acc)
        if report.registered is not None:
            client.set_tag(parent_id, "registered", report.registered.model_uri)
    summary.result_file.write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    return summary


def summarize(
    grid: Any, spec: TuneSpec, trials_dir: Path, uri: str, parent_id: str, max_steps: int
) -> SweepResult:
    """One row per trial (status, values, best val_loss and checkpoint); mark the MLflow runs of
    stopped trials (killed mid-fit, they never closed their own); pick the best checkpoint."""
    from mlflow.tracking import MlflowClient

    from medgpt.checkpoint import best_in_run, read_meta
    from medgpt.errors import CheckpointError

    client = MlflowClient(tracking_uri=uri)
    children = {
        r.data.tags.get("medgpt.trial_id"): r
        for r in client.search_runs(
            [client.get_run(parent_id).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
            max_results=1000,
        )
    }
    rows: list[TrialResult] = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        history = result.metrics_dataframe
        curve: list[tuple[int, float]] = []
        if history is not None and "val_loss" in history:
            ev = history.dropna(subset=["val_loss"])
            curve = [(int(s), float(v)) for s, v in zip(ev["step"], ev["val_loss"], strict=True)]
        step = metrics.get("step")
        if result.error is not None:
            status = "error"
        elif step is not None and step < max_steps:
            status = "stopped early"
        elif step is None:
            status = "no result"
        else:
            status = "completed"
        run = children.get(trial_id)
        best_path, best_val = None, None
        if run is not None:
            run_dir = trials_dir / run.data.tags.get("medgpt.run_name", "")
            try:
                best = best_in_run(run_dir)
                best_path, best_val = str(best), read_meta(best).get("val_loss")
            except (CheckpointError, OSError):
                pass
            if run.info.status == "RUNNING":  # its trial was killed before it could close it
                ended = {"completed": "FINISHED", "error": "FAILED"}.get(status, "KILLED")
                client.set_terminated(run.info.run_id, ended)
            client.set_tag(run.info.run_id, "medgpt.trial_status", status)
        rows.append(
            TrialResult(
                trial_id=trial_id,
                status=status,
                values={d.key: (result.config or {}).get(d.key) for d in spec.space},
                last_step=step,
                val_loss_curve=curve,
                best_val_loss=best_val,
                best_checkpoint=best_path,
                mlflow_run_id=run.info.run_id if run is not None else None,
                error=str(result.error).strip().splitlines()[-1] if result.error else None,
            )
        )
    rows.sort(key=lambda r: r.trial_id)
    scored = [r for r in rows if isinstance(r.best_val_loss, (int, float))]
    if not scored:
        errors = [r.error for r in rows if r.error]
        raise SweepError(
            f"sweep {spec.sweep.name!r}: none of its {len(rows)} trials produced a checkpoint"
            + (f"; first error: {errors[0]}" if errors else "")
        )
    best = min(scored, key=lambda r: r.best_val_loss)
    return SweepResult(
        name=spec.sweep.name,
        mlflow_parent_run_id=parent_id,
        mlflow_tracking_uri=uri,
        trials=rows,
        best=BestTrial(
            trial_id=best.trial_id,
            values=best.values,
            val_loss=best.best_val_loss,
            checkpoint=best.best_checkpoint,
            mlflow_run_id=best.mlflow_run_id,
        ),
    )


def rank_trials(summary: SweepResult, metric: str, score: Any) -> None:
    """Make the trial with the highest ``metric`` the sweep's best (ties: the lower val_loss):
    ``score`` maps the trials' best checkpoints to their metrics (one dict per checkpoint).
    Each scored trial keeps its metrics; a trial without a checkpoint cannot win."""
    scored = [
        t for t in summary.trials
        if t.best_checkpoint and isinstance(t.best_val_loss, (int, float))
    ]  # fmt: skip
    if not scored:
        return  # summarize has already refused a sweep without any checkpoint
    for t, m in zip(scored, score([t.best_checkpoint for t in scored]), strict=True):
        t.metrics = dict(m)

    def key(t: TrialResult) -> tuple[float, float]:
        value = (t.metrics or {}).get(metric, math.nan)
        return (value if math.isfinite(value) else -math.inf, -float(t.best_val_loss))

    best = max(scored, key=key)
    assert best.best_checkpoint is not None and best.best_val_loss is not None
    summary.best = BestTrial(
        trial_id=best.trial_id,
        values=best.values,
        val_loss=best.best_val_loss,
        checkpoint=best.best_checkpoint,
        mlflow_run_id=best.mlflow_run_id,
        metric=metric,
        metric_value=(best.metrics or {}).get(metric),
    )


def curves_png(rows: list[TrialResult], path: Path) -> Path | None:
    from medgpt.plots import Series, line_chart

    series = []
    for r in rows:
        steps, vals = zip(*r.val_loss_curve, strict=True) if r.val_loss_curve else ((), ())
        style = "o-" if r.status == "completed" else "x--"
        series.append(Series(f"{r.trial_id} ({r.status})", steps, vals, style))
    return line_chart(
        series, path, "step", "val_loss (nats/token)", "val_loss per trial", legend_size=7
    )


def trial_table(rows: list[TrialResult]) -> str:
    keys = sorted({k for r in rows for k in r.values})
    measured = sorted({k for r in rows for k in (r.metrics or {})})
    head = ["trial", "status", "last step", "best val_loss", *measured, *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        v = r.best_val_loss
        cells = [r.trial_id, r.status, str(r.last_step),
                 f"{v:.4f}" if isinstance(v, (int, float)) else "-",
                 *(_fmt_value((r.metrics or {}).get(k, "-")) for k in measured),
                 *(_fmt_value(r.values.get(k)) for k in keys)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def record_parent(uri: str, parent_id: str, summary: SweepResult) -> None:
    """The sweep's table of trials, the val_loss curves and the best trial, on the parent run."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    rows = summary.trials
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        trials = [dataclasses.asdict(r) for r in rows]
        (t / "trials.json").write_text(json.dumps(trials, indent=2, default=str))
        (t / "trials.md").write_text(trial_table(rows))
        client.log_artifact(parent_id, str(t / "trials.json"))
        client.log_artifact(parent_id, str(t / "trials.md"))
        png = curves_png(rows, t / "val_loss_curves.png")
        if png is not None:
            client.log_artifact(parent_id, str(png))
    best = summary.best
    client.log_metric(parent_id, "best_val_loss", float(best.val_loss))
    if best.metric_value is not None and math.isfinite(best.metric_value):
        client.log_metric(parent_id, f"best_{best.metric}", float(best.metric_value))
    for status, n in summary.counts.items():
        client.log_metric(parent_id, f"trials_{status.replace(' ', '_')}", n)
    client.set_tag(parent_id, "best_trial_id", best.trial_id)
    client.set_tag(parent_id, "best_checkpoint", str(best.checkpoint))
    client.set_tag(parent_id, "best_run_id", str(best.mlflow_run_id))
    client.set_terminated(parent_id, "FINISHED")
