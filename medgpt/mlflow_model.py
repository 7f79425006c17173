"""The MLflow pyfunc face of a registered medgpt checkpoint.

Registered versions are logged as "models from code": MLflow stores this file's source and
runs it when ``mlflow.pyfunc.load_model`` is called, instead of unpickling an object. The
checkpoint folder itself travels as the artifact ``checkpoint``; ``medgpt evaluate`` and Serve
download and read it directly (safetensors + JSON), so they never execute this file at all.

``mlflow.pyfunc.load_model("models:/medgpt@champion").predict(["Asthma is"])`` returns one
completion per prompt; ``params`` may set max_new_tokens, temperature, top_k and seed.

Why not ``mlflow.pytorch.log_model``: in MLflow 3 it defaults to torch.export ("pt2"), which
needs an input example and freezes the sequence length — no use for a language model whose
inputs grow token by token — and the pickle alternative ties the weights to Python classes.
"""

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

DEFAULTS = {"max_new_tokens": 48, "temperature": 0.8, "top_k": 40, "seed": 0}


class MedgptLM(PythonModel):
    def load_context(self, context: Any) -> None:
        from medgpt.checkpoint import load_model

        self.model = load_model(context.artifacts["checkpoint"])
        self.model.eval()

    def predict(self, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from medgpt.generation import complete

        unknown = sorted(set(params or {}) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown params {unknown} (allowed: {', '.join(DEFAULTS)})")
        p = {**DEFAULTS, **(params or {})}
        return [
            complete(
                self.model,
                prompt,
                int(p["max_new_tokens"]),
                float(p["temperature"]),
                int(p["top_k"]),
                int(p["seed"]),
            )
            for prompt in model_input
        ]


mlflow.models.set_model(MedgptLM())
