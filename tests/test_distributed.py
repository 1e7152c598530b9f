"""Data and sequence parallelism with real ring-backend processes on localhost, started by mlx.launch:
`mflux run` (images split over the ranks, or each image over them) and `mflux train` (each batch split
over the ranks, the gradients averaged).

Each test reads what the ranks wrote (files, output lines), never mlx.launch's exit code: when a rank
fails, mlx.launch stops the others and may still exit 0. Every launch runs in its own process group
with a deadline, and the test checks that no rank is left behind.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mflux import Config, Flux1
from mflux.metadata import read_png_metadata
from mflux.runtime.parallel import shard_rows
from mflux.train import train
from tests.fixtures import write_dataset

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Luxury food photograph"
TINY = ["--height", "32", "--width", "32", "--steps", "2"]
LAUNCH = "from mlx._distributed_utils.launch import main; main()"  # the `mlx.launch` script's body


def launch(ranks: int, command: list[str], timeout: float = 150) -> tuple[str, str]:
    """(stdout, stderr) of `mlx.launch -n ranks --backend ring -- command`, run from the repo root."""
    cmd = [sys.executable, "-c", LAUNCH, "-n", str(ranks), "--backend", "ring"]
    cmd += ["--starting-port", str(_free_ports(ranks)), "--", sys.executable, *command]
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


def _free_ports(ranks: int) -> int:
    """The first of `ranks` consecutive free ports: the ring backend listens on one per rank. They are
    drawn below the ephemeral ranges (Linux 32768 up, macOS 49152 up), where the ranks' own outgoing
    connections take ports, so none is taken between this check and the launch."""
    rng = random.Random()
    for _ in range(100):
        start = rng.randrange(20000, 32000 - ranks)
        if all(_bindable(port) for port in range(start, start + ranks)):
            return start
    pytest.fail("no free ports for the ring backend in 20000..32000")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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


# --- data-parallel training: `mlx.launch -n 2 -- mflux train` against one process ---

# A global batch of 2 (one row per rank), 4 steps over the 5 images (the order crosses an epoch).
TRAIN = dict(steps=4, batch_size=2, rank=4, lr=1e-3, resolution=32, max_sequence_length=16, seed=3)
TRAIN |= dict(precision="float32", checkpoint_every=0)
# float32 rounding: the ranks average two one-row means where one process takes one two-row mean, and
# the matmuls see one row instead of two (measured: see test_two_ranks_train_the_lora_one_process_does)
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def alone(tiny_schnell, tmp_path_factory):
    """The data, and one process's run of TRAIN on it (in this process: no launcher, one rank)."""
    root = tmp_path_factory.mktemp("alone")
    data = write_dataset(root / "data")
    return data, train(str(tiny_schnell), str(data), str(root / "lora.safetensors"), **TRAIN)


def train_args(model: Path, data: Path, output: Path, **options) -> list[str]:
    """`mflux train`'s arguments for these TrainConfig options."""
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(output)]
    return args + [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]


def lora_difference(got: Path, want: Path) -> float:
    """The largest |got - want| over two LoRA files' tensors, each within RTOL/ATOL."""
    a, b = mx.load(str(got)), mx.load(str(want))
    assert a.keys() == b.keys()
    # the LoRA has moved well past the tolerance (PEFT starts B at zero), so agreeing means something
    assert max(np.abs(np.array(v)).max() for k, v in b.items() if "lora_B" in k) > 100 * ATOL
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=RTOL, atol=ATOL, err_msg=k)
    return max(float(np.abs(np.array(a[k]) - np.array(b[k])).max()) for k in a)


def rows(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "loss.jsonl").read_text().splitlines()]


def assert_same_log(work: Path, alone_work: Path) -> None:
    got, want = rows(work), rows(alone_work)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=RTOL)


def test_two_ranks_train_the_lora_one_process_does(tiny_schnell, alone, tmp_path):
    data, one = alone
    out = tmp_path / "lora.safetensors"
    stdout, stderr = launch(2, ["-m", "mflux", *train_args(tiny_schnell, data, out, **TRAIN)])
    both = stdout + stderr
    # rank 0 alone prints and writes; rank 1 says nothing
    assert re.findall(r"^wrote .*$", both, re.M) == [
        f"wrote {out} (step 4; work folder {tmp_path / 'lora.train'}; each batch over 2 ranks)"
    ], both
    assert "error" not in both and "Traceback" not in both, both
    work = tmp_path / "lora.train"
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == [
        "lora.safetensors",
        "lora.train",
        "lora.train/cache.safetensors",
        "lora.train/checkpoints",
        "lora.train/checkpoints/step-000004.safetensors",
        "lora.train/loss.jsonl",
        "lora.train/loss.png",
    ]
    diff = lora_difference(out, one.output)
    biggest = max(np.abs(np.array(v)).max() for k, v in mx.load(str(one.output)).items() if "lora_B" in k)
    print(f"2 ranks against 1 process, 4 steps: max |LoRA difference| {diff:.2e} (max |B| {biggest:.2e})")
    assert_same_log(work, one.work_dir)


def test_ctrl_c_on_one_rank_stops_both_and_resume_continues_exactly(tiny_schnell, alone, tmp_path):
    data, one = alone
    out, work = tmp_path / "lora.safetensors", tmp_path / "lora.train"
    args = train_args(tiny_schnell, data, out, **TRAIN)
    # rank 1 alone gets SIGINT after step 2: both stop there, and rank 0 saves the checkpoint
    _, stderr = launch(2, ["-m", "tests.distributed_worker", "ctrl-c", str(tmp_path), *args[1:]])
    saved = work / "checkpoints" / "step-000002.safetensors"
    assert re.findall(r"interrupted at step (\d+): saved (\S+)", stderr) == [("2", str(saved))], stderr
    assert "another rank stopped" not in stderr and "Traceback" not in stderr, stderr
    assert not out.exists() and sorted((work / "checkpoints").iterdir()) == [saved]
    # two ranks resume: rank 0 reads the checkpoint and the cache and shares them with rank 1
    stdout, stderr = launch(2, ["-m", "mflux", *args, "--resume", str(work)])
    assert f"wrote {out} (step 4;" in stdout, stdout + stderr
    diff = lora_difference(out, one.output)
    print(f"2 ranks, interrupted at step 2 and resumed, against 1 process: max |LoRA difference| {diff:.2e}")
    assert_same_log(work, one.work_dir)
    # the checkpoint is the same whatever the ranks: one process continues it as well
    resumed = train(
        str(tiny_schnell), str(data), str(tmp_path / "alone.safetensors"), resume=str(saved), **TRAIN
    )
    assert resumed.losses == pytest.approx([r["loss"] for r in rows(one.work_dir)][2:], rel=RTOL)
    diff = lora_difference(resumed.output, one.output)
    print(
        f"2 ranks interrupted at step 2, 1 process resumed, against 1 process: max |LoRA difference| {diff:.2e}"
    )


# mlx.launch's own "[WARN] Node with rank R exited with code C" lines, coloured, and written by the
# ranks' watchers at once, so two can share a row ("[WARN][WARN]  Node with rank 1 ...Node with rank 0 ...")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LAUNCHER_ROW = re.compile(r"(\s*(\[WARN\]|Node with rank \d+ exited with code -?\d+))*\s*")


def _without_launcher_lines(text: str) -> list[str]:
    """The rows of `text` that are not mlx.launch's exit notices (nor what is left blank between them)."""
    return [row for row in text.splitlines() if not _LAUNCHER_ROW.fullmatch(_ANSI.sub("", row))]


@pytest.mark.parametrize(
    "flags,line",
    [
        # checked by both ranks alike: rank 0 says it, rank 1 exits without a line
        (
            ["--batch-size=3"],
            "error: --batch-size 3 does not divide among the 2 ranks of mlx.launch (each rank takes an "
            "equal share of every batch; use a multiple of 2)",
        ),
        # the data, checked by rank 0 alone: rank 1 hears that it refused
        (
            ["--batch-size=2", "--data=/nonexistent/data"],
            "error: /nonexistent/data: no such data folder (give a folder of images with .txt captions)",
        ),
    ],
)
def test_a_refusal_under_two_ranks_is_one_line(tiny_schnell, tmp_path, flags, line):
    data = write_dataset(tmp_path / "data")
    args = train_args(tiny_schnell, data, tmp_path / "lora.safetensors", steps=1) + flags
    stdout, stderr = launch(2, ["-m", "mflux", *args])
    ours = _without_launcher_lines(stdout + stderr)
    assert ours == [line], stdout + stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing encoded or written


def test_when_rank_0_fails_rank_1_says_so_in_one_line(tiny_schnell, tmp_path):
    # rank 0 fails as it encodes, while rank 1 waits for the encodings
    data = write_dataset(tmp_path / "data")
    args = train_args(tiny_schnell, data, tmp_path / "lora.safetensors", batch_size=2, resolution=32)
    stdout, stderr = launch(2, ["-m", "tests.distributed_worker", "encode-fails", str(tmp_path), *args[1:]])
    both = stdout + stderr
    assert "error: the disk is full (the test's)" in both and "Traceback" not in both, both
    # rank 1 either noticed (the "[ring] ..." lines before it are MLX's own) or mlx.launch stopped it first
    noticed = "error: rank 1: another rank stopped before the end ([ring] connection to a peer was lost)"
    assert noticed in both or "Node with rank 1 exited with code -15" in both, both
    assert not list(tmp_path.rglob("*.safetensors"))
