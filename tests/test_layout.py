"""The package layout is the architecture (STYLE "The shape of the tree"): the import graph of
`alice_ds/` must follow the layers below, only `engine/` imports DeepSpeed, no library module imports
the command-line front door, and no module grows past the size a reader can hold."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "alice_ds"
BASE = {"errors", "console", "dist", "files", "args", "views", "shards", "memory", "__init__"}
"""Top-level modules every package may use (`alice_ds/*.py` except the CLI)."""
ALLOWED = {
    "base": set(),
    "models": set(),
    "kernels": set(),
    "losses": {"kernels", "models"},
    "method": {"models", "losses", "kernels"},
    "data": set(),
    "sam": {"data"},
    "sampler": {"data", "sam", "models"},
    "engine": {"data", "sam", "sampler", "models", "losses", "kernels", "method"},
    "export": {"engine", "models"},
    "finetune": {"data", "export", "models"},
    "cli": {"data", "sam", "sampler", "engine", "export", "models", "losses", "kernels", "method", "finetune"},
}
"""Which other layers each layer may import (`base` always). `data` is the bottom of the data side:
IO, datalists, the cache, landmarks, phantoms; it imports none of sam, sampler, method or engine."""
MAX_LINES = 400


def _layer(module: str) -> str:
    """alice_ds.sam.matcher -> "sam"; alice_ds.files -> "base"; alice_ds.cli -> "cli"."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if parts[1] == "cli":
        return "cli"
    return "base" if parts[1] in BASE else parts[1]


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement of a file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..y import x
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if f"{base}.{a.name}" in _ALL]
    return out


_ALL = {name for name, _ in _modules()}


def test_import_graph_follows_the_layers():
    offenders = []
    for module, path in _modules():
        layer = _layer(module)
        for line, target in _imports(path, module):
            if not target.startswith("alice_ds.") or target == "alice_ds":
                continue
            other = _layer(target)
            if other == layer or other == "base" and layer != "base":
                continue
            if other == "cli" or other not in ALLOWED[layer] and not (module == "alice_ds" and other == "export"):
                offenders.append(f"{path.relative_to(PKG.parent)}:{line} ({layer}) imports {target} ({other})")
    assert offenders == []


def test_the_layer_check_can_see_a_violation(tmp_path):
    """The checker itself: a `data` module importing the sampler is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from alice_ds.sampler.dataset import PairDataset\nimport alice_ds.cli\n")
    targets = [t for _, t in _imports(bad, "alice_ds.data.bad")]
    assert "alice_ds.sampler.dataset" in targets and "alice_ds.cli" in targets
    assert _layer("alice_ds.sampler.dataset") not in ALLOWED["data"]


def test_only_engine_imports_deepspeed():
    offenders = [f"{module}:{line}" for module, path in _modules() if _layer(module) != "engine"
                 for line, target in _imports(path, module) if target.split(".")[0] == "deepspeed"]
    assert offenders == []
    assert any(t.startswith("deepspeed") for _, t in _imports(PKG / "engine" / "trainer.py", "alice_ds.engine.trainer"))


@pytest.mark.parametrize("package", ["alice_ds.models", "alice_ds.losses", "alice_ds.sampler", "alice_ds.sam",
                                     "alice_ds.data.phantom", "alice_ds.finetune.train"])
def test_packages_load_no_deepspeed_at_runtime(package):
    """Also through third-party imports, which the static check cannot see."""
    code = (f"import sys, {package}; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'); "
            "assert not bad, bad; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_no_module_over_max_lines():
    lines = {str(p.relative_to(PKG.parent)): len(p.read_text().splitlines()) for _, p in _modules()}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert long == {}
