"""The import rules of docs/architecture.md, read from the source: every import statement of
medgpt/, web/ and jobs/, at module level or inside a function, goes down the layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS: list[set[str]] = [
    {"__init__", "errors", "api", "fsutil", "config", "tokenizer", "storage", "procs"},
    {"kernels", "kv_cache", "model", "hf", "quantize", "data", "sharding"},
    {"checkpoint", "generation", "plots", "plan", "benchmark"},
    {"tracking", "registry", "mlflow_model", "rollout"},
    {"training", "launch", "evaluation", "tuning", "serving", "demo", "preflight", "stack",
     "export"},
    {"cli", "jobs", "web"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
WEB_MAY_IMPORT = {"__init__", "api", "errors", "config", "web"}


def _component(module: str) -> str | None:
    """medgpt.data.loader -> data; medgpt -> __init__; web.app -> web; jobs.x -> jobs."""
    parts = module.split(".")
    if parts[0] == "medgpt":
        return parts[1] if len(parts) > 1 else "__init__"
    if parts[0] in ("web", "jobs"):
        return parts[0]
    if parts[0] in ("tests", "bench"):
        return parts[0]
    return None


def _sources() -> list[tuple[str, Path]]:
    out = []
    for folder in ("medgpt", "web", "jobs"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file; ``from medgpt import x`` counts
    as importing ``medgpt.x``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


SOURCES = _sources()


def test_every_module_has_a_layer() -> None:
    missing = sorted(
        {c for m, _ in SOURCES if (c := _component(m)) not in LAYER and c != "testing"}
    )
    assert not missing, f"give these a layer (here and in docs/architecture.md): {missing}"


def _violations() -> list[str]:
    bad = []
    for module, path in SOURCES:
        me = _component(module)
        if me == "testing":
            continue  # test support: may import anything, and nothing imports it (below)
        for line, target in _imports(module, path):
            top = target.split(".")[0]
            where = f"{path.relative_to(REPO)}:{line} imports {target}"
            other = _component(target)
            if other in ("tests", "bench", "testing"):
                bad.append(f"{where}: the library never imports test or benchmark code")
            elif me == "web" and top in ("torch", "ray"):
                bad.append(f"{where}: web/ must not import {top}")
            elif me == "web" and other is not None and other not in WEB_MAY_IMPORT:
                bad.append(f"{where}: web/ may use only medgpt's api, errors and config")
            elif me == "api" and top in ("torch", "ray", "fastapi", "flask"):
                bad.append(f"{where}: the protocol is framework-free")
            elif me == "model" and top == "ray":
                bad.append(f"{where}: model code is single-device, without Ray")
            elif other in LAYER and me in LAYER and LAYER[other] > LAYER[me] and me != other:
                bad.append(f"{where}: upward (layer {LAYER[me]} -> {LAYER[other]})")
    return bad


def test_imports_go_down_the_layers() -> None:
    bad = _violations()
    assert not bad, "\n".join(bad)


def test_the_checker_sees_violations(tmp_path, monkeypatch) -> None:
    """The rules are not vacuous: planted imports are caught."""
    fake = tmp_path / "medgpt"
    (fake / "api").mkdir(parents=True)
    (fake / "api" / "__init__.py").write_text("import torch\n")
    (fake / "model.py").write_text("def f():\n    import ray\n")
    (fake / "config.py").write_text("from medgpt import serving\n")
    (fake / "checkpoint.py").write_text("from medgpt.testing import free_port\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "SOURCES", _sources())
    bad = "\n".join(_violations())
    assert "api/__init__.py:1 imports torch: the protocol is framework-free" in bad
    assert "model.py:2 imports ray: model code is single-device" in bad
    assert "config.py:1 imports medgpt.serving: upward (layer 0 -> 4)" in bad
    assert "checkpoint.py:1 imports medgpt.testing" in bad


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [("web.app", ("torch", "ray", "medgpt.model", "medgpt.generation")),
     ("medgpt.api", ("torch", "ray", "fastapi")),
     ("medgpt.serving.responses", ("torch", "ray")),
     ("medgpt.model", ("ray",))],
)  # fmt: skip
def test_what_an_import_loads(module, forbidden) -> None:
    """The same rules at run time: what importing a module really pulls in."""
    code = (f"import sys, {module}; "
            f"print([m for m in {forbidden!r} if m in sys.modules])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, timeout=120)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout
