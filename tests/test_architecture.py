"""The package layout holds: lower packages never import higher ones
(protocol < worker < supervisor < gateway), the `lmx` client commands import
nothing of the server side, the HTTP process never loads an inference
engine, and every package and sub-package says what it is for and stays
small."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["lmx_protocol", "lmx_worker", "lmx_supervisor", "lmx_gateway"]
CLIENT = "lmx_gateway.cli"
MAX_MODULES_PER_FOLDER = 12


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path = ROOT) -> list[str]:
    """Every module `path` imports, absolute (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path, root).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else _module_name(path, root)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append(module)
            # `from pkg import sub` may import a sub-module.
            found += [f"{module}.{alias.name}" for alias in node.names]
    return found


def _sources(root: Path) -> list[Path]:
    return [p for layer in LAYERS for p in sorted((root / layer).rglob("*.py"))]


def _layer(module: str) -> int | None:
    top = module.split(".", 1)[0]
    return LAYERS.index(top) if top in LAYERS else None


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    # The rule below must be able to fail: planted upward imports are found.
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "lmx_protocol" / "planted.py").write_text(
        "from lmx_gateway.app import create_app\n")
    (tmp_path / "lmx_worker" / "planted.py").write_text("import lmx_supervisor.config\n")
    (tmp_path / "lmx_gateway" / "fine.py").write_text("from lmx_protocol import encode\n")
    found = {(module, imported.rsplit(".", 1)[0] if imported.endswith("create_app")
              else imported) for module, imported in _upward_imports(tmp_path)}
    assert found == {("lmx_protocol.planted", "lmx_gateway.app"),
                     ("lmx_worker.planted", "lmx_supervisor.config")}


def _upward_imports(root: Path = ROOT) -> list[tuple[str, str]]:
    bad = []
    for path in _sources(root):
        module = _module_name(path, root)
        own = _layer(module)
        assert own is not None
        for imported in _imports(path, root):
            other = _layer(imported)
            if other is not None and other > own:
                bad.append((module, imported))
    return sorted(set(bad))


def test_no_package_imports_a_higher_one() -> None:
    assert _upward_imports() == []


def test_client_commands_import_nothing_of_the_server_side() -> None:
    bad = []
    for path in sorted((ROOT / "lmx_gateway" / "cli").rglob("*.py")):
        for imported in _imports(path):
            if _layer(imported) is None:
                continue  # stdlib or third party
            if imported.startswith(CLIENT) or imported in ("lmx_gateway",
                                                           "lmx_gateway.__version__"):
                continue
            bad.append((_module_name(path), imported))
    assert bad == []


def test_gateway_imports_nothing_from_the_worker() -> None:
    bad = [(_module_name(p), m) for p in sorted((ROOT / "lmx_gateway").rglob("*.py"))
           for m in _imports(p) if m.split(".", 1)[0] == "lmx_worker"]
    assert bad == []


@pytest.mark.parametrize("entry", ["lmx_gateway.app", "lmx_gateway.main", "lmx_gateway.serve"])
def test_http_process_loads_no_inference_engine(entry: str) -> None:
    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(','.join(m for m in ('llguidance', 'llama_cpp', 'mlx', 'mlx_lm') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, entry], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def _folder_faults(root: Path = ROOT) -> list[str]:
    """Every package folder (each package's top level and every sub-package
    below it) must say what it holds in its __init__ docstring and hold at
    most MAX_MODULES_PER_FOLDER modules besides __init__.py."""
    faults = []
    for layer in LAYERS:
        folders = sorted({p.parent for p in (root / layer).rglob("*.py")})
        for folder in folders:
            name = folder.relative_to(root).as_posix()
            init = folder / "__init__.py"
            if not init.exists():
                faults.append(f"{name}/ has no __init__.py")
            elif not ast.get_docstring(ast.parse(init.read_text())):
                faults.append(f"{name}/__init__.py has no docstring saying what it holds")
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            if len(modules) > MAX_MODULES_PER_FOLDER:
                faults.append(f"{name}/ holds {len(modules)} modules "
                              f"(at most {MAX_MODULES_PER_FOLDER})")
    return faults


def test_the_folder_checker_sees_a_fault(tmp_path: Path) -> None:
    # The rule below must be able to fail: a crowded top level, an
    # undocumented sub-package and a folder without __init__.py are found.
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text(f'"""The {layer} package."""\n')
    for i in range(MAX_MODULES_PER_FOLDER + 1):
        (tmp_path / "lmx_worker" / f"m{i}.py").write_text("")
    (tmp_path / "lmx_supervisor" / "parts").mkdir()
    (tmp_path / "lmx_supervisor" / "parts" / "__init__.py").write_text("X = 1\n")
    (tmp_path / "lmx_gateway" / "loose").mkdir()
    (tmp_path / "lmx_gateway" / "loose" / "thing.py").write_text("")
    assert _folder_faults(tmp_path) == [
        f"lmx_worker/ holds {MAX_MODULES_PER_FOLDER + 1} modules "
        f"(at most {MAX_MODULES_PER_FOLDER})",
        "lmx_supervisor/parts/__init__.py has no docstring saying what it holds",
        "lmx_gateway/loose/ has no __init__.py",
    ]


def test_package_folders_are_documented_and_small() -> None:
    assert _folder_faults() == []
