"""mflux against the peer (PyPI `mflux==0.24.0`, the other MLX port) and diffusers, on one random checkpoint.

The checkpoint has the real Hugging Face diffusers layout of FLUX.1-schnell (the same folders, file
names, key names and configs, CLIP keys with their `text_model.` prefix) and random bf16 weights;
its tokenizers are small real ones from tests/fixtures.py, whose ids all fall inside the real
embedding tables (CLIP 49408 rows, T5 32128). Each run is one subprocess, so its peak memory is its
own: load, a first image (which compiles kernels), a second image, and a one-step image. Prompts are
cached by both MLX ports, so the step time is (second run - one-step run) / 3.

Both projects are imported as `mflux`: install the peer into its own folder and point --peer at it.

    pip install --no-deps --target /tmp/peer mflux==0.24.0 piexif platformdirs toml
    python bench/peer.py all --folder /tmp/flux-random --peer /tmp/peer     # writes, runs, deletes
    python bench/peer.py write --folder /tmp/flux-random                   # the checkpoint alone
    python bench/peer.py run --impl ours --folder /tmp/flux-random --quant 8
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Luxury food photograph of a chocolate cake on a marble table"
RESULTS: list[dict] = []

# diffusers' FLUX.1-schnell configs; `shallow` keeps the real widths with one block of each kind
# (a CPU-sized smoke test of the whole path), `full` is the real model.
DEPTHS = {"full": (19, 38, 24), "shallow": (1, 1, 1)}


def report(**kw) -> None:
    kw = {k: round(v, 4) if isinstance(v, float) else v for k, v in kw.items()}
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


# ---------------------------------------------------------------- the checkpoint


def write_checkpoint(folder: Path, size: str) -> None:
    """A random FLUX.1-schnell checkpoint in the real diffusers layout (bf16), on the GPU if there is one."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import fixtures

    if size == "tiny":
        fixtures.build_tiny_pipeline(folder, "schnell")
        return
    folder.mkdir(parents=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, fixtures._quiet():
        fixtures._write_clip_tokenizer(folder / "tokenizer")
        fixtures._write_t5_tokenizer(folder / "tokenizer_2", Path(tmp))
        for component, build, shard in _components(size):
            with torch.device(device):
                module = build().to(torch.bfloat16).eval()
            module.save_pretrained(folder / component, max_shard_size=shard, safe_serialization=True)
            del module
            if device == "cuda":
                torch.cuda.empty_cache()
    _prefix_clip_keys(folder / "text_encoder")
    _write_index(folder)


def _components(size: str):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    double, single, t5_layers = DEPTHS[size]
    clip = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=0,
        eos_token_id=2,  # the real config's legacy ids: pooling at argmax(ids)
        pad_token_id=1,
    )
    t5 = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=t5_layers,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    return [
        (
            "transformer",
            lambda: FluxTransformer2DModel(
                num_layers=double, num_single_layers=single, guidance_embeds=False
            ),
            "10GB",  # three shards, as the real repo
        ),
        ("text_encoder_2", lambda: T5EncoderModel(t5), "5GB"),
        ("text_encoder", lambda: CLIPTextModel(clip), "10GB"),
        (
            "vae",
            lambda: AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=16,
                sample_size=1024,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            "10GB",
        ),
    ]


def _prefix_clip_keys(folder: Path) -> None:
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix that the real repo has
    # (written by transformers 4), and the peer reads only the prefixed names
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*.safetensors"):
        tensors = {
            k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in load_file(f).items()
        }
        save_file(tensors, f, metadata={"format": "pt"})


def _write_index(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import fixtures
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**fixtures.SCHEDULER["schnell"]).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------- one run per process


def run_ours(folder: Path, quant: int | None, res: int, dtype: str | None) -> None:
    import mlx.core as mx

    import mflux
    from mflux.flux1 import Config, Flux1

    t = time.perf_counter()
    flux = Flux1.from_path(folder, precision=dtype, quantize=quant)
    # Flux1 loads on first use; load all four now, as diffusers does (the peer reads lazily)
    flux.load()
    for c in ("text_encoder", "text_encoder_2"):
        flux.get(c)
    load = time.perf_counter() - t
    runs = _images(
        lambda steps: flux.generate_image(1, PROMPT, Config(num_inference_steps=steps, height=res, width=res))
    )
    step = _transformer_step(flux, res)
    report(
        what="run",
        impl="ours",
        version=mflux.__version__,
        quant=quant or flux.precision,
        res=res,
        load_s=load,
        **runs,
        transformer_step_s=step,
        peak_gb=mx.get_peak_memory() / 1e9,
    )


def _transformer_step(flux, res: int) -> float:
    # the transformer alone, on the pipeline's shapes: the anchor's figure, in this process
    import mlx.core as mx

    from mflux.runtime import sampler

    model = flux.get("transformer")
    txt_len = flux.folder.defaults["max_sequence_length"]
    img = mx.random.normal((1, (res // 16) ** 2, model.params.in_channels)).astype(model.dtype)
    txt = mx.random.normal((1, txt_len, model.params.context_in_dim)).astype(model.dtype)
    pe = model.positions(sampler.image_ids(res, res), sampler.text_ids(txt_len))
    mod = model.modulations([1.0], mx.random.normal((1, model.params.vec_in_dim)))[0]
    times = []
    for _ in range(7):
        t = time.perf_counter()
        mx.eval(model.predict(img, txt, pe, mod))
        mx.synchronize()
        times.append(time.perf_counter() - t)
    return sum(times[2:]) / len(times[2:])


def run_peer(folder: Path, quant: int | None, res: int, shallow: bool) -> None:
    import mlx.core as mx

    import mflux

    if not str(Path(mflux.__file__).resolve()).startswith(os.environ.get("PEER_HOME", "\0")):
        raise SystemExit(f"the peer must be imported from its own folder (--peer), got {mflux.__file__}")
    from mflux.models.common.config.model_config import ModelConfig
    from mflux.models.flux.variants.txt2img.flux import Flux1

    if shallow:
        _shallow_peer()
    t = time.perf_counter()
    flux = Flux1(quantize=quant, model_path=str(folder), model_config=ModelConfig.schnell())
    load = time.perf_counter() - t
    runs = _images(
        lambda steps: flux.generate_image(
            seed=1, prompt=PROMPT, num_inference_steps=steps, height=res, width=res
        )
    )
    report(
        what="run",
        impl="peer",
        version=_peer_version(),
        quant=quant or str(ModelConfig.precision).removeprefix("mlx.core."),
        res=res,
        load_s=load,
        **runs,
        peak_gb=mx.get_peak_memory() / 1e9,
    )


def _peer_version() -> str:
    from importlib.metadata import version

    try:
        return version("mflux")
    except Exception:
        return "unknown"


def _shallow_peer() -> None:
    # A smoke test on a CPU only: the peer's models are hard-wired to the real depth and bfloat16.
    import mlx.core as mx

    from mflux.models.common.config.model_config import ModelConfig
    from mflux.models.flux.model.flux_text_encoder.t5_encoder import t5_encoder
    from mflux.models.flux.model.flux_transformer.transformer import Transformer

    ModelConfig.precision = mx.float32
    Transformer.__init__.__defaults__ = (1, 1)
    init = t5_encoder.T5Encoder.__init__

    def one_block(self):
        init(self)
        self.t5_blocks = self.t5_blocks[:1]

    t5_encoder.T5Encoder.__init__ = one_block


def run_diffusers(folder: Path, res: int) -> None:
    import torch
    from diffusers import FluxPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    sync()
    load = time.perf_counter() - t

    def image(steps):
        with torch.no_grad():
            out = pipe(
                PROMPT,
                height=res,
                width=res,
                num_inference_steps=steps,
                guidance_scale=0.0,
                max_sequence_length=256,
            )
        sync()
        return out

    runs = _images(image)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    report(
        what="run",
        impl="diffusers",
        quant=str(dtype).removeprefix("torch."),
        res=res,
        load_s=load,
        **runs,
        transformer_step_s=_torch_step(pipe, res, device, dtype, sync),
        peak_gb=peak,
    )


def _torch_step(pipe, res: int, device: str, dtype, sync) -> float:
    # as the anchor times it: the transformer alone, eager, mean of 5 after 2
    import torch

    tr = pipe.transformer
    c = tr.config
    n = (res // 16) ** 2
    args = dict(
        hidden_states=torch.randn(1, n, c.in_channels, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, 256, c.joint_attention_dim, device=device, dtype=dtype),
        pooled_projections=torch.randn(1, c.pooled_projection_dim, device=device, dtype=dtype),
        timestep=torch.tensor([1.0], device=device, dtype=dtype),
        img_ids=torch.zeros(n, 3, device=device),
        txt_ids=torch.zeros(256, 3, device=device),
        guidance=None,
        return_dict=False,
    )
    with torch.no_grad():
        for _ in range(2):
            tr(**args)
        sync()
        t = time.perf_counter()
        for _ in range(5):
            tr(**args)
        sync()
    return (time.perf_counter() - t) / 5


def _images(generate) -> dict:
    """First image (4 steps), second image (4 steps), one-step image; the step from the difference."""
    t = time.perf_counter()
    generate(4)
    first = time.perf_counter() - t
    t = time.perf_counter()
    generate(4)
    second = time.perf_counter() - t
    t = time.perf_counter()
    generate(1)
    one = time.perf_counter() - t
    return {"first_run_s": first, "second_run_s": second, "one_step_run_s": one, "step_s": (second - one) / 3}


# ---------------------------------------------------------------- orchestration


def run_all(args) -> None:
    folder = Path(args.folder)
    end = time.monotonic() + args.time_limit
    if not folder.exists():
        t = time.perf_counter()
        _child(["write", "--folder", str(folder), "--size", args.size], None, end)
        gb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9
        report(what="write", size=args.size, s=time.perf_counter() - t, gb=gb)
    res = args.res
    plan = [
        ("diffusers", None),
        ("ours", None),
        ("peer", None),
        ("ours", 8),
        ("peer", 8),
        ("ours", 4),
        ("peer", 4),
    ]
    for impl, quant in plan:
        if (
            impl not in args.impls
            or (quant and str(quant) not in args.quants)
            or (not quant and "bf16" not in args.quants)
        ):
            continue
        if time.monotonic() > end - 60:  # too little left for a load and three images
            report(what="skipped", impl=impl, quant=quant, why="time budget")
            continue
        cmd = ["run", "--impl", impl, "--folder", str(folder), "--res", str(res)]
        cmd += ["--quant", str(quant)] if quant else []
        cmd += ["--shallow"] if args.size == "shallow" else []
        cmd += ["--dtype", args.dtype] if args.dtype else []
        _child(cmd, args.peer if impl == "peer" else None, end)
    if args.delete:
        shutil.rmtree(folder, ignore_errors=True)
    print(table())


def _child(cmd: list[str], peer: str | None, end: float) -> None:
    env = dict(os.environ)
    cwd = None
    if peer:  # the peer's mflux first on the path, and not this checkout's
        env["PYTHONPATH"] = os.pathsep.join([peer, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PEER_HOME"] = str(Path(peer).resolve())
        cwd = tempfile.gettempdir()
    try:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *cmd],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=max(30, end - time.monotonic()),
        )
    except subprocess.TimeoutExpired:
        report(what="failed", cmd=" ".join(cmd), why="timeout")
        return
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            RESULTS.append(json.loads(line))
        print(line, flush=True)
    if out.returncode:
        report(what="failed", cmd=" ".join(cmd), rc=out.returncode, stderr=out.stderr[-1500:])


def table() -> str:
    rows = [
        "",
        "| impl | weights | load | first run | second run | one-step run | step | transformer step | peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS:
        if r.get("what") == "run":
            ts = r.get("transformer_step_s")
            peak = r.get("peak_gb")
            rows.append(
                f"| {r['impl']} | {r['quant']} | {r['load_s']:.1f} s | {r['first_run_s']:.1f} s | {r['second_run_s']:.2f} s "
                f"| {r['one_step_run_s']:.2f} s | {r['step_s']:.3f} s | {'' if ts is None else f'{ts:.3f} s'} "
                f"| {'' if peak is None else f'{peak:.1f}'} |"
            )
        elif r.get("what") in ("failed", "skipped"):
            rows.append(
                f"| {r.get('impl', r.get('cmd'))} | {r.get('quant', '')} | {r['what']}: {r.get('why', r.get('rc'))} | | | | | | |"
            )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the random checkpoint")
    r = sub.add_parser("run", help="one implementation, one weight setting, in this process")
    a = sub.add_parser(
        "all", help="write the checkpoint if missing, then run each implementation in its own process"
    )
    for p in (w, r, a):
        p.add_argument("--folder", required=True, help="checkpoint folder")
    for p in (w, a):
        p.add_argument(
            "--size",
            choices=("full", "shallow", "tiny"),
            default="full",
            help="full: the real model; shallow: real widths, one block of each kind (CPU smoke test); tiny: tests/fixtures.py's pipeline",
        )
    for p in (r, a):
        p.add_argument("--res", type=int, default=1024, help="image side in pixels")
        p.add_argument(
            "--dtype",
            default=None,
            help="our runtime's precision (default: bfloat16 on a GPU, float32 on a CPU)",
        )
    r.add_argument("--impl", choices=("ours", "peer", "diffusers"), required=True)
    r.add_argument("--quant", type=int, choices=(4, 8), default=None)
    r.add_argument(
        "--shallow",
        action="store_true",
        help="shrink the peer's hard-wired depth to the shallow checkpoint's",
    )
    a.add_argument("--peer", default=None, help="folder the peer was pip-installed into with --target")
    a.add_argument("--impls", default="diffusers,ours,peer", help="which implementations to run")
    a.add_argument("--quants", default="bf16,8,4", help="which weight settings: bf16, 8, 4")
    a.add_argument(
        "--time-limit", type=float, default=480, help="seconds for everything; later runs are skipped"
    )
    a.add_argument("--delete", action="store_true", help="delete the checkpoint at the end")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if args.command == "write":
        write_checkpoint(folder, args.size)
    elif args.command == "run":
        if args.impl == "ours":
            run_ours(folder, args.quant, args.res, args.dtype)
        elif args.impl == "peer":
            run_peer(folder, args.quant, args.res, args.shallow)
        else:
            run_diffusers(folder, args.res)
    else:
        args.impls = args.impls.split(",")
        args.quants = args.quants.split(",")
        if "peer" in args.impls and not args.peer:
            parser.error("--peer FOLDER is needed to run the peer (or leave it out of --impls)")
        run_all(args)


if __name__ == "__main__":
    main()
