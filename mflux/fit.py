"""Whether a run fits the machine, known before anything is pulled or loaded.

`expected_peak` gives the peak of MLX's allocator for a model's architecture at a quantization, image
size, batch and mode, phase by phase, as `mflux run` frees components (T5 and CLIP after encoding, the
transformer's modulation layers once computed, the transformer before the last decode). Each phase is
its components' weights (counted from empty modules of the checkpoint's sizes: parameters x bytes per
weight) plus the activations of the formulas below, each with its source. `usable_memory` is what the
backend can use. `preflight` refuses a run that cannot fit, naming the largest configuration that does.
"""

import os
import re
from dataclasses import dataclass
from functools import cache

from mflux.errors import MfluxError

GB = 10**9
BAND_BYTES = 256 * 2**20  # autoencoder.BAND_BYTES, the banded decode's band
ATTENTION_SCORE_BYTES = 4  # MLX computes attention's scores in float32 at every precision

# FLUX.1's released sizes, for a catalog model not pulled yet: the transformer's config.json (every
# catalog model has the 12B transformer; Fill and Control take wider inputs) and the defaults of T5-XXL,
# CLIP-L and the VAE, which are the runtime's config dataclasses' defaults.
FLUX1_TRANSFORMER = {
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}


@dataclass(frozen=True)
class Figure:
    """One constant of the estimate, and where it comes from."""

    value: float
    source: str


# Activation constants: bytes = value x (elements named in each formula) x the dtype's bytes
FIGURES = {
    "step": Figure(
        24,
        "a transformer step holds about 24 hidden-width rows per token (the single block's 7D-wide linear1 "
        "output, its 4D GELU, q, k, v, the 5D concatenation, the residual): fitted to MLX's peak on the CPU "
        "for the tiny and mid-size models (bench/memory.py), within the H200's 1024² bf16 peak of 23.9 GB "
        "(docs/PERFORMANCE.md)",
    ),
    "scores": Figure(
        2,
        "MLX's CPU attention materialises the float32 scores and their softmax (B x heads x L x L, twice); "
        "Metal's and CUDA's fused kernels hold none",
    ),
    "decode": Figure(
        2.45,
        "the whole-tensor VAE decode holds about 2.45 working sets of its widest full-resolution "
        "convolution (autoencoder.BandedDecoder.working_set: 7.5 GB at 1024² bf16): 2.37-2.5 measured on "
        "the CPU for the tiny models at 64² and 128² and the mid-size one at 256² (bench/memory.py); the "
        "H200 took 18.6 GB without the runtime's queue bound (autoencoder.Autoencoder.decode), 2.48",
    ),
    "decode_cuda": Figure(
        0.45,
        "on CUDA the runtime's queue bound holds the whole-tensor decode to 3.25 GB over its weights at "
        "1024² bf16 on the H200, 0.43 working sets (docs/PERFORMANCE.md)",
    ),
    "banded": Figure(
        2,
        "the banded decode holds a layer's whole input and output (2 tensors of the widest full-resolution "
        "layer) and one 256 MB band's working set (autoencoder.BandedDecoder): 1.7 GB over the weights "
        "at 1024² bf16, against 1.62 GB measured on the H200 in 1024 MB bands (docs/PERFORMANCE.md)",
    ),
    "load": Figure(
        16 * 2**20,
        "loading evaluates 16 MiB of weights at a time (runtime.loader.EVAL_GROUP_BYTES): one group's "
        "source and cast copies are held beside the weights loaded so far",
    ),
}


@dataclass(frozen=True)
class Plan:
    """What the estimate needs to know of a run."""

    architecture: dict  # component -> config values (a manifest's, a folder's, or FLUX1's)
    dtype_bytes: int  # the runtime precision's bytes per float: 4 on a CPU, 2 elsewhere
    quantization: dict  # component -> QuantSpec of its weights (stored or at load time)
    height: int = 1024
    width: int = 1024
    batch: int = 1
    text_tokens: int = 512
    low_memory: bool = False
    cpu: bool = False  # MLX's CPU backend (unfused attention)
    cuda: bool = False  # MLX's CUDA backend (evaluations under the runtime's queue bound)
    device_memory: int = 2**62  # the decode bands past a quarter of it (runtime.memory.device_memory)
    stored: tuple[str, ...] = ()  # the components stored quantized, which load as stored


def plan_for(
    architecture: dict,
    stored: dict | None,
    precision: str,
    bits: int | None,
    *,
    height: int = 1024,
    width: int = 1024,
    batch: int = 1,
    text_tokens: int = 512,
    low_memory: bool = False,
) -> Plan:
    """The plan of a run: `stored` is the model's stored quantization (component -> its dict, as a
    manifest records it), `bits` a load-time quantization of the quantizable components it leaves float."""
    from mflux.runtime import device
    from mflux.runtime.memory import device_memory
    from mflux.runtime.quantization import QUANTIZABLE_COMPONENTS, QuantSpec

    quantization = {c: QuantSpec.from_dict(q) for c, q in (stored or {}).items()}
    if bits is not None:
        for c in QUANTIZABLE_COMPONENTS:
            quantization.setdefault(c, QuantSpec(bits))
    return Plan(
        architecture=architecture,
        dtype_bytes=4 if precision == "float32" else 2,
        quantization=quantization,
        height=height,
        width=width,
        batch=batch,
        text_tokens=text_tokens,
        low_memory=low_memory,
        cpu=on_cpu(),
        cuda=device.cuda() is not None,
        device_memory=device_memory(),
        stored=tuple(stored or ()),
    )


def on_cpu() -> bool:
    """Whether MLX runs on the CPU, whose attention holds its scores."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def expected_peak(plan: Plan) -> dict[str, int]:
    """Phase -> bytes of MLX's allocator peak: text_encoding, denoising, decoding."""
    arch, t = plan.architecture, plan.dtype_bytes
    clip, t5 = weight_bytes("text_encoder", plan), weight_bytes("text_encoder_2", plan)
    transformer, modulation = weight_bytes("transformer", plan), weight_bytes("transformer", plan, True)
    vae = weight_bytes("vae", plan)
    t5_cfg = arch["text_encoder_2"]
    tokens = plan.batch * plan.text_tokens
    t5_act = tokens * (2 * t5_cfg.get("d_ff", 10240) + 4 * t5_cfg.get("d_model", 4096)) * t
    # a phase holds its weights, and either what loading the last of them takes or its activations
    text = clip + t5 + max(t5_act, _load(t5))
    denoise = max(transformer + _load(transformer), transformer - modulation + step_activations(plan))
    decode = vae + max(decode_activations(plan), _load(vae))
    return {"text_encoding": int(text), "denoising": int(denoise), "decoding": int(decode)}


def step_activations(plan: Plan) -> int:
    """One transformer step's activations: hidden-width rows per token, and the CPU's attention scores."""
    cfg = plan.architecture["transformer"]
    heads, width = cfg["num_attention_heads"], cfg["num_attention_heads"] * cfg["attention_head_dim"]
    tokens = plan.text_tokens + (plan.height // 16) * (plan.width // 16)
    hidden = FIGURES["step"].value * plan.batch * tokens * width * plan.dtype_bytes
    scores = (
        plan.batch * heads * tokens**2 * ATTENTION_SCORE_BYTES * FIGURES["scores"].value if plan.cpu else 0
    )
    return int(hidden + scores)


def decode_activations(plan: Plan) -> int:
    """The VAE decode's working memory: its widest full-resolution convolution's working set (banded:
    at most the bands' figure)."""
    channels = list(plan.architecture["vae"].get("block_out_channels", (128, 256, 512, 512)))
    widest = max(channels[:2])  # the last up block's first convolution reads the one before's channels
    pixels = plan.batch * plan.height * plan.width
    working_set = pixels * widest * (8 + 10 * plan.dtype_bytes)  # BandedDecoder._row_bytes's terms
    whole = working_set * FIGURES["decode_cuda" if plan.cuda else "decode"].value
    # the decode bands when asked to (low memory), or, as "auto" does, past a quarter of the device
    banded = plan.low_memory or working_set > plan.device_memory // 4
    layers = FIGURES["banded"].value * pixels * widest * plan.dtype_bytes
    band = FIGURES["decode"].value * min(BAND_BYTES, working_set)
    return int(min(whole, layers + band) if banded else whole)


def weight_bytes(component: str, plan: Plan, modulation_only: bool = False) -> int:
    """Bytes of a component's weights at the plan's precision and quantization (modulation_only: the
    transformer's conditioning and modulation layers alone, which a run frees once they are computed)."""
    from mflux.runtime.quantization import should_quantize

    spec = component_spec(component, plan)
    total = 0
    for name, shape in parameter_shapes(component, _frozen(plan.architecture[component])):
        if modulation_only and not _MODULATION.search(name):
            continue
        n = _count(shape)
        if should_quantize(component, name, shape, spec):
            # packed bits, and a scale and a bias per group in the float dtype
            total += n * spec.bits // 8 + 2 * (n // spec.group_size) * plan.dtype_bytes
        else:
            total += n * plan.dtype_bytes
    return total


def component_spec(component: str, plan: Plan):
    """The QuantSpec a component loads with: --low-memory takes T5 to 4 bits where it is wider and not
    stored quantized (runtime.models.Models.spec)."""
    from mflux.runtime.models import LOW_MEMORY_T5_BITS
    from mflux.runtime.quantization import QuantSpec

    spec = plan.quantization.get(component)
    if plan.low_memory and component == "text_encoder_2" and component not in plan.stored:
        if spec is None or spec.bits > LOW_MEMORY_T5_BITS:
            return QuantSpec(LOW_MEMORY_T5_BITS)
    return spec


# the transformer's conditioning and modulation layers (model.Flux._modulation_layers)
_MODULATION = re.compile(r"^(time_in|vector_in|guidance_in)\.|_mod\.|\.modulation\.|adaLN_modulation")


@cache
def parameter_shapes(component: str, architecture: tuple) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter of an empty module of these sizes; nothing is evaluated."""
    from mlx.utils import tree_flatten

    from mflux.runtime.loader import build_module

    module = build_module(component, {component: dict(architecture)})
    return tuple((name, tuple(p.shape)) for name, p in tree_flatten(module.parameters()))


def _frozen(config: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()))


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _load(weights: int) -> int:
    return int(min(weights, FIGURES["load"].value))


def peak(plan: Plan) -> int:
    """The run's peak: its largest phase."""
    return max(expected_peak(plan).values())


def catalog_architecture(variant: str) -> dict:
    """The architecture of a catalog model before it is pulled: FLUX.1's released sizes."""
    from mflux.runtime.folder import VARIANTS

    v = VARIANTS[variant]
    transformer = {**FLUX1_TRANSFORMER, "in_channels": v.in_channels, "guidance_embeds": v.guidance_embeds}
    if v.in_channels != 64:
        transformer["out_channels"] = 64
    return {"transformer": transformer, "text_encoder": {}, "text_encoder_2": {}, "vae": {}}


# -- the memory the backend can use ---------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    total: int  # the device's memory (a Mac's unified memory, a GPU's, the machine's RAM)
    usable: int  # what a run can use of it now
    what: str  # "this Mac", "this GPU", "this machine"


def usable_memory() -> Machine:
    """The memory the backend can use: on a Mac the GPU's recommended working set (the share of unified
    memory Metal lets a process keep), on CUDA the device's memory, on the CPU the RAM Linux reports
    available (MemAvailable: free, plus caches it can drop)."""
    import mlx.core as mx

    info = mx.device_info() if mx.default_device() != mx.cpu else {}
    if info.get("max_recommended_working_set_size"):
        total = int(info.get("memory_size") or info["max_recommended_working_set_size"])
        return Machine(total, int(info["max_recommended_working_set_size"]), "this Mac")
    if info.get("memory_size"):
        return Machine(int(info["memory_size"]), int(info["memory_size"]), "this GPU")
    total, available = _meminfo()
    return Machine(total, available, "this machine")


def _meminfo() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo; else the physical and free pages."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


# -- a model, before it is pulled or loaded ---------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """What the estimate reads of a model: a folder's configs, a stored model's manifest, or for a
    catalog model not pulled yet, FLUX.1's sizes."""

    name: str
    architecture: dict
    stored: dict | None  # component -> stored quantization dict
    bits: int | None  # a load-time quantization the name or -q asks for
    text_tokens: int  # T5's padded length: schnell 256, the others 512


def find_model(
    model: str | None, path: str | None, quantize: int | None, variant: str | None = None
) -> Model:
    """The model `mflux run -m/--path/-q` names, read without pulling or loading anything."""
    from mflux.catalog import catalog
    from mflux.folders import open_folder
    from mflux.manifest import read_manifest
    from mflux.store import NotStored, Store

    if path:
        folder = open_folder(path, variant=variant)
        return Model(path, folder.architecture, folder.quantization, quantize, _tokens(folder.defaults))
    name = model or "schnell"
    try:
        found = Store().resolve(name)
    except NotStored as e:
        if e.pull is None:
            raise
        entry = catalog()[e.pull]
        bits = e.bits if e.bits is not None else quantize
        return Model(name, catalog_architecture(e.pull), None, bits, _tokens(entry.defaults))
    man = read_manifest(found.path)
    bits = found.bits if found.bits is not None else quantize
    return Model(name, man.architecture, man.quantization, bits, _tokens(man.defaults))


def _tokens(defaults: dict) -> int:
    return int(defaults.get("max_sequence_length", 512))


# -- the preflight ----------------------------------------------------------------------------------

FIT_BITS = (None, 8, 4, 3)  # what to suggest, best first: the float weights, then 8, 4 and 3 bits


def preflight(name: str, plan: Plan, bits: int | None, machine: Machine | None = None) -> None:
    """Refuse a run whose expected peak exceeds the usable memory: one line naming what it needs, what
    the machine has, and the largest configuration that fits (a quantization, --low-memory, or both)."""
    machine = machine or usable_memory()
    need = peak(plan)
    if need <= machine.usable:
        return
    base = name.rsplit("-q", 1)[0] if re.search(r"-q\d+$", name) else name
    tries = _fits(base, plan, bits, machine.usable)
    where = (
        f"{machine.what} has {gb(machine.total)} with about {gb(machine.usable)} free to use"
        if machine.total != machine.usable
        else f"{machine.what} has {gb(machine.total)}"
    )
    size = f"{plan.width}x{plan.height}" + (f", {plan.batch} at once" if plan.batch > 1 else "")
    mode = " with --low-memory" if plan.low_memory else ""
    advice = (
        f"try {' or '.join(tries)}" if tries else "nothing fits at this size: try a smaller --width/--height"
    )
    raise MfluxError(
        f"{name}{mode} needs about {gb(need)} at {size}; {where}: {advice} (or --ignore-memory to run anyway)"
    )


def _fits(base: str, plan: Plan, bits: int | None, usable: int) -> list[str]:
    """Up to two suggestions: the best quantization that fits as the run is, and --low-memory at the
    run's own quantization; where neither fits, the best quantization that fits with --low-memory."""
    from dataclasses import replace

    from mflux.runtime.quantization import QUANTIZABLE_COMPONENTS, QuantSpec

    def quantized(b: int | None, low: bool) -> Plan:
        q = dict(plan.quantization)
        if b is not None:
            q.update({c: QuantSpec(b) for c in QUANTIZABLE_COMPONENTS if c not in q or q[c].bits > b})
        return replace(plan, quantization=q, low_memory=low)

    order = [b for b in FIT_BITS if b is None or bits is None or b < bits]
    out = []
    for b in order:
        need = peak(quantized(b, plan.low_memory))
        if b is not None and need <= usable:
            out.append(f"{base}-q{b} (about {gb(need)})")
            break
    if plan.low_memory:
        return out
    need = peak(quantized(bits, True))
    if need <= usable:
        return [*out, f"--low-memory (about {gb(need)})"]
    for b in [] if out else [b for b in order if b is not None]:
        need = peak(quantized(b, True))
        if need <= usable:
            return [f"{base}-q{b} --low-memory (about {gb(need)})"]
    return out


def gb(n: int, unit: bool = True) -> str:
    """Bytes as a rounded figure in GB: whole from 10 GB, one decimal below; in MB under 0.1 GB."""
    if unit and n < GB // 10:
        return f"{n / 10**6:.0f} MB"
    text = f"{n / GB:.0f}" if n >= 10 * GB else f"{n / GB:.1f}"
    return f"{text} GB" if unit else text


def catalog_peaks(entry) -> dict[str, int]:
    """A catalog model's expected peak for one 1024x1024 image at this backend's default precision:
    unquantized ("-"), at 8 and at 4 bits."""
    from mflux.backend import default_precision

    architecture = catalog_architecture(entry.name) if entry.name in _variants() else None
    if architecture is None:
        return {}
    tokens = _tokens(entry.defaults)
    return {
        label: peak(plan_for(architecture, None, default_precision(), bits, text_tokens=tokens))
        for label, bits in (("-", None), ("q8", 8), ("q4", 4))
    }


def _variants():
    from mflux.runtime.folder import VARIANTS

    return VARIANTS
