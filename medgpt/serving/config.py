"""The Serve application's settings: ``args`` of serve/config.yaml, ``medgpt serve`` flags.

One declaration for the engine and for the deployment's Ray options: :meth:`ServeConfig.
deployment_options` derives what ``@serve.deployment`` would otherwise hard-code, so the
replica's CPUs, its request limit and its autoscaling are set in the serve config and nowhere
else. (A ``deployments:`` section in a Serve config file still overrides them, as Serve does
for any application.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from medgpt.api import DEFAULT_MAX_TOKENS_CAP
from medgpt.config import ConfigError, from_mapping

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
ROLLOUTS = ("auto", "beside", "drain")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass
class ServeConfig:
    checkpoint: str = "models:/medgpt@champion"
    storage_path: str = "runs"  # the MLflow store and download cache for models:/ URIs
    tracking_uri: str | None = None
    max_batch_size: int = 8  # sequences decoded together (continuous batching)
    max_queue: int = 64  # waiting requests beyond the batch; then 503
    # KV cache budget in token positions (rows x positions); a request that would exceed it
    # waits. 4096 is 302 MB for GPT-2 124M fp32 (73.7 KB a position), which keeps a replica
    # under the 1.5 GB standard; None = no limit (max_batch_size full-context rows).
    kv_cache_tokens: int | None = 4096
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP
    threads: int = 0  # torch threads; 0 = the replica's num_cpus
    int8: bool = False  # weight-only int8 linears (CPU); see docs/benchmarks.md for its loss cost
    fast_linear: bool = True  # float32 on CPU: medgpt's decode kernels
    device: str = "auto"
    # The weights' and KV cache's dtype on the replica's device (the checkpoint stays float32
    # on disk; sampling is float32 whatever this is). Half precision on a GPU only.
    dtype: str = "float32"
    # --- following the registry (a models:/NAME@ALIAS checkpoint) ---
    # Seconds between re-reads of the alias (POST /admin/refresh re-reads at once); 0 = serve
    # the version resolved at start-up until redeployed.
    follow_poll_s: float = 10.0
    # How a replica takes a new version: beside the old one (in-flight streams finish on the
    # old; needs memory for both), drain (new requests wait while the old version finishes
    # its streams and is freed, one replica at a time), or auto (beside when it fits).
    rollout: str = "auto"
    # The replica's memory budget for auto (MiB); None = what the machine has available.
    memory_mb: int | None = None
    # --- the deployment (Ray Serve options of the replica) ---
    num_cpus: float = 2.0
    num_gpus: float = 0.0
    # Requests a replica takes at once; None = max_batch_size + max_queue + 16, so that the
    # engine, not Serve's router, decides when to answer 503, and /healthz still gets through.
    max_ongoing_requests: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0  # autoscaling target when max_replicas > min_replicas
    health_check_period_s: float = 2.0

    def __post_init__(self) -> None:
        _require(bool(self.checkpoint), "checkpoint: a folder, run folder or models:/ URI")
        _require(
            1 <= self.max_batch_size <= 256,
            f"max_batch_size: must be in 1..256, got {self.max_batch_size}",
        )
        _require(self.max_queue >= 0, f"max_queue: must be >= 0, got {self.max_queue}")
        _require(
            self.kv_cache_tokens is None or self.kv_cache_tokens >= 1,
            f"kv_cache_tokens: must be >= 1 (token positions), or null for no limit; got "
            f"{self.kv_cache_tokens}",
        )
        _require(
            self.max_tokens_cap >= 1, f"max_tokens_cap: must be >= 1, got {self.max_tokens_cap}"
        )
        _require(self.threads >= 0, f"threads: must be >= 0 (0 = num_cpus), got {self.threads}")
        _require(
            self.device in DEVICES or self.device.startswith("cuda:"),
            f"device: {self.device!r} (allowed: auto, cpu, cuda, cuda:N)",
        )
        _require(self.num_cpus >= 0, f"num_cpus: must be >= 0, got {self.num_cpus}")
        _require(self.num_gpus >= 0, f"num_gpus: must be >= 0, got {self.num_gpus}")
        _require(
            not self.device.startswith("cuda") or self.num_gpus > 0,
            f"device: {self.device!r} needs a GPU reserved for the replica (num_gpus > 0, "
            "--num-gpus); with num_gpus 0 use device auto or cpu",
        )
        _require(
            not (self.int8 and (self.num_gpus > 0 or self.device.startswith("cuda"))),
            "int8: the weight-only int8 linears run on CPU only; drop int8 to serve on a GPU "
            "(num_gpus > 0 / device cuda), or serve int8 with num_gpus 0",
        )
        _require(
            self.dtype in DTYPES,
            f"dtype: {self.dtype!r} (allowed: {', '.join(DTYPES)})",
        )
        half = self.dtype != "float32"
        _require(
            not (half and self.int8),
            f"dtype: {self.dtype} with int8: int8 replaces the linears with int8 weights (a CPU "
            "path) and keeps the rest float32; use int8 with dtype float32 on the CPU, or a "
            "half dtype without int8 on a GPU",
        )
        _require(
            not (half and self.replica_device() == "cpu"),
            f"dtype: {self.dtype} on a CPU replica (num_gpus 0 or device cpu): these CPUs run "
            "half-precision matmuls far slower than float32 and medgpt's CPU decode kernels "
            "are float32; on the CPU use dtype float32 (with int8 for more speed), or reserve a "
            "GPU (num_gpus > 0, --num-gpus) for a half dtype",
        )
        _require(
            self.max_ongoing_requests is None or self.max_ongoing_requests >= 1,
            f"max_ongoing_requests: must be >= 1, or null; got {self.max_ongoing_requests}",
        )
        _require(
            1 <= self.min_replicas <= self.max_replicas,
            f"min_replicas/max_replicas: need 1 <= min_replicas <= max_replicas, got "
            f"{self.min_replicas}/{self.max_replicas}",
        )
        _require(self.target_ongoing_requests > 0, "target_ongoing_requests: must be > 0")
        _require(self.health_check_period_s > 0, "health_check_period_s: must be > 0")
        _require(
            self.follow_poll_s >= 0,
            f"follow_poll_s: must be >= 0 (0 = do not follow the alias), got {self.follow_poll_s}",
        )
        _require(
            self.rollout in ROLLOUTS,
            f"rollout: {self.rollout!r} (allowed: {', '.join(ROLLOUTS)})",
        )
        _require(
            self.memory_mb is None or self.memory_mb >= 1,
            f"memory_mb: must be >= 1 (MiB), or null for what the machine has; got "
            f"{self.memory_mb}",
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, prefix: str = "") -> ServeConfig:
        return from_mapping(cls, dict(data or {}), prefix=prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replica_device(self) -> str:
        """The device the replica loads the model on. ``auto`` without a reserved GPU is the
        CPU, whatever the replica can see: Ray hides GPUs from actors that reserved none only
        by default, and a replica must not share a GPU it was not given."""
        if self.device == "auto":
            return "cuda" if self.num_gpus > 0 else "cpu"
        return self.device

    def deployment_options(self) -> dict[str, Any]:
        """``Deployment.options(...)`` for the replica."""
        ongoing = self.max_ongoing_requests or self.max_batch_size + self.max_queue + 16
        options: dict[str, Any] = {
            "max_ongoing_requests": ongoing,
            "health_check_period_s": self.health_check_period_s,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.max_replicas > self.min_replicas:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.min_replicas
        return options
