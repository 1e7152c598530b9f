"""What every dialect shares: the server's settings and limits, errors, model and LoRA names, image
decoding, and running a job to its end. Handlers call these; nothing here touches MLX."""

import asyncio
import base64
import binascii
import hashlib
import io
import json
import math
import os
import re
import secrets
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps
from pydantic import BaseModel

from mflux.errors import MfluxError
from mflux.flux1 import MAX_PIXELS, MAX_SEED, MAX_SIDE
from mflux.manifest import REDUX, not_a_pipeline
from mflux.runtime.folder import VARIANTS
from mflux.server.worker import (
    End,
    Job,
    LoadFailed,
    Models,
    QueueFull,
    Result,
    ShuttingDown,
    ThreadRunner,
    Worker,
    WorkerLost,
)
from mflux.settings import not_utf8

_LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]*")
_OUTPUT_NAME = re.compile(r"[A-Za-z0-9_-]{22}\.png")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what clients send; Pillow's other decoders are attack surface
# What a request with an image does, by the model's conditioning (VARIANTS[...].condition): kontext edits
# by instruction, fill inpaints (it needs a mask), schnell/dev/krea do img2img, or inpaint with a mask
EDITS = {"kontext": ("instruction",), "fill": ("inpaint",), "text": ("img2img", "inpaint")}


def draws(m) -> bool:
    """Whether a stored model can be listed as one to draw with: whole, and a FLUX.1 pipeline (not Redux,
    not a LoRA such as canny-lora, whose variant is the model it goes on)."""
    return not m.damaged and m.manifest.variant != REDUX and m.manifest.kind != "lora"


@dataclass
class Limits:
    """Every request limit, in one place; docs/serve.md's table lists them."""

    prompt_chars: int = 4000
    n: int = 10  # images per request (OpenAI's n; A1111's batch_size * n_iter)
    pixels: int = MAX_PIXELS  # width * height of one image: the engine's maximum
    side: int = MAX_SIDE  # and each side
    steps: int = 100
    body_bytes: int = 64 * 2**20  # a whole request body
    upload_bytes: int = 20 * 2**20  # one uploaded or base64-decoded image
    image_pixels: int = 4 * MAX_PIXELS  # an uploaded image's width * height, read from its header
    head_seconds: float = 10.0  # a request's line and headers, from the connection's start (or last reply)
    body_seconds: float = 120.0  # a request's body, from its head
    connections: int = 64  # open at once; past it, 503


@dataclass
class ServerSettings:
    model: str | None = None
    api_key: str | None = None
    lora_dir: Path | None = None
    output_dir: Path | None = None  # where response_format=url images go (a temporary folder if None)
    queue: int = 16
    timeout: float = 600.0
    # one worker process per entry, each seeing that CUDA device (None: sharing the host's one device);
    # empty: one worker thread in the server's own process. worker_devices() makes it from the flags.
    devices: tuple[str | None, ...] = ()
    limits: Limits = field(default_factory=Limits)
    # seconds the running jobs have to finish at SIGTERM or Ctrl-C before they are cancelled
    shutdown_grace: float = 20.0
    # without an API key, the Host names served besides loopback's and IP addresses (DNS rebinding)
    allowed_hosts: tuple[str, ...] = ()
    low_memory: bool = False  # each worker's Flux1 loads one component at a time (Flux1's low_memory)


def worker_devices(workers: int | None, devices: tuple[int, ...] | None, gpus: int) -> tuple[str | None, ...]:
    """`ServerSettings.devices` from `--workers` and `--devices`, given the host's CUDA GPUs (0 without
    CUDA): each listed GPU gets a worker (a GPU listed twice, two); `--workers N` alone is GPUs 0..N-1
    on CUDA, and N processes sharing the one device elsewhere; neither is the in-process worker thread."""
    if workers is not None and workers < 1:
        raise MfluxError(f"--workers must be at least 1, got {workers}")
    if devices:
        listed = ",".join(map(str, devices))
        if not gpus:
            raise MfluxError(
                f"--devices {listed} names CUDA GPUs, and MLX here has no CUDA GPU "
                "(on a CPU or a Mac, --workers N starts N worker processes sharing the one device)"
            )
        if workers is not None and workers != len(devices):
            raise MfluxError(
                f"--workers {workers} and --devices {listed} disagree: --devices starts one worker per GPU "
                "listed (list a GPU twice for two workers on it); give one of them"
            )
        bad = [d for d in devices if d >= gpus]
        if bad:
            raise MfluxError(f"--devices {listed}: this host has {gpus} CUDA GPU(s), numbered 0..{gpus - 1}")
        return tuple(str(d) for d in devices)
    if workers is None or workers == 1:
        return ()
    if not gpus:
        return (None,) * workers
    if workers > gpus:
        raise MfluxError(
            f"--workers {workers} puts one worker on each of CUDA GPUs 0..{workers - 1}, but this host has "
            f"{gpus} (list them with --devices to put several workers on a GPU, e.g. --devices 0,0,1,1)"
        )
    return tuple(str(d) for d in range(workers))


def cuda_gpus() -> int:
    """The CUDA GPUs MLX sees (0 on a CPU or a Mac): the parent counts them; it runs nothing on them."""
    from mflux.backend import import_mlx

    mx = import_mlx()
    return mx.device_count(mx.gpu) if mx.cuda.is_available() else 0


class ApiError(Exception):
    """A request the server refuses: the status, one line, and OpenAI's `type`/`param`/`code`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )


class Server:
    """The state behind every route: settings, the store and the worker (the queue and its runners)."""

    def __init__(self, settings: ServerSettings, loader=None):
        from mflux.store import Store

        self.settings = settings
        self.limits = settings.limits
        self.store = Store()
        self.worker = Worker(_runners(settings, loader), settings.model, settings.queue)
        self.output_dir = settings.output_dir
        self.a1111_options: dict = {}  # what POST /sdapi/v1/options set that mflux acts on (live previews)

    # --- names ----------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """The usable models: a damaged one (a file missing or of the wrong size) is left out of every list."""
        return [m.name for m in self.store.list() if draws(m)]

    def check_model(self, name: str | None, param: str = "model") -> str | None:
        """A store name (or `<name>-q<bits>` of one), or 404 naming the choices. None: the loaded model."""
        if name in (None, ""):
            if self.worker.model_name is None:
                raise ApiError(
                    400, f"no model is loaded; name one of: {', '.join(self.model_names())}", param
                )
            return None
        from mflux.store import NotStored, validate_name

        try:
            validate_name(name)
        except MfluxError:
            pass  # an invalid store name is just an unknown model here
        else:
            try:
                found = self.store.resolve(name)  # bits mflux cannot make: that error (400)
            except NotStored:
                pass
            else:
                stored = self.store.get(found.name)
                if stored.manifest.variant == REDUX:  # an image encoder for --redux: nothing to draw with
                    raise ApiError(400, str(not_a_pipeline(found.name)), param)
                if stored.damaged:  # the server's files are at fault, not the request
                    raise ApiError(503, stored.damage_hint(), param, "model_unavailable")
                return name
        choices = ", ".join(self.model_names()) or "none (add one with: mflux pull schnell)"
        raise ApiError(404, f"unknown model {name!r} (the store has: {choices})", param, "model_not_found")

    def model_variant(self, name: str | None) -> str | None:
        """The variant of a store model (`<name>-q<bits>` is its base's), or of the model a job that names
        none gets; None when there is none or it is not in the store."""
        name = name or self.worker.model_name
        if name is None:
            return None
        try:
            return self.store.get(self.store.resolve(name).name).manifest.variant
        except MfluxError:
            return None

    def model_info(self, variant: str) -> dict:
        """What /v1/models and /sdapi/v1/sd-models add to a model's entry: its variant and the edits it makes."""
        return {"variant": variant, "edits": list(EDITS[VARIANTS[variant].condition])}

    def edit_mode(self, model: str | None, mask: bool, param: str = "mask") -> str:
        """What a request with an image (and a mask, or not) does on `model` (None: the current one):
        "instruction", "inpaint" or "img2img"; 400 where the model can't, before anything is decoded."""
        condition, name = self._condition(model), model or self.worker.model_name
        if condition == "kontext" and mask:
            raise ApiError(
                400,
                f"{name} is a kontext model: it edits by instruction and takes no mask "
                "(drop the mask, or use a fill model to inpaint)",
                param,
            )
        if condition == "fill" and not mask:
            raise ApiError(
                400,
                f"{name} is a fill model: it needs a mask (white repaints), or use a kontext model to edit "
                "by instruction",
                param,
            )
        if condition == "kontext":
            return "instruction"
        return "inpaint" if mask else "img2img"

    def check_text_only(self, model: str | None, param: str = "model") -> None:
        """A request without an image: 400 on a fill model, which has nothing to repaint, before its load."""
        if self._condition(model) == "fill":
            raise ApiError(
                400,
                f"{model or self.worker.model_name} is a fill model: it repaints the masked area of an image "
                "(send an image and a mask, or pick another model)",
                param,
            )

    def _condition(self, model: str | None) -> str:
        variant = self.model_variant(model)
        return VARIANTS[variant].condition if variant in VARIANTS else "text"

    def model_hash(self, name: str) -> str:
        """A short hash of the model's files, for A1111's checkpoint titles."""
        files = self.store.get(name).manifest.files
        return hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()[:10]

    def lora_files(self) -> dict[str, Path]:
        d = self.settings.lora_dir
        if d is None or not d.is_dir():
            return {}
        return {p.stem: p for p in sorted(d.glob("*.safetensors")) if p.is_file()}

    def resolve_loras(self, loras, param: str = "loras") -> tuple[tuple[str, float], ...]:
        """[(name, scale)] -> [(path, scale)], by name inside --lora-dir only: never a client's path."""
        out = []
        for name, scale in loras or ():
            if not isinstance(name, str) or not _LORA_NAME.fullmatch(name) or ".." in name:
                raise ApiError(
                    400, f"invalid LoRA name {name!r} (a file name from GET /sdapi/v1/loras, no path)", param
                )
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                scale = math.nan
            if not math.isfinite(scale):
                raise ApiError(400, f"the scale of LoRA {name!r} must be a finite number", param)
            files = self.lora_files()
            path = files.get(name.removesuffix(".safetensors"))
            if path is None:
                known = ", ".join(files) or "none (start the server with --lora-dir DIR)"
                raise ApiError(404, f"unknown LoRA {name!r} (available: {known})", param, "lora_not_found")
            out.append((str(path), scale))
        return tuple(out)

    # --- inputs ---------------------------------------------------------------------------------------
    def check_prompt(self, prompt, param: str = "prompt", empty_ok: bool = False) -> str:
        if not isinstance(prompt, str) or (not empty_ok and not prompt.strip()):
            raise ApiError(400, f"{param} must be a non-empty string", param)
        bad = not_utf8(prompt)
        if bad:
            raise ApiError(400, f"{param} is not valid text: {bad} (send UTF-8 text)", param)
        if len(prompt) > self.limits.prompt_chars:
            raise ApiError(
                400, f"{param} is {len(prompt)} characters; the limit is {self.limits.prompt_chars}", param
            )
        return prompt

    def check_size(self, width: int, height: int, param: str = "size") -> tuple[int, int]:
        lim = self.limits
        for side in (width, height):
            if side <= 0 or side % 16:
                raise ApiError(
                    400, f"width and height must be positive multiples of 16, got {width}x{height}", param
                )
            if side > lim.side:
                raise ApiError(400, f"{width}x{height} is too large: each side is at most {lim.side}", param)
        if width * height > lim.pixels:
            raise ApiError(400, f"{width}x{height} is too large: at most {lim.pixels} pixels an image", param)
        return width, height

    def check_steps(self, steps: int | None, param: str = "steps") -> int | None:
        if steps is not None and not 1 <= steps <= self.limits.steps:
            raise ApiError(400, f"steps must be in 1..{self.limits.steps}, got {steps}", param)
        return steps

    def check_count(self, n: int, param: str = "n") -> int:
        if not 1 <= n <= self.limits.n:
            raise ApiError(400, f"{param} must be in 1..{self.limits.n} images a request, got {n}", param)
        return n

    def decode_image(self, data: str | bytes, param: str) -> Image.Image:
        """An uploaded image (bytes) or a base64 string, raw or as a data URL, checked and fully read: the
        one decoder of every route that takes an image. It takes seconds on a large image, so handlers
        call it (and resize or blur its result) in a thread, through `off_loop`, never on the event loop."""
        if _on_event_loop():
            raise RuntimeError("decode_image would block the event loop: call it through off_loop")
        if isinstance(data, str):
            text = data.partition(",")[2] if data.startswith("data:") else data
            if len(text) > self.limits.upload_bytes * 4 // 3 + 4:
                raise ApiError(
                    413, f"{param} is larger than the {_mib(self.limits.upload_bytes)} upload limit", param
                )
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(
                    400, f"{param} is not valid base64 (send raw base64 or a data: URL)", param
                ) from None
        if len(data) > self.limits.upload_bytes:
            raise ApiError(
                413, f"{param} is larger than the {_mib(self.limits.upload_bytes)} upload limit", param
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # no other decoder
                if image.width * image.height > self.limits.image_pixels:  # known from the header alone
                    raise ApiError(
                        400,
                        f"{param} is {image.width}x{image.height}: at most {self.limits.image_pixels} pixels "
                        "(scale it down first)",
                        param,
                    )
                image.load()
                return ImageOps.exif_transpose(image)  # inside: a garbage EXIF block raises as PIL reads it
        except ApiError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # PIL's own cap, far larger
            raise ApiError(
                400, f"{param} has more than {self.limits.image_pixels} pixels (scale it down first)", param
            ) from None
        except Exception:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
            raise ApiError(
                400, f"{param} is not an image this server reads (send a PNG, JPEG or WebP)", param
            ) from None

    # --- running --------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        job.timeout = self.settings.timeout
        try:
            return self.worker.submit(job)
        except ShuttingDown as e:
            raise ApiError(503, str(e), code="shutting_down") from None
        except QueueFull as e:
            raise ApiError(
                429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}
            ) from None

    async def run(self, job: Job, request=None) -> tuple[list[Result], End]:
        """Submit `job` and wait for its end; the images in seed order. The job is cancelled when the
        client of `request` goes away, or when the wait outlives the timeout (a load that never returns;
        the worker itself ends a job past its timeout at its next step)."""
        self.submit(job)

        async def collect():
            results = []
            async for event in job.events():
                if isinstance(event, Result):
                    results.append(event)
            return sorted(results, key=lambda r: r.index), event

        waiting = asyncio.ensure_future(collect())
        deadline = time.monotonic() + self.settings.timeout + 30
        try:
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=0.25)
                if request is not None and not waiting.done() and await request.is_disconnected():
                    raise ApiError(499, "the client closed the connection", code="cancelled")
                if time.monotonic() > deadline:
                    raise ApiError(
                        504, f"the request timed out after {self.settings.timeout:g} s", code="timeout"
                    )
            results, end = waiting.result()
        finally:
            waiting.cancel()
            if job.status in ("queued", "running"):
                self.worker.cancel(job.id)
        raise_for(end, self.settings.timeout)
        return results, end

    def save_output(self, png: bytes) -> str:
        """Write a PNG under a random name in the output folder; returns the name."""
        name = secrets.token_urlsafe(16) + ".png"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.output_dir / f".{name}.tmp"
        try:
            tmp.write_bytes(png)
            os.replace(tmp, self.output_dir / name)
        except OSError:
            tmp.unlink(missing_ok=True)  # nothing half-written is left to serve
            raise
        return name

    def output_path(self, name: str) -> Path | None:
        if not _OUTPUT_NAME.fullmatch(name):
            return None
        path = self.output_dir / name
        return path if path.is_file() else None


def _runners(settings: ServerSettings, loader) -> list:
    """One worker thread here (`loader(name, loras)` replaces Flux1.from_name: tests only), or one
    process per entry of `settings.devices`."""
    if not settings.devices:
        return [ThreadRunner(Models(loader, low_memory=settings.low_memory))]
    from mflux.server.process import ProcessRunner

    return [ProcessRunner(i, device, settings.low_memory) for i, device in enumerate(settings.devices)]


def end_error(end: End, timeout: float) -> ApiError | None:
    """What a client is told about a job that did not end well; None for one that did."""
    if end.status == "ok":
        return None
    if end.status == "cancelled":
        return ApiError(500, "the request was cancelled on the server", code="cancelled")
    if end.status == "shutdown":
        return ApiError(503, str(ShuttingDown()), code="shutting_down")
    if end.status == "timeout":  # its error, if any, says its hung worker was killed (WorkerHung)
        message = f"the request timed out after {timeout:g} s (queued and generating)"
        return ApiError(504, f"{message}; {end.error}" if end.error else message, code="timeout")
    e = end.error
    if isinstance(e, ApiError):
        return e
    if isinstance(e, WorkerLost):
        return ApiError(500, str(e), code="worker_died")
    if isinstance(e, LoadFailed) and not e.lora:
        return ApiError(503, str(e), code="model_unavailable")  # the server's files, not the request
    if isinstance(e, MfluxError):
        return ApiError(400, str(e))
    return ApiError(500, "the generation failed on the server (see its log)", code="server_error")


def raise_for(end: End, timeout: float) -> None:
    """Raise a timed-out or failed end as its ApiError; a cancelled job's caller decides for itself."""
    e = end_error(end, timeout)
    if e is not None and end.status != "cancelled":
        raise e


def utf8_text(model):
    """A request model whose every string (in lists, dicts and nested models too) UTF-8 can write, else
    ValueError (a 400 in the dialect's shape): a lone surrogate ("\\ud800" in JSON) breaks the tokenizer,
    the PNG's text and the reply's JSON, which echoes fields, after the images were made."""
    for name, value in model:
        bad = _bad_text(value)
        if bad:
            raise ValueError(f"{name} is not valid text: {bad} (send UTF-8 text)")
    return model


def _bad_text(value) -> str | None:
    if isinstance(value, str):
        return not_utf8(value)
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    elif isinstance(value, BaseModel):  # a nested request model (a LoRA choice)
        value = [v for _, v in value]
    if isinstance(value, list | tuple):
        return next(filter(None, map(_bad_text, value)), None)
    return None


def check_mask_size(mask: Image.Image, image: Image.Image) -> None:
    """A mask sent beside an image must be its size: scaling one would shift what it marks."""
    if mask.size != image.size:
        raise ApiError(
            400,
            f"mask is {mask.width}x{mask.height} but image is {image.width}x{image.height}; they must match",
            "mask",
        )


def sse(event: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def random_seed() -> int:
    # 32 bits, as A1111 draws them: they fit every client's integers, JavaScript's included
    return secrets.randbelow(2**32)


def seed_run(first: int | None, n: int, param: str = "seed") -> list[int]:
    """`n` seeds from `first` (None: random), one more each image, as A1111 numbers a batch."""
    first = random_seed() if first is None else check_seed(first, param)
    check_seed(first + n - 1, param)  # the last image's seed fits too
    return [first + i for i in range(n)]


def check_seed(seed: int, param: str = "seed") -> int:
    if not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"seed must be in 0..{MAX_SEED} (or -1 for random), got {seed}", param)
    return seed


async def off_loop(work, *args):
    """`work(*args)` in a worker thread: image decoding, resizing and blurring, which would stall every
    other request (and /health) for seconds if run on the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(work, *args)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"
