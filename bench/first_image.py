"""Time to the first image as a user types it: whole processes timed from outside, spawn to exit.

Each case is one command a user types, run after a warm-up several times, interleaved with diffusers'
equivalent script (import torch and diffusers, from_pretrained, one image, save) in the same run on the
same machine; each prints the median and the spread (min-max) of the wall clock. mflux runs with
MFLUX_TRACE=1, so the table also gives the median second at which it read its first weight and had the
prompts encoded.

Cases, in the order they run (the disk holds one full-size model, 34 GB, at a time: each model is
written, measured and deleted in turn):
  hf-bf16   `mflux run -m random` on a random schnell in the Hugging Face layout (bf16), warm caches
  fresh     the same with empty kernel caches before each run: MLX_PTX_CACHE_DIR (which is mflux's
            kernel cache too) and CUDA's compute cache (CUDA_CACHE_PATH), for diffusers as well
  serve     `mflux serve -m random`: spawn to the first answer of an A1111 txt2img request
  q8, q4    `mflux run -m random-q8` / `-q4`, models stored by `mflux quantize --bits 8` / `4`
  mlx-bf16  `mflux run --path` on a random schnell written in the MLX-native layout (bf16)

Whatever the --time-limit leaves undone is printed as owed at the end. A GPU call of 10 minutes holds a
few cases: split them with --cases, and --keep the stored model from one call to the next.

    python bench/first_image.py --tiny --runs 2                  # this checkout's check, on a CPU
    python bench/first_image.py --disk /var/tmp/mflux-bench      # full size, on a GPU (bench/gpu.sh first)
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Luxury food photograph of a chocolate cake on a marble table"
CASES = ("hf-bf16", "fresh", "serve", "q8", "q4", "mlx-bf16")
RESULTS: list[dict] = []

# diffusers' equivalent of `mflux run`: the script a user writes from diffusers' FLUX.1 documentation
DIFFUSERS = """
import sys
import torch
from diffusers import FluxPipeline

folder, res, steps, out, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
pipe = FluxPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)
image = pipe(
    prompt, height=res, width=res, num_inference_steps=steps, guidance_scale=0.0, max_sequence_length=256,
    generator=torch.Generator("cpu").manual_seed(1),
).images[0]
image.save(out)
"""


def report(**kw) -> dict:
    kw = {k: round(v, 3) if isinstance(v, float) else v for k, v in kw.items()}
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)
    return kw


# ---------------------------------------------------------------- one process, timed from outside


def timed(argv: list[str], env: dict, timeout: float) -> tuple[float, str]:
    """(wall seconds from spawn to exit, stderr) of one process; raises if it failed."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        shown = " ".join("<script>" if "\n" in a else a for a in argv[:5])
        raise RuntimeError(f"{shown}... exited {done.returncode}: {done.stderr[-2000:]}")
    return wall, done.stderr


def served(argv: list[str], env: dict, port: int, res: int, steps: int, timeout: float) -> tuple[float, str]:
    """(seconds from spawning the server to its first answer to a txt2img request, the server's stderr)."""
    body = json.dumps({"prompt": PROMPT, "width": res, "height": res, "steps": steps, "seed": 1}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/sdapi/v1/txt2img", body, {"Content-Type": "application/json"}
    )
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty server never blocks on it
        start = time.perf_counter()
        server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            wall = _first_answer(server, request, start, timeout)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.seek(0)
            stderr = log.read()
        if wall is None:
            raise RuntimeError(f"mflux serve ended or timed out before answering: {stderr[-2000:]}")
        return wall, stderr


def _first_answer(server, request, start: float, timeout: float) -> float | None:
    while server.poll() is None and time.perf_counter() - start < timeout:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                answer.read()
            return time.perf_counter() - start
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"mflux serve answered {e.code}: {e.read()[:500]}") from None
        except (ConnectionError, urllib.error.URLError):
            time.sleep(0.02)  # not listening yet
    return None


def marks(stderr: str) -> dict[str, float]:
    """MFLUX_TRACE's phases: {phase: seconds since the process started}."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("mflux trace: "):
            seconds, phase = line.removeprefix("mflux trace: ").split(" ", 1)
            out[phase] = float(seconds.rstrip("s"))
    return out


def measure(case: str, commands: dict, args, budget) -> None:
    """Each of `commands` ({impl: (run, prepare)}) once to warm up, then args.runs times, interleaved;
    one result line per impl: median, min, max, and MFLUX_TRACE's medians."""
    walls: dict[str, list[float]] = {impl: [] for impl in commands}
    traced: dict[str, list[dict]] = {impl: [] for impl in commands}
    for i in range(args.warmup + args.runs):
        for impl, (run, prepare) in commands.items():
            budget.check(case)
            prepare()
            wall, stderr = run()
            if i >= args.warmup:
                walls[impl].append(wall)
                traced[impl].append(marks(stderr))
    for impl, w in walls.items():
        phases = {}
        for phase in ("first weight read", "prompts encoded", "first step"):
            seen = [m[phase] for m in traced[impl] if phase in m]
            if seen:
                phases[phase.replace(" ", "_") + "_s"] = statistics.median(seen)
        report(
            case=case,
            impl=impl,
            median_s=statistics.median(w),
            min_s=min(w),
            max_s=max(w),
            runs=len(w),
            **phases,
        )


class OutOfTime(Exception):
    pass


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def check(self, case: str) -> None:
        if time.monotonic() > self.end:
            raise OutOfTime(case)


# ---------------------------------------------------------------- the models


def write_hf(disk: Path, args, env: dict) -> Path:
    """A random schnell in the Hugging Face layout (bench/peer.py's), moved into the store as `random`."""
    folder = disk / "hf-bf16"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    size = "tiny" if args.tiny else "full"
    subprocess.run(
        [sys.executable, str(ROOT / "bench/peer.py"), "write", "--folder", str(folder), "--size", size],
        env=env,
        check=True,
    )
    subprocess.run([sys.executable, "-c", STORE, str(folder), "random"], env=env, check=True)
    report(case="write", what="hf-bf16 written and stored", s=time.perf_counter() - start)
    return Path(env["MFLUX_HOME"]) / "random"


# Moves (never copies: the disk holds one model) a diffusers folder into the store as format `hf`.
STORE = """
import shutil, sys
from pathlib import Path
from mflux.manifest import new_manifest, write_manifest
from mflux.store import Store

folder, name = Path(sys.argv[1]), sys.argv[2]
with Store().build(name, force=True) as tmp:
    for entry in folder.iterdir():
        shutil.move(str(entry), tmp / entry.name)
    write_manifest(tmp, new_manifest(tmp, name=name, format="hf", dtype="bfloat16", source={"kind": "path", "path": str(folder)}))
folder.rmdir()
"""


def write_native(folder: Path, tiny: bool) -> None:
    """A random schnell in the MLX-native layout (bf16), as bench/load.py writes it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import common
    import mlx.core as mx

    common.write_native(folder, common.SIZES["tiny" if tiny else "full"], mx.bfloat16, None)


def mflux(*argv: str) -> list[str]:
    return [sys.executable, "-m", "mflux", *argv]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the cases


def run_cases(args, disk: Path, budget: Budget) -> None:
    env = {**os.environ, "MFLUX_HOME": str(disk / "home"), "MFLUX_TRACE": "1", "HF_HUB_OFFLINE": "1"}
    out = disk / "images"
    out.mkdir(parents=True, exist_ok=True)
    image = [
        "--prompt",
        PROMPT,
        "--steps",
        str(args.steps),
        "--height",
        str(args.res),
        "--width",
        str(args.res),
    ]
    image += ["--seed", "1", "-o", str(out / "mflux.png")]
    limit = args.process_timeout
    nothing = lambda: None  # noqa: E731 - a case with nothing to empty before a run

    def fresh_caches():
        for name in ("ptx", "cuda"):
            shutil.rmtree(disk / "fresh" / name, ignore_errors=True)
            (disk / "fresh" / name).mkdir(parents=True)

    def run(argv, environ=env):
        return lambda: timed(argv, environ, limit)

    def diffusers(folder: Path, environ=env):
        argv = [
            sys.executable,
            "-c",
            DIFFUSERS,
            str(folder),
            str(args.res),
            str(args.steps),
            str(out / "d.png"),
            PROMPT,
        ]
        return run(argv, environ), nothing

    todo = [c for c in CASES if c in args.cases]
    needs_hf = {"hf-bf16", "fresh", "serve", "q8", "q4"} & set(todo)
    hf = None
    try:
        stored = Path(env["MFLUX_HOME"]) / "random"
        if needs_hf and (stored / "manifest.toml").is_file():  # a previous --keep run's
            hf = stored
            report(case="write", what="hf-bf16 kept from an earlier run", s=0.0)
        elif needs_hf:
            budget.check("hf-bf16")
            hf = write_hf(disk, args, env)
        with_diffusers = {} if args.no_diffusers else {"diffusers": diffusers(hf)} if hf else {}
        if "hf-bf16" in todo:
            measure(
                "hf-bf16",
                {"mflux": (run(mflux("run", "-m", "random", *image)), nothing), **with_diffusers},
                args,
                budget,
            )
            todo.remove("hf-bf16")
        if "fresh" in todo:
            cold = {
                **env,
                "MLX_PTX_CACHE_DIR": str(disk / "fresh/ptx"),
                "CUDA_CACHE_PATH": str(disk / "fresh/cuda"),
            }
            commands = {"mflux": (run(mflux("run", "-m", "random", *image), cold), fresh_caches)}
            if with_diffusers:
                commands["diffusers"] = (diffusers(hf, cold)[0], fresh_caches)
            measure("fresh", commands, args, budget)
            todo.remove("fresh")
        if "serve" in todo:
            port = free_port()
            argv = mflux("serve", "-m", "random", "--port", str(port))
            first = lambda: served(argv, env, port, args.res, args.steps, limit)  # noqa: E731
            measure("serve", {"mflux": (first, nothing), **with_diffusers}, args, budget)
            todo.remove("serve")
        for q in ("q8", "q4"):
            if q in todo:
                budget.check(q)
                start = time.perf_counter()
                subprocess.run(
                    mflux("quantize", "random", "--bits", q[1:]), env=env, check=True, capture_output=True
                )
                report(case="write", what=f"{q} stored by mflux quantize", s=time.perf_counter() - start)
                measure(q, {"mflux": (run(mflux("run", "-m", f"random-{q}", *image)), nothing)}, args, budget)
                subprocess.run(mflux("rm", f"random-{q}", "--yes"), env=env, check=True, capture_output=True)
                todo.remove(q)
        if hf and not (args.keep and "mlx-bf16" not in todo):
            subprocess.run(mflux("rm", "random", "--yes"), env=env, check=True, capture_output=True)
            hf = None
        if "mlx-bf16" in todo:
            budget.check("mlx-bf16")
            native = disk / "mlx-bf16"
            shutil.rmtree(native, ignore_errors=True)
            start = time.perf_counter()
            write = [sys.executable, __file__, "--write-native", str(native)] + (
                ["--tiny"] if args.tiny else []
            )
            subprocess.run(write, env=env, check=True)
            report(case="write", what="mlx-bf16 written", s=time.perf_counter() - start)
            measure(
                "mlx-bf16",
                {"mflux": (run(mflux("run", "--path", str(native), *image)), nothing)},
                args,
                budget,
            )
            shutil.rmtree(native, ignore_errors=True)
            todo.remove("mlx-bf16")
    except OutOfTime as e:
        report(case=str(e), what="out of time", owed=todo)
    finally:
        if hf and not args.keep:
            subprocess.run(mflux("rm", "random", "--yes"), env=env, capture_output=True)
        shutil.rmtree(disk / "mlx-bf16", ignore_errors=True)
    print(table(todo, args))


def table(owed: list[str], args) -> str:
    rows = [r for r in RESULTS if "median_s" in r]
    base = {r["impl"]: r["median_s"] for r in rows if r["case"] == "hf-bf16"}
    lines = [
        f"whole process, one {args.steps}-step {args.res}² image ({'tiny' if args.tiny else 'full-size'} random schnell)",
        "| case | impl | median s | min-max s | runs | first weight read s | prompts encoded s | vs diffusers hf-bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        against = f"{r['median_s'] / base['diffusers']:.2f}x" if "diffusers" in base else ""
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | {r['runs']} "
            f"| {r.get('first_weight_read_s', '')} | {r.get('prompts_encoded_s', '')} | {against} |"
        )
    lines.append(f"owed (not measured): {', '.join(owed)}" if owed else "owed: nothing")
    return "\n".join(lines)


def main(argv=None) -> None:
    first, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(
        description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tiny", action="store_true", help="tests/fixtures.py's tiny schnell (a CPU check), 64² images"
    )
    p.add_argument(
        "--disk", default="/var/tmp/mflux-bench", help="where models are written (default: %(default)s)"
    )
    p.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)} (default: all)"
    )
    p.add_argument("--runs", type=int, default=3, help="timed runs of each command (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--res", type=int, help="image side (default: 1024, or 64 with --tiny)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default: 4)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the stored Hugging Face model for the next call (unless mlx-bf16 runs: the disk holds one)",
    )
    p.add_argument("--no-diffusers", action="store_true", help="mflux alone (no diffusers beside it)")
    p.add_argument("--time-limit", type=float, default=3000, help="seconds for everything (default: 3000)")
    p.add_argument("--process-timeout", type=float, default=600, help="seconds one process may take")
    p.add_argument("--write-native", metavar="FOLDER", help=argparse.SUPPRESS)  # the child that writes it
    args = p.parse_args(argv)
    if args.write_native:
        write_native(Path(args.write_native), args.tiny)
        return
    args.res = args.res or (64 if args.tiny else 1024)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown {', '.join(unknown)} (choose from {', '.join(CASES)})")
    disk = Path(args.disk) / ("first-image-tiny" if args.tiny else "first-image")
    disk.mkdir(parents=True, exist_ok=True)
    run_cases(args, disk, Budget(args.time_limit))


if __name__ == "__main__":
    main()
