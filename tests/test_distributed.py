"""Data and sequence parallelism with real ring-backend processes on localhost, started by mlx.launch.

Each test reads what the ranks wrote (files, output lines), never mlx.launch's exit code: when a rank
fails, mlx.launch stops the others and may still exit 0. Every launch runs in its own process group
with a deadline, and the test checks that no rank is left behind.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mflux import Config, Flux1
from mflux.metadata import read_png_metadata
from mflux.runtime.parallel import shard_rows

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Luxury food photograph"
TINY = ["--height", "32", "--width", "32", "--steps", "2"]
LAUNCH = "from mlx._distributed_utils.launch import main; main()"  # the `mlx.launch` script's body


def launch(ranks: int, command: list[str], timeout: float = 150) -> tuple[str, str]:
    """(stdout, stderr) of `mlx.launch -n ranks --backend ring -- command`, run from the repo root."""
    cmd = [sys.executable, "-c", LAUNCH, "-n", str(ranks), "--backend", "ring"]
    cmd += ["--starting-port", str(_free_port()), "--", sys.executable, *command]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mlx.launch ran past {timeout}s:\n{out}\n{err}")
    # the ranks run in the launcher's process group: none may outlive it
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a rank outlived mlx.launch")
    except ProcessLookupError:
        pass
    return out, err


def _free_port() -> int:
    # the ring backend listens on this port and the next ones, one per rank
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path)).astype(int)


def one_process(folder: Path, seeds: list[int], prompt: str = PROMPT) -> list[np.ndarray]:
    flux = Flux1.from_path(folder, precision="float32")
    images = flux.generate_images(seeds, prompt, Config(num_inference_steps=2, height=32, width=32))
    return [np.array(i.image).astype(int) for i in images]


@pytest.mark.parametrize("count,size", [(1, 2), (3, 2), (7, 3), (2, 3)])
def test_shard_rows_give_each_image_to_exactly_one_rank(count, size):
    rows = [shard_rows(count, r, size) for r in range(size)]
    assert sorted(i for r in rows for i in r) == list(range(count))
    assert max(map(len, rows)) - min(map(len, rows)) <= 1


@pytest.mark.parametrize("ranks", [2, 3])
def test_sequence_parallel_transformer_equals_one_process(ranks, tmp_path):
    out, err = launch(ranks, ["-m", "tests.distributed_worker", "transformer", str(tmp_path)], timeout=90)
    files = [tmp_path / f"rank{r}.json" for r in range(ranks)]
    assert all(f.exists() for f in files), out + err
    results = [json.loads(f.read_text()) for f in files]
    # 7 text and 10 image tokens sharded: ceil(7/N) and ceil(10/N) rows per rank, padding included
    s, l = -(-7 // ranks), -(-10 // ranks)
    # per step, float32, 2 images: each of the 4 blocks passes this rank's k and v (s + l rows of 64),
    # then its velocity rows (l of 64) are gathered once
    per_step = 4 * 2 * (4 * (s + l) * 2 * 64 + l * 64)
    for r, result in enumerate(results):
        assert (result["rank"], result["size"]) == (r, ranks)
        assert result["max_abs_diff"] <= 1e-5, result
        assert result["step_bytes"] == per_step
        assert result["sent_bytes"] == result["steps"] * per_step == 2 * per_step
        # the facts docs/PERFORMANCE.md records for MLX 0.32's ring backend
        ops = result["collectives"]
        assert ops["all_sum"] is ops["all_gather"] is ops["all_max"] is True, ops
        assert "sum_scatter not supported" in ops["sum_scatter"], ops
        assert result["agreed"] == [2**64 - 1, 12345678901234567890, 0]  # rank 0's values, 64 bits whole


def test_averaged_gradients_over_two_ranks_train_as_one_process(tmp_path):
    out, err = launch(2, ["-m", "tests.distributed_worker", "training", str(tmp_path)], timeout=90)
    files = [tmp_path / f"rank{r}.json" for r in range(2)]
    assert all(f.exists() for f in files), out + err
    for f in files:
        assert json.loads(f.read_text())["max_abs_diff"] <= 1e-6, f.read_text()


def test_sequence_parallel_image_equals_one_process(tiny_schnell, tmp_path):
    # -n 1: a random seed, which the ranks must agree on, or the shards would not fit together
    out, err = launch(
        2,
        ["-m", "mflux", "run", "--path", str(tiny_schnell), "--prompt", PROMPT, *TINY, "-n", "1"]
        + ["--parallel", "sequence", "--output", str(tmp_path / "image.png")],
    )
    both = out + err  # where a line goes (stdout or stderr) is the run command's business
    assert re.findall(r"wrote (\S+\.png)", both) == [str(tmp_path / "image.png")], both  # rank 1 only helps
    assert "1 of 1 images written, each image over 2 ranks" in both, both
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]
    seed = json.loads(read_png_metadata(tmp_path / "image.png")["mflux"])["seed"]
    (alone,) = one_process(tiny_schnell, [seed])
    assert np.abs(pixels(tmp_path / "image.png") - alone).max() <= 1


def test_data_parallel_prompt_file_makes_each_image_once_as_one_process_would(tiny_schnell, tmp_path):
    # three ranks, four images (two lines, two seeds each): ranks 1 and 2 make one each, rank 0 two
    prompts = ["a red cube", "a blue sphere"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "out").mkdir()
    out, err = launch(
        3,
        ["-m", "mflux", "run", "--path", str(tiny_schnell), "--prompt-file", str(tmp_path / "prompts.txt")]
        + [*TINY, "--seed", "1", "2", "--output", str(tmp_path / "out" / "image.png")],
    )
    names = [f"image_line{line}_seed_{seed}.png" for line in (1, 2) for seed in (1, 2)]
    both = out + err
    wrote = sorted(Path(p).name for p in re.findall(r"wrote (\S+\.png)", both))
    assert wrote == sorted(names), both  # none twice, none skipped
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)
    assert both.count("images written") == 1 and "4 of 4 images written, the images over 3 ranks" in both
    for line, prompt in enumerate(prompts, 1):
        for seed, alone in zip((1, 2), one_process(tiny_schnell, [1, 2], prompt)):
            name = f"image_line{line}_seed_{seed}.png"
            assert np.array_equal(pixels(tmp_path / "out" / name), alone), name


def test_under_several_ranks_a_missing_model_is_not_pulled(tmp_path):
    from mflux.errors import MfluxError
    from mflux.run import resolve_model

    with pytest.raises(MfluxError, match=r"pull it on every host first \(mflux pull schnell\)"):
        resolve_model("schnell", None, None, pull=True, ranks=2)


def test_a_rank_stopped_by_sigterm_says_which_images_it_still_owed(tiny_schnell, tmp_path):
    seeds = [1, 2, 3, 4, 5, 6]
    out, err = launch(
        2,
        ["-m", "tests.distributed_worker", "sigterm", str(tmp_path), "--path", str(tiny_schnell)]
        + ["--prompt", PROMPT, *TINY, "--seed", *map(str, seeds), "--output", str(tmp_path / "image.png")],
    )
    owed = {}
    for rank, names in re.findall(r"rank (\d): stopped by SIGTERM; not written: (.*)$", err, re.M):
        owed[int(rank)] = [] if names == "none" else [Path(n).name for n in names.split(", ")]
    # rank 1 (seeds 2, 4, 6) is stopped right after writing seed 2's image
    assert owed[1] == ["image_seed_4.png", "image_seed_6.png"], err
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "image_seed_2.png" in written
    # rank 0 was either stopped too, listing what it had left, or finished and then heard rank 1 was gone
    assert 0 in owed or "another rank stopped before the end" in err, err
    missing = [n for r in owed.values() for n in r]
    assert sorted(written + missing) == sorted(f"image_seed_{s}.png" for s in seeds), (written, missing)
