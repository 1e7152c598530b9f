"""What the benchmarks share: the sizes, random models of FLUX.1's architecture (speed does not depend on
the weights' values, so nothing is downloaded), random model folders, timing, one JSON line per figure,
and `--tune`, the one way a benchmark changes mflux's CUDA tuning (`mflux.runtime.cuda.tuned`)."""

import argparse
import gc
import itertools
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from flux_sizes import FLUX, RES, TXT
from mlx.utils import tree_flatten

from mflux.runtime import memory
from mflux.runtime.autoencoder import Autoencoder, AutoencoderConfig
from mflux.runtime.clip import CLIPTextConfig, CLIPTextModel
from mflux.runtime.device import backend
from mflux.runtime.model import Flux, FluxParams
from mflux.runtime.quantization import (
    QuantSpec,
    quantize_model_from_weights,
    quantize_tensor,
    should_quantize,
)
from mflux.runtime.t5 import T5Config, T5Encoder

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Luxury food photograph of a chocolate cake on a marble table"
COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae")
QUANTS = {"q8": QuantSpec(8), "q4": QuantSpec(4)}  # affine, group 64; "bf16" is the float dtype
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
LABELS = {mx.bfloat16: "bf16", mx.float16: "fp16", mx.float32: "fp32"}


@dataclass
class Size:
    name: str
    t5: T5Config
    clip: CLIPTextConfig
    vae: AutoencoderConfig

    @property
    def flux(self) -> dict:
        return FLUX[self.name]

    @property
    def res(self) -> int:
        return RES[self.name]

    @property
    def txt(self) -> dict:
        return TXT[self.name]


SIZES = {
    "full": Size("full", T5Config(), CLIPTextConfig(), AutoencoderConfig()),
    "mid": Size(
        "mid",
        T5Config(d_model=1024, d_ff=2048, num_layers=2, num_heads=16),
        # CLIP-L's width: its pooled output feeds the transformer's 768-wide vector input
        CLIPTextConfig(hidden_size=768, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
        AutoencoderConfig(block_out_channels=(32, 64, 64, 64)),
    ),
    "tiny": Size(
        "tiny",
        # vocabularies that hold the test fixtures' tokenizers (CLIP's has 814 tokens)
        T5Config(vocab_size=1024, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=2),
        CLIPTextConfig(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
        ),
        AutoencoderConfig(block_out_channels=(32, 32, 32, 32)),
    ),
}

# ---------------------------------------------------------------- arguments


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the module docstring's first paragraph and whose epilog is the rest."""
    first, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(
        description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_model_arguments(p: argparse.ArgumentParser, default_size: str = "full") -> None:
    p.add_argument(
        "--size", choices=SIZES, default=default_size, help=f"model size (default: {default_size})"
    )
    p.add_argument(
        "--dtype", choices=DTYPES, help="float dtype (default: bfloat16 on a GPU, float32 on a CPU)"
    )
    p.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar="FIELD=VALUE[,VALUE...]",
        help="CUDA only: run with mflux.runtime.cuda.Tuning's FIELD at each VALUE in turn (several --tune: "
        "every combination), e.g. --tune kernels=true,false --tune headroom=2gb,none",
    )


def finish(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The dtype and the list of tunings filled in; a parser error for a bad --tune."""
    default = "float32" if mx.default_device() == mx.cpu else "bfloat16"
    args.dtype = DTYPES[args.dtype or default]
    args.tunings = tunings(p, args.tune)
    return args


def split(p: argparse.ArgumentParser, flag: str, value: str, choices) -> list[str]:
    """A comma-separated option's items, each one of `choices`."""
    items = [v for v in value.split(",") if v]
    for v in items:
        if v not in choices:
            p.error(f"{flag}: unknown {v!r} (choose from {', '.join(choices)})")
    return items


def label(quant: str, dtype) -> str:
    """A quantization as the figures name it: the float dtype's name for "bf16"."""
    return LABELS[dtype] if quant == "bf16" else quant


# ---------------------------------------------------------------- CUDA tuning


def cuda():
    """`mflux.runtime.cuda` where MLX runs on CUDA; None elsewhere, or where the package is absent."""
    if backend() != "cuda":
        return None
    try:
        from mflux.runtime import cuda as package
    except ImportError:
        return None
    return package


def tunings(p: argparse.ArgumentParser, items: list[str]) -> list[dict]:
    """Every combination of the --tune values ([{}] without --tune)."""
    if not items:
        return [{}]
    c = cuda()
    if c is None:
        p.error(
            f"--tune changes mflux.runtime.cuda's tuning, which runs only on CUDA (MLX runs on {backend()} here)"
        )
    types = {f.name: f.type for f in fields(c.Tuning)}
    axes = []
    for item in items:
        name, _, values = item.partition("=")
        if name not in types:
            p.error(f"--tune {item}: no tuning {name!r} (choose from {', '.join(types)})")
        try:
            axes.append([(name, _tune_value(v, types[name])) for v in values.split(",")])
        except ValueError as e:
            p.error(f"--tune {item}: {e}")
    return [dict(combo) for combo in itertools.product(*axes)]


def _tune_value(text: str, kind):
    """`text` as a Tuning field of type `kind` takes it: none, true/false, 2gb/512mb, or a number."""
    options = typing.get_args(kind) or (kind,)
    t = text.strip().lower()
    if t == "none" and type(None) in options:
        return None
    if bool in options:
        if t in ("true", "on", "1", "false", "off", "0"):
            return t in ("true", "on", "1")
        raise ValueError(f"{text!r} is not true or false")
    if int in options:
        m = re.fullmatch(r"([0-9.e+]+)\s*(gb|mb)?", t)
        if not m:
            raise ValueError(f"{text!r} is not a number of bytes (e.g. 8e9, 2gb, 256mb)")
        return int(float(m[1]) * {"gb": 2**30, "mb": 2**20, None: 1}[m[2]])
    return float(t)


def tuned(tune: dict):
    """The CUDA tuning with `tune`'s fields changed, for a with-block (nothing to change: no change)."""
    return cuda().tuned(**tune) if tune else nullcontext()


def tuning(tune: dict) -> dict:
    """A figure's record of the tuning it ran under: {"tune": {...}} where --tune changed it, else {}."""
    return {"tune": tune} if tune else {}


def use_tuned_matmul(module: nn.Module) -> None:
    """On CUDA, set `module`'s quantized layers to the tuning in force, as the loader sets them."""
    c = cuda()
    if c is not None:
        t = c.TUNING
        c.qmatmul.choose_matmul(module, t.dequantize_min_rows, t.fused_dequantize)


# ---------------------------------------------------------------- reporting and timing

FIGURES: list[dict] = []


def report(**kw) -> dict:
    """One figure, printed as a JSON line at once and kept for the closing table."""
    kw = {k: round(v, 6) if isinstance(v, float) else v for k, v in kw.items()}
    FIGURES.append(kw)
    print(json.dumps(kw), flush=True)
    return kw


def report_env(args) -> None:
    c = cuda()
    report(
        what="env",
        device=str(mx.default_device()),
        mlx=mx.__version__,
        python=sys.version.split()[0],
        size=getattr(args, "size", None),
        dtype=LABELS[args.dtype],
        cuda_tuning=c.status() if c else f"none (MLX runs on {backend()})",
    )


def table(header: list[str], rows: list[list]) -> None:
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def timeit(fn, warmup: int, n: int) -> dict:
    """The first call (on CUDA it builds kernels), `warmup - 1` more, then `n` timed calls, each
    evaluated as the engine evaluates a step (`memory.evaluate`) and synchronized."""

    def call() -> float:
        t = time.perf_counter()
        memory.evaluate(fn())
        mx.synchronize()
        return time.perf_counter() - t

    first = call()
    for _ in range(warmup - 1):
        call()
    times = [call() for _ in range(n)]
    return {"s": statistics.fmean(times), "median_s": statistics.median(times), "first_s": first}


def free() -> None:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


def nbytes(module: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(module.parameters()))


# ---------------------------------------------------------------- random models


def construct(component: str, size: Size, variant: str = "schnell") -> nn.Module:
    """The module with MLX's lazy initial weights: its shapes are known, nothing is computed yet."""
    if component == "transformer":
        return Flux(FluxParams.from_diffusers_config({**size.flux, "guidance_embeds": variant == "dev"}))
    if component == "text_encoder_2":
        return T5Encoder(size.t5)
    if component == "text_encoder":
        return CLIPTextModel(size.clip)
    return Autoencoder(size.vae)


def build(component: str, size: Size, dtype, spec: QuantSpec | None, variant: str = "schnell") -> nn.Module:
    """Random weights drawn on the device and quantized tensor by tensor under `spec`, as the loader
    reads them, so a quantized model never holds its float weights. Norms keep their ones."""
    module = construct(component, size, variant)
    weights = []
    for name, p in tree_flatten(module.parameters()):
        if p.ndim >= 2:
            p = mx.random.normal(p.shape, dtype=dtype, scale=p.shape[-1] ** -0.5)
        p = p.astype(dtype)
        if should_quantize(component, name, p.shape, spec):
            parts = quantize_tensor(name, p, spec)
            mx.eval(list(parts.values()))
            weights += parts.items()
        else:
            mx.eval(p)
            weights.append((name, p))
    quantize_model_from_weights(module, [n for n, _ in weights], lambda path: spec)
    module.load_weights(weights, strict=True)
    mx.eval(module.parameters())
    return module


# ---------------------------------------------------------------- random model folders


def add_folder_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folder", help="a model folder to read (default: a random one of --size, written first)")
    p.add_argument("--keep", help="write the random folders under this one and keep them (reused when there)")
    p.add_argument(
        "--tmp", help="where a random folder is written when not kept (default: the system's temp)"
    )


@contextmanager
def model_folder(args, layout: str, quant: str = "bf16"):
    """The folder to read: --folder as it is; else a random model of --size, MLX-native stored at
    `quant` (`layout` "mlx") or in diffusers' layout (`layout` "hf", bf16, written by peer.py), written
    into --keep/<layout>-<quant> (kept) or a temporary folder (deleted after)."""
    if args.folder:
        yield Path(args.folder)
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mflux-bench-", dir=args.tmp))
    folder = root / f"{layout}-{quant}"
    try:
        if not folder.is_dir():
            partial = root / f".{folder.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            t = time.perf_counter()
            if layout == "hf":
                from peer import write_checkpoint

                write_checkpoint(partial, args.size)
            else:
                write_native(partial, SIZES[args.size], args.dtype, QUANTS.get(quant))
            partial.rename(folder)
            layout, stored = describe(folder)
            report(
                what="write", layout=layout, stored=stored, s=time.perf_counter() - t, gb=folder_gb(folder)
            )
        yield folder
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def describe(folder: Path) -> tuple[str, str]:
    """(layout, what its transformer is stored as) of a model folder: ("hf", "bf16"), ("mlx", "q4"), ..."""
    from mflux.folders import open_folder
    from mflux.manifest import read_manifest

    model = open_folder(folder)
    q = (model.quantization or {}).get("transformer")
    if q:
        return model.format, f"q{q['bits']}"
    if model.format == "hf":
        return "hf", "bf16"  # FLUX.1's checkpoints, and peer.py's
    return "mlx", LABELS[DTYPES[read_manifest(folder).dtype]]


def folder_gb(folder: Path, component: str | None = None) -> float:
    where = folder / component if component else folder
    return sum(f.stat().st_size for f in where.rglob("*.safetensors")) / 1e9


def write_native(folder: Path, size: Size, dtype, spec: QuantSpec | None) -> None:
    """A random schnell in the converter's MLX-native layout (one folder of shards per component, a
    manifest), with the test fixtures' small tokenizers, whose ids fall inside every size's tables."""
    from mflux.manifest import Manifest, defaults_for, write_manifest
    from mflux.runtime.weights import save_shards

    for c in COMPONENTS:
        free()
        module = build(c, size, dtype, spec)
        save_shards(iter(tree_flatten(module.parameters())), folder / c, max_shard_bytes=2**30)
        del module
    sys.path.insert(0, str(ROOT / "tests"))
    import fixtures

    with tempfile.TemporaryDirectory() as tmp:
        fixtures._write_clip_tokenizer(folder / "tokenizer")
        fixtures._write_t5_tokenizer(folder / "tokenizer_2", Path(tmp))
    architecture = {
        "transformer": {**size.flux, "guidance_embeds": False},
        "text_encoder": vars(size.clip),
        "text_encoder_2": vars(size.t5),
        "vae": {**vars(size.vae), "block_out_channels": list(size.vae.block_out_channels)},
        "scheduler": {"shift": 1.0, "use_dynamic_shifting": False},  # schnell's
    }
    quantized = ("transformer", "text_encoder", "text_encoder_2")
    manifest = Manifest(
        name=f"random-{size.name}",
        variant="schnell",
        format="mlx",
        dtype={v: k for k, v in DTYPES.items()}[dtype],
        source={"kind": "path", "path": str(folder)},
        files=[],  # no hashes: hashing 34 GB would cost more than the load it is written for
        architecture=architecture,
        defaults=defaults_for("schnell", architecture),
        quantization={c: spec.to_dict() for c in quantized} if spec else None,
    )
    write_manifest(folder, manifest)


def make_images(folder: Path, args, seeds=(1, 2)) -> list[tuple[float, object]]:
    """`Flux1` opens `folder` and makes one image per seed as `mflux run --seed 1 2` does, one at a time
    (T5 and CLIP freed once the prompts are encoded, the modulation layers once every image's
    modulations are computed, the transformer before the last decode). (seconds since the folder was
    opened, GeneratedImage) per image."""
    from mflux.flux1 import Config, Flux1, ImageEvent

    start = time.perf_counter()
    flux = Flux1.from_path(folder, precision={v: k for k, v in DTYPES.items()}[args.dtype])
    config = Config(num_inference_steps=args.image_steps, height=args.res, width=args.res)
    events = flux.generate(
        list(seeds),
        PROMPT,
        config,
        batch_size=1,
        free_text_encoders=True,
        free_modulation_weights=True,
        free_transformer=True,
    )
    return [(time.perf_counter() - start, e.image) for e in events if isinstance(e, ImageEvent)]


def add_image_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--res", type=int, help="image side in pixels (default: the size's, 1024 at full)")
    p.add_argument("--image-steps", type=int, default=4, help="denoising steps per image (default 4)")
