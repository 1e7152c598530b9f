"""What a process imports on its way to an image: never PyTorch or transformers, and nothing that prints
transformers' "PyTorch was not found" warning on a machine without PyTorch."""

import json
import subprocess
import sys

import pytest

# Text-to-image and img2img through the `mflux` command's own entry, then the server's worker path (the
# one adapter over Flux1 every worker runs) and the server's app, all in this one process.
GENERATE = """
import json, sys
folder, out = sys.argv[1], sys.argv[2]
if sys.argv[3] == "hide-torch":
    sys.modules["torch"] = None  # import torch fails, importlib.util.find_spec("torch") is None
from mflux.__main__ import main

common = ["--path", folder, "--prompt", "a cat", "--steps", "2", "--height", "64", "--width", "64", "--seed", "1"]
for extra in (["-o", out + "/t2i.png"], ["-o", out + "/i2i.png", "--image", out + "/t2i.png", "--strength", "0.5"]):
    sys.argv = ["mflux", "run", *common, *extra]
    try:
        main()
    except SystemExit as e:
        assert e.code == 0, e.code

import mflux.server.app
from mflux.flux1 import Flux1
from mflux.server.worker import JobParams, Models, execute

events = []
job = JobParams(prompt="a dog", seeds=[2], model="tiny", width=64, height=64, steps=2)
execute(Models(loader=lambda name, loras: Flux1.from_path(folder)), job, events.append, lambda: False)
assert type(events[-1]).__name__ == "Result", events
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("torch", "transformers"))
print(json.dumps(loaded))
"""


def _generate(folder, out, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", GENERATE, str(folder), str(out), mode],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("mode", ["torch-installed", "hide-torch"])
def test_making_an_image_imports_neither_torch_nor_transformers(tiny_schnell, tmp_path, mode):
    done = _generate(tiny_schnell, tmp_path, mode)
    assert done.returncode == 0, done.stderr[-3000:]
    # transformers says this on import wherever PyTorch is missing; it reads as a failure
    assert "PyTorch was not found" not in done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
    assert (tmp_path / "t2i.png").is_file() and (tmp_path / "i2i.png").is_file()
    assert "Traceback" not in done.stderr
