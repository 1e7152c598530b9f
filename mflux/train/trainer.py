"""`mflux train`: LoRA fine-tuning of the FLUX.1 transformer, the way mlx-lm's tuner trains.

The order keeps memory near the transformer alone: every input is checked first; the images go through
the VAE and the captions through T5 and CLIP once, into a cache on disk; the encoders are freed; then
the frozen transformer (optionally quantized: QLoRA) trains float32 LoRA weights, recomputing each
block's activations in the backward pass (gradient checkpointing). The step is one `mx.compile`d
function whose state (the model, the optimizer) are its inputs and outputs, and whose random key is
an argument and a result, so a checkpoint (LoRA weights, optimizer state, step, key) resumes exactly.

Everything a run writes goes into its work folder, `<output>.train/` unless given: `cache.safetensors`,
`checkpoints/step-NNNNNN.safetensors` (the last `keep_checkpoints`), `loss.jsonl`, `loss.png` and
`validation/step-NNNNNN.png`. The LoRA itself is the output file, under diffusers/PEFT names.

Under `mlx.launch -n N` (data parallel, docs/PERFORMANCE.md): every rank draws the whole batch's noise
and sigmas from the same key, as one process does, takes its batch/N rows, and the gradients of the
rows' mean loss are averaged with all_sum before clipping, so N ranks step as one process with the
whole batch. Rank 0 alone reads the data, the cache and a checkpoint, shares what it read
(mflux.distributed.share, broadcast), and writes every file; the others need only the model.
"""

import difflib
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mflux import distributed
from mflux.backend import default_precision
from mflux.errors import CtrlC, InvalidArgument, MfluxError
from mflux.folders import open_folder
from mflux.runtime import device, memory, sampler
from mflux.runtime.folder import ModelFolder
from mflux.runtime.loader import load_component
from mflux.runtime.parallel import average_gradients
from mflux.runtime.quantization import QuantSpec
from mflux.train import data as dataset
from mflux.train import lora
from mflux.train.files import atomic_png, atomic_save, atomic_text, write_errors
from mflux.train.objective import DEV_GUIDANCE, flow_loss, sample_sigmas, training_sigmas

CHECKPOINT_KIND = "mflux-train-checkpoint"
# A checkpoint's `format_version`. 1: the run's settings in `config`, their paths absolute, so
# `--resume DIR` alone continues it. Unversioned ones (before 1) hold the same fields, their paths as
# given (relative to the folder the run started in), and resume the same way.
CHECKPOINT_FORMAT = 1
# What a resumed run may change: how long it goes on, what it draws and saves along the way, and where
# its files are. The rest are the checkpoint's, so the run continues exactly.
MAY_CHANGE = {
    "steps",
    "validation_prompt",
    "validation_every",
    "checkpoint_every",
    "keep_checkpoints",
    "gradient_checkpointing",  # memory, not the result
    "data",
    "output",
    "work_dir",
}
NOT_SETTINGS = {"resume", "force", "progress"}  # this invocation's, never recorded
NO_FLAG = {"guidance", "weight_decay", "max_grad_norm", "gradient_checkpointing"}  # config-file keys


@dataclass
class TrainConfig:
    """Every setting of a run; `mflux train` flags and config-file keys have these names."""

    model: str
    data: str
    output: str
    steps: int = 1000
    rank: int = 16
    alpha: float | None = None  # None: the rank (scale 1), as diffusers' script sets lora_alpha
    lr: float = 1e-4
    batch_size: int = 1
    resolution: int = 512
    targets: str | list[str] | None = None  # None: attn (to_q, to_k, to_v, to_out.0)
    seed: int = 0
    quantize: int | None = None  # 4 or 8: a frozen quantized base (QLoRA)
    checkpoint_every: int = 250  # 0: only at the end and on Ctrl-C
    keep_checkpoints: int = 3
    resume: str | None = None  # a checkpoint file, or a work folder (its latest checkpoint)
    validation_prompt: str | None = None
    validation_every: int = 0  # 0: one validation image at the end (with a prompt)
    trigger: str | None = None
    guidance: float = DEV_GUIDANCE  # dev's guidance input while training
    max_sequence_length: int | None = None  # T5 tokens; None: the model's (schnell 256, dev 512)
    precision: str | None = None  # default: float32 on a CPU, else bfloat16
    weight_decay: float = 1e-4  # AdamW, as diffusers' script
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    work_dir: str | None = None
    force: bool = False
    progress: bool = False

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = float(self.rank) if isinstance(self.rank, int) else self.alpha
        self.targets = lora.target_leaves(self.targets)
        checks = [
            (self.rank, "rank", lambda v: isinstance(v, int) and v > 0, "a positive integer"),
            (self.steps, "steps", lambda v: isinstance(v, int) and v > 0, "a positive integer"),
            (self.batch_size, "batch-size", lambda v: isinstance(v, int) and v > 0, "a positive integer"),
            (self.lr, "lr", lambda v: isinstance(v, (int, float)) and v > 0, "a positive number"),
            (self.alpha, "alpha", lambda v: isinstance(v, (int, float)) and v > 0, "a positive number"),
            (
                self.resolution,
                "resolution",
                lambda v: isinstance(v, int) and v > 0 and v % 16 == 0,
                "a positive multiple of 16 (such as 512 or 1024)",
            ),
            (self.quantize, "quantize", lambda v: v in (None, 4, 8), "4 or 8"),
            (self.checkpoint_every, "checkpoint-every", lambda v: isinstance(v, int) and v >= 0, "0 or more"),
            (self.keep_checkpoints, "keep-checkpoints", lambda v: isinstance(v, int) and v > 0, "1 or more"),
            (self.validation_every, "validation-every", lambda v: isinstance(v, int) and v >= 0, "0 or more"),
            (
                self.max_sequence_length,
                "max-sequence-length",
                lambda v: v is None or (isinstance(v, int) and 0 < v <= 512),
                "in 1..512",
            ),
            (self.seed, "seed", lambda v: isinstance(v, int) and 0 <= v < 2**32, "an integer in 0..2**32-1"),
        ]
        for value, name, ok, want in checks:
            if not ok(value):
                raise InvalidArgument(f"--{name} must be {want}, got {value!r}")
        if self.validation_every and not self.validation_prompt:
            raise InvalidArgument("--validation-every needs a --validation-prompt")
        if not str(self.output).endswith(".safetensors"):
            raise InvalidArgument(f"--output must be a .safetensors file, got {self.output!r}")


@dataclass
class TrainResult:
    output: Path
    work_dir: Path
    steps: int
    losses: list[float]  # of the steps this call ran
    seconds_per_step: float
    peak_memory: dict = field(default_factory=dict)  # phase -> bytes
    validation_images: list[Path] = field(default_factory=list)
    encoded: bool = True  # False: the latents and embeddings came from the work folder's cache
    rank: int = 0  # under mlx.launch: this process's rank (0 wrote the files), of `ranks`
    ranks: int = 1


def train(
    model: str | None = None, data: str | None = None, output: str | None = None, on_step=None, **options
) -> TrainResult:
    """Train a LoRA on the images and captions in `data` and write it to `output` (.safetensors).

    Options are TrainConfig's fields; `on_step(step, loss)` is called after each step. With `resume`
    (a checkpoint or a work folder) the run's settings are the checkpoint's, model, data and output
    included; those given again may change only what MAY_CHANGE names. Raises MfluxError for bad input,
    before anything loads or is encoded. Ctrl-C saves a checkpoint, says so on stderr and raises
    Stopped. Under mlx.launch every rank calls this and gets the same losses; rank 0 writes the files."""
    group = distributed.world()
    given = {"model": model, "data": data, "output": output, **options}
    given = {k: v for k, v in given.items() if v is not None}
    settings, trainer, error = given, None, None
    if given.get("resume"):
        try:
            settings = resumed(given) if group.rank() == 0 else None  # it alone reads a checkpoint
        except MfluxError as e:
            error = e
        distributed.settle(group, error)
        settings = _from_rank_0(group, settings)
    try:
        trainer = Trainer(_config(settings), on_step, group)
    except MfluxError as e:
        error = e
    distributed.settle(group, error)  # under mlx.launch every rank stops when one refused
    return trainer.run()


def _config(settings: dict) -> TrainConfig:
    missing = _missing(settings)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise InvalidArgument(
            f"{_listed(missing)} {verb} required (as flags or in --config), or --resume a run"
        )
    return TrainConfig(**settings)


def _missing(settings: dict) -> list[str]:
    return [f"--{name}" for name in ("model", "data", "output") if not settings.get(name)]


def _listed(names: list[str]) -> str:
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


def _from_rank_0(group, settings: dict | None) -> dict:
    """Rank 0's settings on every rank, as JSON (the others did not read the checkpoint)."""
    if group.size() == 1:
        return settings
    blob = json.dumps(settings, default=str).encode() if group.rank() == 0 else b""  # str: a Path
    with distributed.lost_peer(group, "its messages say why"):
        (length,) = distributed.agree(group, [len(blob)])
        blob = bytes(distributed.agree(group, list(blob) or [0] * length))
    return json.loads(blob)


def resumed(given: dict) -> dict:
    """A resumed run's settings: the checkpoint's, with those given again that MAY_CHANGE. Another
    setting given with another value is refused in one line, before anything loads."""
    path = find_checkpoint(given["resume"])
    saved = recorded_settings(path, _checkpoint_meta(path))
    if path.parent.name == "checkpoints":  # in a work folder: the run's, wherever it was moved
        saved["work_dir"] = str(path.parent.parent.absolute())
    settings = saved | given
    missing = _missing(settings)
    if missing:
        raise MfluxError(
            f"{path}: the checkpoint does not record its run's {_listed(missing)} (an older mflux wrote "
            f"it; give them with --resume)"
        )
    ours, theirs = TrainConfig(**settings), TrainConfig(**(settings | saved))  # both normalised alike
    # model, rank and targets: check_checkpoint says those, with the checkpoint's own record of them
    for f in fields(TrainConfig):
        if f.name in MAY_CHANGE | NOT_SETTINGS | {"model", "rank", "targets"} or f.name not in saved:
            continue
        if getattr(ours, f.name) != getattr(theirs, f.name):
            option = f.name if f.name in NO_FLAG else "--" + f.name.replace("_", "-")
            raise MfluxError(
                f"{path}: the run was trained with {option} {getattr(theirs, f.name)!r}, not "
                f"{getattr(ours, f.name)!r} (a resumed run keeps its settings, so it continues exactly; "
                f"leave {option} out, or start a new run)"
            )
    return settings


def resolve_model(model: str) -> ModelFolder:
    """A store name (`schnell`, `dev`, `<name>`) or a model folder; never downloads."""
    if Path(model).expanduser().is_dir():
        return open_folder(model)
    from mflux.store import Store

    store = Store()
    if not store.exists(model):
        from mflux.catalog import catalog

        if model in catalog():
            raise MfluxError(f"model {model!r} is not in the store (get it with: mflux pull {model})")
        store.get(model)  # the unknown-model error, with close names
    return open_folder(store.path(model), name=model)


class Trainer:
    """One run; constructing it checks every input, before anything loads. Under mlx.launch (`group`
    of several ranks) rank 0 alone checks the output, the data and a checkpoint, which only it reads."""

    def __init__(self, cfg: TrainConfig, on_step=None, group=None):
        self.cfg = cfg
        self.on_step = on_step
        self.output = Path(cfg.output).expanduser()
        self.work = Path(cfg.work_dir).expanduser() if cfg.work_dir else self.output.with_suffix(".train")
        self.group = group or distributed.world()
        self.rank, self.ranks = self.group.rank(), self.group.size()
        self.lead = self.rank == 0  # reads the data and checkpoints, writes every file, prints
        if cfg.batch_size % self.ranks:
            raise InvalidArgument(
                f"--batch-size {cfg.batch_size} does not divide among the {self.ranks} ranks of mlx.launch "
                f"(each rank takes an equal share of every batch; use a multiple of {self.ranks})"
            )
        self.resume_from, self.resume_meta = None, {}
        if self.lead and cfg.resume:
            self.resume_from = find_checkpoint(cfg.resume)
            self.resume_meta = _checkpoint_meta(self.resume_from)
        if self.lead and self.output.exists() and not cfg.force and not self._resumes_its_output():
            raise MfluxError(f"{self.output} exists (pass --force to replace it, or pick another --output)")
        self.folder = resolve_model(cfg.model)
        self.examples, self.encoded = None, False
        if self.lead:
            self.examples = dataset.scan(cfg.data, cfg.trigger)
        if self.resume_from:
            check_checkpoint(self.resume_from, self.folder.name, cfg)
        self.precision = cfg.precision or default_precision()
        self.dtype = getattr(mx, self.precision)
        self.peak: dict[str, int] = {}
        self.validation_images: list[Path] = []

    def _resumes_its_output(self) -> bool:
        """Whether this resumes the run that wrote the output: then it may replace it (with more steps)."""
        if not self.resume_from:
            return False
        theirs = recorded_settings(self.resume_from, self.resume_meta).get("output")
        return bool(theirs) and Path(theirs).expanduser().absolute() == self.output.absolute()

    # --- the run ---

    def run(self) -> TrainResult:
        if self.lead:
            self.work.mkdir(parents=True, exist_ok=True)
        if self.lead and self.resume_from:
            print(f"resuming from step {self.resume_meta['step']} ({self.resume_from})", file=sys.stderr)
        cache = distributed.share(self.group, self.encode() if self.lead else None)
        flux, layers, optimizer = self.build()
        state = self.restore(flux, optimizer)
        losses, seconds = self.loop(flux, optimizer, cache, state)
        if self.lead:
            if self.cfg.validation_prompt and not self.cfg.validation_every:
                self.validate(flux, cache, state["step"])
            self.save_lora(layers)
            from mflux.train.report import plot_losses

            plot_losses(read_log(self.work / "loss.jsonl"), self.work / "loss.png")
        return TrainResult(
            self.output,
            self.work,
            state["step"],
            losses,
            seconds,
            self.peak,
            self.validation_images,
            self.encoded,
            self.rank,
            self.ranks,
        )

    def encode(self) -> dict[str, mx.array]:
        """Latents, caption and validation-prompt embeddings, from the cache when it is current."""
        from mflux.train.encode import encode_dataset

        prompts = [self.cfg.validation_prompt] if self.cfg.validation_prompt else []
        mx.reset_peak_memory()
        cache, self.encoded = encode_dataset(
            self.folder,
            self.examples,
            self.cfg.resolution,
            self.dtype,
            prompts,
            self.work / "cache.safetensors",
            self.cfg.max_sequence_length or self.folder.defaults["max_sequence_length"],
        )
        self.peak["encoding"] = mx.get_peak_memory()
        mx.clear_cache()
        return cache

    def build(self):
        cfg = self.cfg
        mx.reset_peak_memory()
        spec = QuantSpec(cfg.quantize) if cfg.quantize else None
        flux = load_component(self.folder, "transformer", self.dtype, spec)
        self.modules = lora.target_modules(flux.params, cfg.targets)
        mx.random.seed(cfg.seed)  # the A's initial values
        layers = lora.attach(flux, self.modules, cfg.rank, cfg.alpha)
        optimizer = optim.AdamW(
            learning_rate=cfg.lr, betas=[0.9, 0.999], eps=1e-8, weight_decay=cfg.weight_decay
        )
        return flux, layers, optimizer

    def restore(self, flux, optimizer) -> dict:
        state = {"step": 0, "key": mx.random.key(self.cfg.seed + 1)}
        if self.resume_from:
            state = load_checkpoint(self.resume_from, flux, optimizer)
        optimizer.init(flux.trainable_parameters())  # fills in a fresh state; keeps a restored one
        if self.ranks > 1:  # rank 0's (a checkpoint only it read): every rank starts alike
            arrays = state_arrays(flux, optimizer, state) | {"step": mx.array(state["step"])}
            arrays = distributed.broadcast(self.group, arrays)
            state = set_state(arrays, flux, optimizer) | {"step": arrays["step"].item()}
        return state

    def loop(self, flux, optimizer, cache, state) -> tuple[list[float], float]:
        cfg = self.cfg
        step_fn = make_step(
            flux,
            optimizer,
            cache,
            self.folder.architecture["scheduler"],
            cfg.resolution,
            cfg.batch_size,
            cfg.guidance,
            cfg.gradient_checkpointing,
            cfg.max_grad_norm,
            self.group,
        )
        order = BatchOrder(cache["latents"].shape[0], cfg.batch_size, cfg.seed)
        log = LossLog(self.work / "loss.jsonl", state["step"]) if self.lead else None
        unbuilt = self._unbuilt_kernels()
        bar = _progress(cfg, state["step"], self.lead)
        losses, start_step, key = [], state["step"], state["key"]
        started = time.perf_counter()
        with StopOnInterrupt() as interrupt:
            while state["step"] < cfg.steps:
                idx = mx.array(order.indices(state["step"]))
                t0 = time.perf_counter()
                loss, key = step_fn(key, idx)
                with distributed.lost_peer(self.group, "its messages say why"):  # the all_sums
                    memory.evaluate(flux.state, optimizer.state, loss, key, headroom="train")
                state["step"] += 1
                state["key"] = key
                seconds = time.perf_counter() - t0
                if unbuilt:
                    _write_quietly(unbuilt, f"first step: {seconds:.0f} s\n")
                    unbuilt = None
                losses.append(loss.item())
                if log:
                    log.write(state["step"], losses[-1], seconds, mx.get_peak_memory())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update(1)
                if self.on_step:
                    self.on_step(state["step"], losses[-1])
                if self.lead and cfg.validation_every and state["step"] % cfg.validation_every == 0:
                    self.validate(flux, cache, state["step"])
                # every rank stops after the same step when any was interrupted (one scalar all_sum)
                stopped = distributed.total(self.group, int(interrupt.stopped)) > 0
                due = cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0
                if self.lead and (stopped or due):
                    saved = self.checkpoint(flux, optimizer, state)
                    if not stopped:  # a stop says what it saved in its own line below
                        bar.write(f"checkpoint {saved}", file=sys.stderr)
                if stopped:
                    bar.close()
                    line = f"interrupted at step {state['step']}"
                    if self.lead:  # it saved the checkpoint, and says so
                        line += f": saved {saved} (continue with: mflux train --resume {self.work})"
                        print(line, file=sys.stderr)
                    raise Stopped(line)
        bar.close()
        self.peak["training"] = mx.get_peak_memory()
        last_saved = cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0
        if self.lead and state["step"] > start_step and not last_saved:
            bar.write(f"checkpoint {self.checkpoint(flux, optimizer, state)}", file=sys.stderr)
        ran = state["step"] - start_step
        return losses, (time.perf_counter() - started) / ran if ran else 0.0

    def _unbuilt_kernels(self):
        """On CUDA, where the kernel cache lacks this training step's kernels: their marker, after
        saying (once, before the bar) that the first step builds them (cuda.warmup.training_marker)."""
        base = f"q{self.cfg.quantize}" if self.cfg.quantize else "float"
        cuda = device.cuda()
        marker = cuda.warmup.training_marker(self.dtype, base) if cuda and self.lead else None
        if marker is None or marker.exists():
            return None
        print(
            "the first step builds this machine's GPU kernels for training, once: a few minutes on a "
            f"fresh machine (kept in {marker.parent})",
            file=sys.stderr,
        )
        return marker

    # --- outputs ---

    def checkpoint(self, flux, optimizer, state) -> Path:
        folder = self.work / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{state['step']:06d}.safetensors"
        arrays = state_arrays(flux, optimizer, state)
        meta = {
            "kind": CHECKPOINT_KIND,
            "format_version": str(CHECKPOINT_FORMAT),
            "step": str(state["step"]),
            "base_model": self.folder.name,
            "rank": str(self.cfg.rank),
            "alpha": str(self.cfg.alpha),
            "targets": json.dumps(self.cfg.targets),
            "config": json.dumps(self.settings()),
        }
        atomic_save(path, arrays, meta)
        for old in sorted(folder.glob("step-*.safetensors"))[: -self.cfg.keep_checkpoints]:
            old.unlink()
        return path

    def settings(self) -> dict:
        """The run's settings as its checkpoints record them: the paths absolute, so --resume works
        from any folder."""
        out = {k: v for k, v in asdict(self.cfg).items() if k not in NOT_SETTINGS}
        model = Path(self.cfg.model).expanduser()
        if model.is_dir():
            out["model"] = str(model.absolute())
        out["data"] = str(Path(self.cfg.data).expanduser().absolute())
        out["output"], out["work_dir"] = str(self.output.absolute()), str(self.work.absolute())
        return out

    def save_lora(self, layers) -> None:
        cfg = self.cfg
        extra = {
            "mflux.base_model": self.folder.name,
            "mflux.variant": self.folder.variant,
            "mflux.rank": str(cfg.rank),
            "mflux.alpha": str(cfg.alpha),
            "mflux.trigger": cfg.trigger or "",
            "mflux.targets": ",".join(cfg.targets),
            "mflux.steps": str(cfg.steps),
            "mflux.resolution": str(cfg.resolution),
            "mflux.quantized_base": str(cfg.quantize or ""),
        }
        meta = lora.peft_metadata(self.modules, cfg.rank, cfg.alpha, extra)
        atomic_save(self.output, lora.peft_tensors(layers), meta)

    def validate(self, flux, cache, step: int) -> Path:
        from mflux.train.encode import validation_image

        folder = self.work / "validation"
        folder.mkdir(exist_ok=True)
        image = validation_image(
            flux,
            self.folder,
            cache["validation_txt"][:1],
            cache["validation_pooled"][:1],
            self.cfg.resolution,
            self.cfg.seed,
            self.dtype,
            self.cfg.guidance,
        )
        path = folder / f"step-{step:06d}.png"
        atomic_png(path, image)
        self.validation_images.append(path)
        return path


def make_step(
    flux,
    optimizer,
    cache: dict,
    scheduler: dict,
    resolution: int,
    batch: int,
    guidance: float = DEV_GUIDANCE,
    checkpoint: bool = True,
    max_grad_norm: float = 1.0,
    group=None,
):
    """One compiled training step: (key, batch indices) -> (loss, next key). The model's and the
    optimizer's state are the compiled function's inputs and outputs, so it updates them in place.
    `cache` holds the encoded examples (see encode_dataset); `scheduler` is the model's config.

    With a `group` of N ranks this rank trains on its batch/N rows of the batch one process would
    draw; the gradients and the loss are averaged over the ranks (each is a mean over equal rows)."""
    latents, txt, pooled, caption = cache["latents"], cache["txt"], cache["pooled"], cache["caption"]
    n, rank = (group.size(), group.rank()) if group else (1, 0)
    rows = batch // n
    mine = slice(rank * rows, (rank + 1) * rows)  # this rank's rows of the batch
    table = training_sigmas(scheduler)
    img_ids = mx.broadcast_to(sampler.image_ids(resolution, resolution), (rows, latents.shape[1], 3))
    txt_ids = mx.broadcast_to(sampler.text_ids(txt.shape[1]), (rows, txt.shape[1], 3))
    pe = flux.positions(img_ids, txt_ids)
    g = mx.full((rows,), guidance, dtype=mx.float32) if flux.params.guidance_embed else None
    loss_and_grad = nn.value_and_grad(flux, flow_loss)
    state = [flux.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(key, idx):
        key, k_noise, k_sigma = mx.random.split(key, 3)
        # the whole batch's noise and sigmas, as one process draws them, then this rank's rows
        noise = mx.random.normal((batch, *latents.shape[1:]), key=k_noise)[mine]
        sigma, timestep = (t[mine] for t in sample_sigmas(k_sigma, batch, table))
        idx = idx[mine]
        x0, text = latents[idx], caption[idx]
        loss, grads = loss_and_grad(
            flux, x0, noise, sigma, timestep, txt[text], pooled[text], pe, g, checkpoint
        )
        if n > 1:
            grads = average_gradients(grads, group)
            loss = mx.distributed.all_sum(loss, group=group) / n
        grads, _ = optim.clip_grad_norm(grads, max_grad_norm)  # the global norm, after averaging
        optimizer.update(flux, grads)
        return loss, key

    def traced_with_ops(key, idx):
        cuda = device.cuda()
        if not cuda:
            return step(key, idx)
        with cuda.kernels.off():  # full-size gradients through the glue kernels are not finite (yet)
            return step(key, idx)

    return traced_with_ops


class BatchOrder:
    """Which examples make step n's batch: a fresh permutation per epoch from (seed, epoch), so the
    order is a function of the step alone and a resumed run sees the same batches."""

    def __init__(self, count: int, batch: int, seed: int):
        self.count, self.batch, self.seed = count, batch, seed

    def indices(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch, (step + 1) * self.batch):
            epoch, i = divmod(pos, self.count)
            out.append(int(np.random.default_rng([self.seed, epoch]).permutation(self.count)[i]))
        return out


class Stopped(CtrlC):
    """Ctrl-C stopped the run after saving a checkpoint, and rank 0 said where (the message): the
    command exits 130 without a line of its own. A KeyboardInterrupt, as Ctrl-C is to a Python caller."""


class StopOnInterrupt:
    """Ctrl-C sets a flag that the loop reads after the current step, so the checkpoint it then saves
    holds a whole step (an interrupt inside a step could leave the state half-updated)."""

    def __init__(self):
        self.stopped = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._stop)
        return self

    def _stop(self, signum, frame):
        if self.stopped:  # a second Ctrl-C stops at once (CtrlC: why not a plain KeyboardInterrupt)
            raise CtrlC
        self.stopped = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class LossLog:
    """loss.jsonl, one line per step; a resumed run drops lines past its checkpoint first."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        rows = [r for r in read_log(path) if r["step"] <= start_step]
        atomic_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, step: int, loss: float, seconds: float, peak: int) -> None:
        row = {"step": step, "loss": loss, "seconds": round(seconds, 4), "peak_gb": round(peak / 1e9, 3)}
        with write_errors(self.path), self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_log(path: Path) -> list[dict]:
    """The loss log's rows; a line torn by a crash mid-append is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _write_quietly(path: Path, text: str) -> None:
    """A marker: a cache that can't be written only means the notice comes again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_text(path, text)
    except (OSError, MfluxError):
        pass


def _progress(cfg: TrainConfig, start: int, lead: bool = True):
    """The steps as rank 0 reports them with `progress`: a bar on a terminal; off one (a pipe, a log),
    where a bar's carriage returns pile up on one line, a line every few steps (_StepLines)."""
    if not (cfg.progress and lead):
        return _StepLines(cfg.steps, start, quiet=True)
    if not sys.stderr.isatty():
        return _StepLines(cfg.steps, start)
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, desc="train")


class _StepLines:
    """The bar's stand-in off a terminal, with the calls the loop makes on a tqdm bar: a line
    `step 50/1000, loss 0.1234, 1.21 s/step` every `every` steps and at the last."""

    def __init__(self, total: int, start: int, quiet: bool = False):
        self.total, self.step, self.quiet, self.loss = total, start, quiet, "?"
        self.every = max(1, total // 20)  # about 20 lines a run, however long
        self.since, self.started = start, time.perf_counter()

    def set_postfix(self, loss: str) -> None:
        self.loss = loss

    def update(self, n: int) -> None:
        self.step += n
        if self.step % self.every and self.step != self.total:
            return
        per_step = (time.perf_counter() - self.started) / max(self.step - self.since, 1)
        self.write(f"step {self.step}/{self.total}, loss {self.loss}, {per_step:.2f} s/step")
        self.since, self.started = self.step, time.perf_counter()

    def write(self, line: str, file=None) -> None:
        if not self.quiet:
            print(line, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        pass


# --- files ---


def find_checkpoint(resume: str) -> Path:
    path = Path(resume).expanduser()
    if path.is_dir():
        found = sorted((path / "checkpoints").glob("step-*.safetensors")) or sorted(
            path.glob("step-*.safetensors")
        )
        if not found:
            raise MfluxError(f"{path}: no checkpoints (step-*.safetensors) to resume from")
        return found[-1]
    if not path.is_file():
        raise MfluxError(f"{path}: no such checkpoint (give a step-*.safetensors or a run's work folder)")
    return path


def _checkpoint_meta(path: Path) -> dict:
    from mflux.runtime.weights import SafetensorsFile

    return dict(SafetensorsFile(path).metadata)  # the header only; MfluxError for a bad file


def recorded_settings(path: Path, meta: dict) -> dict:
    """The settings a checkpoint records (TrainConfig's fields), after checking it is one this mflux
    reads: one line for a file that is not a checkpoint, or one from a newer mflux."""
    if meta.get("kind") != CHECKPOINT_KIND:
        raise MfluxError(
            f"{path}: not an mflux training checkpoint (a LoRA? resume takes step-*.safetensors)"
        )
    version = meta.get("format_version", "0")  # unversioned: written before format 1
    if not version.isdigit() or int(version) > CHECKPOINT_FORMAT:
        raise MfluxError(
            f"{path}: checkpoint format {version}, newer than this mflux reads ({CHECKPOINT_FORMAT}); "
            "resume it with the mflux that wrote it, or upgrade: pip install -U mflux"
        )
    try:
        saved = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError:
        saved = {}
    known = {f.name for f in fields(TrainConfig)} - NOT_SETTINGS
    return {k: v for k, v in saved.items() if k in known} if isinstance(saved, dict) else {}


def check_checkpoint(path: Path, base_model: str, cfg: TrainConfig) -> None:
    """Refuse a checkpoint of another base model, rank or targets, before anything is encoded."""
    meta = _checkpoint_meta(path)
    recorded_settings(path, meta)
    if meta["base_model"] != base_model:
        raise MfluxError(
            f"{path}: the checkpoint was trained on {meta['base_model']!r}, not {base_model!r} "
            "(leave --model out: a resumed run keeps its model)"
        )
    if int(meta["rank"]) != cfg.rank:
        raise MfluxError(
            f"{path}: the checkpoint has rank {meta['rank']}, not {cfg.rank} (leave --rank out, or give "
            f"--rank {meta['rank']})"
        )
    targets = ",".join(json.loads(meta["targets"]))
    if json.loads(meta["targets"]) != cfg.targets:
        raise MfluxError(
            f"{path}: the checkpoint trains {targets}, not {','.join(cfg.targets)} (leave --targets out, "
            f"or give --targets {targets})"
        )
    if int(meta["step"]) > cfg.steps:
        raise MfluxError(f"{path}: the checkpoint is at step {meta['step']}, past --steps {cfg.steps}")


def load_checkpoint(path: Path, flux, optimizer) -> dict:
    arrays, meta = mx.load(str(path), return_metadata=True)
    return set_state(arrays, flux, optimizer) | {"step": int(meta["step"])}


def state_arrays(flux, optimizer, state: dict) -> dict[str, mx.array]:
    """What a checkpoint holds, by name: the LoRA, the optimizer's state and the random key."""
    arrays = {f"lora.{k}": v for k, v in tree_flatten(flux.trainable_parameters())}
    arrays |= {f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)}
    arrays["random.key"] = state["key"]
    return arrays


def set_state(arrays: dict[str, mx.array], flux, optimizer) -> dict:
    """state_arrays' inverse: the LoRA and optimizer state put back; returns {"key": the random key}."""
    params = [(k[len("lora.") :], v) for k, v in arrays.items() if k.startswith("lora.")]
    flux.update(tree_unflatten(params))
    opt = [(k[len("optimizer.") :], v) for k, v in arrays.items() if k.startswith("optimizer.")]
    optimizer.state = tree_unflatten(opt)
    mx.eval(flux.trainable_parameters(), optimizer.state)
    return {"key": arrays["random.key"]}


def read_config_file(path: str | Path) -> dict:
    """A run's options from TOML or JSON: TrainConfig's names, with dashes or underscores."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MfluxError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
    except ValueError as e:
        raise MfluxError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({e})") from None
    if not isinstance(values, dict):
        raise MfluxError(f"{path}: the config must be a table of options")
    known = {f.name for f in fields(TrainConfig)} - {"progress"}
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            spelled = [c.replace("_", "-") if "-" in key else c for c in close]  # in the key's own style
            hint = f"did you mean {spelled[0]!r}? " if spelled else ""
            raise MfluxError(f"{path}: unknown option {key!r} ({hint}see: mflux train --help)")
        out[name] = value
    return _beside_config(out, path)


PATH_OPTIONS = ("model", "data", "resume", "output", "work_dir")
MUST_EXIST = ("model", "data", "resume")


def _beside_config(options: dict, config: Path) -> dict:
    """Paths in a config file are relative to the file's folder, as a --prompt-file's are, so a config
    works from any current folder. A path that only resolves relative to the current folder (how
    configs were read before) is refused with the fix, rather than quietly read from elsewhere."""
    here = config.absolute().parent
    for name in PATH_OPTIONS:
        value = options.get(name)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        given, beside = Path(value), here / value
        if name == "model" and not _names_a_path(value) and not beside.is_dir() and not given.is_dir():
            continue  # a store name
        if name in MUST_EXIST and not beside.exists() and given.exists():
            raise MfluxError(
                f"{config}: {name} = {value!r} is read relative to the config file's folder now, and "
                f"{beside} does not exist (write {name} = {json.dumps(str(given.absolute()))}, the path it "
                f"named relative to the current one, or a path relative to {here})"
            )
        options[name] = str(beside)
    return options


def _names_a_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith((".", "~"))


def summary(r: TrainResult) -> str:
    """The lines `mflux train` prints at the end: where the LoRA is, loss, speed, peak memory."""
    tenth = max(1, len(r.losses) // 10)
    first, last = r.losses[:tenth], r.losses[-tenth:]
    from mflux.store import format_size

    sizes = {phase: format_size(b) for phase, b in r.peak_memory.items()}
    if not r.encoded:
        sizes["encoding"] = "none (read from the cache)"
    peaks = ", ".join(f"{phase} {size}" for phase, size in sizes.items())
    over = f"; each batch over {r.ranks} ranks" if r.ranks > 1 else ""
    lines = [f"wrote {r.output} (step {r.steps}; work folder {r.work_dir}{over})"]
    if r.losses:
        lines.append(
            f"loss {sum(first) / len(first):.4f} -> {sum(last) / len(last):.4f} (mean of the first and last "
            f"{tenth} steps); {r.seconds_per_step:.3f} s/step ({1 / r.seconds_per_step:.2f} it/s)"
        )
    lines.append(f"peak memory: {peaks}")
    return "\n".join(lines)
