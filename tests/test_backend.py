"""Without an MLX backend (plain `pip install mlx` on Linux), mflux says how to add one."""

import subprocess
import sys


def _without_backend(tmp_path, code: str) -> subprocess.CompletedProcess:
    # A stand-in `mlx` package whose compiled core fails to load, as it does with no backend installed.
    fake = tmp_path / "fake" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text(
        "raise ImportError('libmlx.so: cannot open shared object file: No such file or directory', name='mlx.core')\n"
    )
    env = {"PYTHONPATH": str(fake.parent), "MFLUX_HOME": str(tmp_path / "home"), "PATH": ""}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_api_raises_the_hint(tmp_path):
    proc = _without_backend(
        tmp_path,
        "from mflux.errors import MfluxError\n"
        "try:\n    from mflux import Flux1\nexcept MfluxError as e:\n    print(e)\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'mlx[cpu]'" in proc.stdout


def test_cli_prints_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    proc = _without_backend(
        tmp_path, "from mflux.cli import cli; cli.main(['run', '--path', 'm', '--prompt', 'a cat'])"
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "pip install 'mlx[cpu]'" in proc.stderr, proc.stderr
