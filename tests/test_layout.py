"""The package layout and its layering rules, read off the code itself.

- `pip install .` installs one top-level package, `attnserve`; the folders model/, export/,
  server/ and bench/ install as its subpackages (setup.py).
- attnserve.server (and everything it imports) never imports torch, attnserve.model,
  attnserve.export or attnserve.bench: a serving install has no torch.
- attnserve.model knows nothing of serving: no attnserve.server, gRPC, stubs or client.
- Only the command line (attnserve.cli) wires training, export and serving together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"attnserve": ROOT / "attnserve", "attnserve.model": ROOT / "model", "attnserve.export": ROOT / "export",
           "attnserve.server": ROOT / "server", "attnserve.bench": ROOT / "bench"}


def module_files() -> dict[str, Path]:
    """Every module of the package, by its installed name."""
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "attnserve" and parts[0] in ("model", "export", "server", "bench"):
                continue
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = module_files()


def imports_of(name: str) -> set[str]:
    """The absolute names a module imports, at any depth of its code (lazy imports included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found


def closure(name: str) -> set[str]:
    """Everything a module imports, transitively through the project's own modules."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        for imported in imports_of(current):
            if imported not in seen:
                seen.add(imported)
                if imported in MODULES:
                    todo.append(imported)
    return seen


def offending(imported: set[str], forbidden: tuple[str, ...]) -> set[str]:
    return {m for m in imported if any(m == f or m.startswith(f + ".") for f in forbidden)}


SERVING_FORBIDDEN = ("torch", "attnserve.model", "attnserve.export", "attnserve.bench", "attnserve.cli", "safetensors",
                     "sacrebleu")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("attnserve.server")))
def test_serving_never_imports_torch_training_or_export(module) -> None:
    assert not offending(closure(module), SERVING_FORBIDDEN), f"{module} imports, through its imports, what serving must not"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("attnserve.model")))
def test_the_model_knows_nothing_of_serving(module) -> None:
    forbidden = ("attnserve.server", "attnserve.client", "attnserve.v1", "attnserve.cli", "grpc", "onnxruntime")
    assert not offending(closure(module), forbidden)


def test_only_the_command_line_wires_training_and_serving_together() -> None:
    training = ("attnserve.model", "attnserve.export", "torch")
    for module in MODULES:
        if module in ("attnserve.cli",) or module.startswith(("attnserve.model", "attnserve.export", "attnserve.bench")):
            continue
        assert not offending(imports_of(module), training), f"{module} imports training code"


def test_the_serving_modules_import_without_torch() -> None:
    serving = sorted(m for m in MODULES if m.startswith("attnserve.server") or m in ("attnserve.client",))
    code = ("import sys\nfor name in ('torch', 'safetensors', 'sacrebleu'):\n    sys.modules[name] = None\n"
            f"import importlib\nfor m in {serving!r}:\n    importlib.import_module(m)\n"
            "assert not any(n.startswith(('attnserve.model', 'attnserve.export')) for n in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_pip_install_puts_only_attnserve_in_site_packages(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--wheel-dir", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("attnserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["attnserve"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"attnserve"}
    for package in FOLDERS:
        assert package.replace(".", "/") + "/__init__.py" in names
    assert "attnserve/server/engine.py" in names and "attnserve/v1/translator_pb2.py" in names
