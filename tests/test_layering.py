"""The import direction: converters <- runtime <- toolchain, checked on the installed sources with `ast`.

`mflux/runtime/` imports only mlx, numpy, PIL, tokenizers, sentencepiece, `mflux.errors`, `mflux.backend`,
`mflux.converters` and itself; `converters/` (installed as `mflux.converters`) only mlx, numpy,
`mflux.errors`, `gguf` (the optional extra that parses GGUF files, in converters/gguf.py) and itself.
Both may use the standard library. Every import statement counts, including those inside functions.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mflux.converters
import mflux.runtime

RUNTIME = {
    "mlx",
    "numpy",
    "PIL",
    "tokenizers",
    "sentencepiece",
    "mflux.errors",
    "mflux.backend",
    "mflux.converters",
    "mflux.runtime",
}
CONVERTERS = {"mlx", "numpy", "gguf", "mflux.errors", "mflux.converters"}


def imports(path: Path, package: str) -> set[str]:
    """Every module a file imports, as absolute names (`from mflux import x` counts as mflux.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, package)
            if base in ("mflux", "mflux.runtime", "mflux.converters"):
                found.update(f"{base}.{a.name}" for a in node.names)
            else:
                found.add(base)
    return found


def absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` reads, a relative one resolved against the file's package."""
    base = node.module or ""
    if node.level:
        parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{parent}.{base}" if base else parent
    return base


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


# ---- the CUDA fence: the portable code names CUDA only at these sites, each one `if` on device.cuda()

PACKAGE = Path(mflux.runtime.__file__).parent.parent
# (file under mflux/, qualified function): the only places outside mflux/runtime/cuda/ where the
# portable runtime, Flux1 and the trainer name CUDA
CUDA_SITES = {
    ("runtime/device.py", "backend"),  # which backend runs here
    ("runtime/device.py", "cuda"),  # the one door: the package where MLX runs on CUDA
    ("runtime/layers.py", "qk_rope"),
    ("runtime/layers.py", "mlp_act"),
    ("runtime/layers.py", "gelu_concat"),
    ("runtime/textops.py", "embed"),
    ("runtime/textops.py", "pick"),
    ("runtime/textops.py", "gelu_approx"),
    ("runtime/memory.py", "bounded"),
    ("runtime/loader.py", "load_component"),
    ("runtime/quantization.py", "quantize_model_from_weights"),
    ("runtime/models.py", "Models.get"),
    ("runtime/models.py", "Models.prefetch"),
    ("runtime/models.py", "Models.generate"),
    ("runtime/models.py", "default_batch_size"),
    ("train/trainer.py", "Trainer._unbuilt_kernels"),
    ("train/trainer.py", "make_step.traced_with_ops"),
}


def fenced_files(root: Path) -> list[Path]:
    """The portable runtime (outside runtime/cuda/), Flux1 and the trainer."""
    files = [p for p in (root / "runtime").glob("*.py")]
    return sorted([*files, *(root / "train").glob("*.py"), root / "flux1.py"])


def own_nodes(node: ast.AST):
    """`ast.walk` without descending into nested functions and classes (they are sites of their own)."""
    scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    todo = [] if isinstance(node, scopes) else [node]
    while todo:
        n = todo.pop()
        yield n
        todo.extend(
            c
            for c in ast.iter_child_nodes(n)
            if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        )


def names_cuda(node: ast.AST) -> bool:
    """Whether a node names CUDA: a name or attribute `cuda`, the string "cuda", an import of the package."""
    for n in own_nodes(node):
        if isinstance(n, ast.Name) and n.id == "cuda" or isinstance(n, ast.Attribute) and n.attr == "cuda":
            return True
        if isinstance(n, ast.Constant) and n.value == "cuda":
            return True
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("mflux.runtime.cuda"):
            return True
        if isinstance(n, ast.ImportFrom) and any(a.name == "cuda" for a in n.names):
            return True
        if isinstance(n, ast.Import) and any(a.name.startswith("mflux.runtime.cuda") for a in n.names):
            return True
    return False


def cuda_sites(root: Path) -> tuple[set, set]:
    """(file, function) pairs whose code names CUDA (module level is "<module>"), and the functions with
    more than one `if` whose test names it."""
    found, branchy = set(), set()

    def visit(node, path: str, scope: list[str]):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = [*scope, child.name]
                if not isinstance(child, ast.ClassDef):
                    body = [s for s in child.body if not _is_docstring(s)]
                    if any(names_cuda(s) for s in body):
                        found.add((path, ".".join(inner)))
                    tests = [n for s in body for n in own_nodes(s) if isinstance(n, (ast.If, ast.IfExp))]
                    if sum(names_cuda(t.test) for t in tests) > 1:
                        branchy.add((path, ".".join(inner)))
                visit(child, path, inner)
            elif not scope and names_cuda(child) and not _is_docstring(child):
                found.add((path, "<module>"))

    for file in fenced_files(root):
        visit(ast.parse(file.read_text()), file.relative_to(root).as_posix(), [])
    return found, branchy


def _is_docstring(stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)


def test_the_portable_code_names_cuda_only_at_the_listed_sites_each_one_branch():
    found, branchy = cuda_sites(PACKAGE)
    assert found - CUDA_SITES == set(), f"CUDA named outside the listed sites: {sorted(found - CUDA_SITES)}"
    assert CUDA_SITES - found == set(), f"listed sites that no longer name CUDA: {sorted(CUDA_SITES - found)}"
    assert branchy == set(), f"more than one `if` on CUDA in: {sorted(branchy)}"


def test_the_fence_check_finds_a_new_site(tmp_path):
    # The check itself: CUDA named in a new function, or a second branch at a listed site, is found.
    (tmp_path / "runtime").mkdir()
    (tmp_path / "train").mkdir()
    (tmp_path / "flux1.py").write_text("")
    (tmp_path / "runtime" / "layers.py").write_text(
        "import mlx.core as mx\n"
        "def mlp_act(x):\n"
        "    cuda = device.cuda()\n"
        "    if cuda:\n        x = 1\n"
        "    if cuda and x:\n        x = 2\n"
        "    return x\n"
        "def other(x):\n    return mx.cuda.is_available()\n"
        "def fine(x):\n    '''Says CUDA in words only.'''\n    return x\n"
    )
    found, branchy = cuda_sites(tmp_path)
    assert found == {("runtime/layers.py", "mlp_act"), ("runtime/layers.py", "other")}
    assert branchy == {("runtime/layers.py", "mlp_act")}


def test_the_cuda_package_imports_only_the_portable_runtime_and_its_own():
    # the fence runs one way: runtime/cuda/ may use the portable runtime, never the toolchain
    found = violations(PACKAGE / "runtime" / "cuda", "mflux.runtime.cuda", RUNTIME, "runtime/cuda")
    assert found == set()


HIDDEN = r"""
import importlib.abc, sys


class Hide(importlib.abc.MetaPathFinder):  # as if mflux/runtime/cuda/ had been deleted
    def find_spec(self, name, path=None, target=None):
        if name == "mflux.runtime.cuda" or name.startswith("mflux.runtime.cuda."):
            raise ImportError(f"{name} is hidden")
        return None


sys.meta_path.insert(0, Hide())
from mflux.runtime import device

device.backend = lambda: "cuda"  # so that device.cuda() tries the import, as on a CUDA machine
import numpy as np
from mflux import Config, Flux1

flux = Flux1.from_path(sys.argv[1], precision="float32")
image = flux.generate_image(3, "a photo of a cat", Config(num_inference_steps=2, height=64, width=64))
assert device.cuda() is None
assert not any(m.startswith("mflux.runtime.cuda") for m in sys.modules), "the package was imported"
np.save(sys.argv[2], np.array(image.image))
"""


def test_a_generation_runs_with_the_cuda_package_unimportable(tiny_schnell, tmp_path):
    from mflux import Config, Flux1

    out = tmp_path / "image.npy"
    subprocess.run([sys.executable, "-c", HIDDEN, str(tiny_schnell), str(out)], check=True, timeout=300)
    hidden = np.load(out)
    assert hidden.std() > 10  # a real image
    flux = Flux1.from_path(tiny_schnell, precision="float32")
    image = flux.generate_image(3, "a photo of a cat", Config(num_inference_steps=2, height=64, width=64))
    np.testing.assert_array_equal(hidden, np.array(image.image))


# ---- a module's internals stay inside it: the store's name resolver, the runtime's LoRA helpers

PRIVATE_OWNERS = ("mflux.store", "mflux.runtime.lora")


def private_names(path: Path) -> set[str]:
    """The private names a module defines: its top-level `_x`, and its classes' `_x` methods."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def private_uses(root: Path, module: str) -> set[tuple[str, str]]:
    """Where the files of the package at `root` (mflux/) other than `module`'s own use its private names:
    imported from it (inside functions too), or read as an attribute of anything but self and cls
    (`store._QUANT_NAME`, `Store()._unknown`)."""
    own = root.joinpath(*module.split(".")[1:]).with_suffix(".py")
    private = private_names(own)
    out = set()
    for path in sorted(root.rglob("*.py")):
        if path == own:
            continue
        pkg = ".".join(["mflux", *path.relative_to(root).parent.parts])
        where = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and absolute(node, pkg) == module:
                out |= {(where, a.name) for a in node.names if a.name in private}
            elif isinstance(node, ast.Attribute) and node.attr in private:
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    out.add((where, node.attr))
    return out


@pytest.mark.parametrize("module", PRIVATE_OWNERS)
def test_no_module_uses_another_ones_internals(module):
    # One model-name resolver (Store.resolve) and one set of LoRA layer helpers: their callers use the
    # public names, so no second copy grows from the private ones.
    assert private_uses(PACKAGE, module) == set()


def test_the_internals_check_finds_a_private_use(tmp_path):
    root = tmp_path / "mflux"
    (root / "server").mkdir(parents=True)
    (root / "store.py").write_text(
        'import re\n_QUANT_NAME = re.compile("q")\n\n\nclass Store:\n    def _unknown(self):\n'
        "        return self._unknown\n\n    def resolve(self):\n        return _QUANT_NAME\n"
    )
    (root / "run.py").write_text("def f():\n    from mflux.store import Store, _QUANT_NAME\n")
    (root / "server" / "core.py").write_text("from .. import store\n\nm = store._QUANT_NAME.match\n")
    (root / "server" / "serve.py").write_text("from ..store import Store\n\nStore()._unknown()\n")
    (root / "ok.py").write_text(
        "from mflux.store import Store\n\n\nclass A:\n    def _unknown(self):\n        return self._unknown\n"
    )
    assert private_names(root / "store.py") == {"_QUANT_NAME", "_unknown"}
    assert private_uses(root, "mflux.store") == {
        ("run.py", "_QUANT_NAME"),
        ("server/core.py", "_QUANT_NAME"),
        ("server/serve.py", "_unknown"),
    }
