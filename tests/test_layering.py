"""The import direction: converters <- runtime <- toolchain, checked on the installed sources with `ast`.

`mflux/runtime/` imports only mlx, numpy, PIL, transformers, `mflux.errors`, `mflux.backend`,
`mflux.converters` and itself; `converters/` (installed as `mflux.converters`) only mlx, numpy,
`mflux.errors` and itself. Both may use the standard library. Every import statement counts,
including those inside functions.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import mflux.converters
import pytest

import mflux.runtime

RUNTIME = {
    "mlx",
    "numpy",
    "PIL",
    "transformers",
    "mflux.errors",
    "mflux.backend",
    "mflux.converters",
    "mflux.runtime",
}
CONVERTERS = {"mlx", "numpy", "mflux.errors", "mflux.converters"}


def imports(path: Path, package: str) -> set[str]:
    """Every module a file imports, as absolute names (`from mflux import x` counts as mflux.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the file's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base in ("mflux", "mflux.runtime", "mflux.converters"):
                found.update(f"{base}.{a.name}" for a in node.names)
            else:
                found.add(base)
    return found


def allowed(name: str, rule: set[str]) -> bool:
    top = name.split(".")[0]
    if top in sys.stdlib_module_names:
        return True
    return any(name == p or name.startswith(p + ".") for p in rule)


def violations(root: Path, package: str, rule: set[str], label: str) -> set[tuple[str, str]]:
    out = set()
    for path in sorted(root.rglob("*.py")):
        pkg = ".".join([package, *path.relative_to(root).parent.parts])  # what `from .` means in it
        for name in imports(path, pkg):
            if not allowed(name, rule):
                out.add((f"{label}/{path.relative_to(root).as_posix()}", name))
    return out


def runtime_violations() -> set[tuple[str, str]]:
    return violations(Path(mflux.runtime.__file__).parent, "mflux.runtime", RUNTIME, "runtime")


def converters_violations() -> set[tuple[str, str]]:
    return violations(Path(mflux.converters.__file__).parent, "mflux.converters", CONVERTERS, "converters")


def test_runtime_imports_nothing_of_the_toolchain():
    found = runtime_violations()
    assert found == set(), f"the runtime imports the toolchain: {sorted(found)}"


def test_converters_are_a_leaf():
    assert converters_violations() == set()


def test_the_walk_sees_imports_inside_functions(tmp_path, monkeypatch):
    # The check itself: a toolchain import added anywhere in a runtime module, even inside a function,
    # is found.
    root = tmp_path / "runtime"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "ok.py").write_text(
        "import mlx.core as mx\nfrom . import weights\nfrom mflux.errors import MfluxError\n"
    )
    (root / "bad.py").write_text("def f():\n    from mflux.store import Store\n    from .. import cli\n")
    assert violations(root, "mflux.runtime", RUNTIME, "runtime") == {
        ("runtime/bad.py", "mflux.store"),
        ("runtime/bad.py", "mflux.cli"),
    }


@pytest.mark.parametrize("what", ["package", "every module"])
def test_importing_the_runtime_loads_no_toolchain_module(what):
    root = Path(mflux.runtime.__file__).parent
    modules = ["mflux.runtime"]
    if what == "every module":
        modules += [f"mflux.runtime.{p.stem}" for p in sorted(root.glob("*.py")) if p.stem != "__init__"]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    toolchain = {
        m
        for m in loaded
        if m.startswith("mflux.") and not any(allowed(m, {p}) for p in RUNTIME if p.startswith("mflux."))
    }
    assert toolchain == set(), sorted(toolchain)
    if what == "package":
        assert "mlx.core" not in loaded  # importing the package alone loads nothing heavy either
