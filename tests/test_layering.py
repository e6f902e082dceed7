"""The layout's arrows point down: ``pipeline/`` imports nothing of ``modules/``, ``datamodules/`` or ``recipes/``
and has no import cycle; ``pipeline/config.py`` (the ground floor) imports nothing of the pipeline but its errors;
no recipe imports another; nothing imports a recipe. Read from the source (every import statement, also those
inside functions), so a lazy import cannot hide an arrow pointing up."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# above the pipeline: the Lightning wrappers, the stages, the API and command line (rome/), the entry point
UPPER = ("rome.modules", "rome.datamodules", "rome.recipes", "rome.api", "rome.cli", "train")
LIBRARY = ("pipeline", "modules", "datamodules", "recipes")  # folders installed as rome.<folder>


def upper(module: str) -> bool:
    """``module`` is above the pipeline (``rome`` alone is the API's namespace: ``rome.edit``)."""
    return module == "rome" or any(module == u or module.startswith(u + ".") for u in UPPER)


def module_name(path: Path) -> str:
    """The name ``path`` imports as: ``pipeline/core/hooks.py`` is ``rome.pipeline.core.hooks``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = ["rome", *parts] if parts[0] in LIBRARY else parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved against its package)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # "from rome.pipeline.editors import rome"
    return out


def graph(folder: str) -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / folder).rglob("*.py")}
    return {
        name: {m for m in imports(p) if m in files} | {m for m in imports(p) if upper(m)} for name, p in files.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_pipeline_imports_nothing_above_it():
    upward = {m: sorted(i for i in deps if upper(i)) for m, deps in graph("pipeline").items()}
    assert not {m: d for m, d in upward.items() if d}


def test_pipeline_has_no_import_cycle():
    edges = graph("pipeline")
    assert sum(map(len, edges.values())) > 100  # the names resolve: the pipeline's own imports are edges
    # a package's __init__ is not an edge of the modules it contains (importing pipeline.x.y runs pipeline.x)
    assert cycles({m: {d for d in deps if d in edges and not d.startswith(m + ".")} for m, deps in edges.items()}) == []


def test_the_config_is_the_ground_floor():
    ours = {m for m in imports(ROOT / "pipeline" / "config.py") if m.startswith("rome")}
    assert ours <= {"rome.pipeline.errors", "rome.pipeline.errors.UserError"}, ours


def test_no_recipe_imports_another_and_nothing_imports_a_recipe():
    for folder in ("pipeline", "modules", "datamodules", "recipes", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not any(m.startswith("rome.recipes") for m in imports(path)), path


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_stages_that_do_not_train_start_without_lightning(tmp_path):
    """Importing Lightning takes seconds (3.5-4 s of a stage's 6-7 s start on 2 cores: docs/benchmarks.md,
    Start-up): revert, export, report, ask and trace never load it, and a bad fact file is said before the model
    loads; the stages that train import it at their recipe's top, where the command line quiets it."""
    import os
    import subprocess
    import sys

    nope = tmp_path / "nope"
    probe = f"""
import sys
from rome import cli
for argv in (["stage=revert", "ledger={nope}", "edit_id=all"], ["stage=export", "ledger={nope}"],
             ["stage=report", "report.dir={nope}"], ["stage=ask", "ledger={nope}", "prompt=The Eiffel Tower is in"],
             ["stage=trace", "trace.dataset={nope}.json", "model.device=cpu"]):
    print(argv[0], cli.main(argv), "lightning" in sys.modules, flush=True)
import rome.recipes.stats, rome.recipes.edit, rome.recipes.eval, rome.recipes.eval_scale
print("training stages", "lightning" in sys.modules)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [
        *(f"stage={s} 2 False" for s in ("revert", "export", "report", "ask", "trace")),
        "training stages True",
    ], r.stdout + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 5 and f"fact file {nope}.json does not exist" in errors[-1]
