"""The one worker that owns the model and the device, and the bounded FIFO queue that feeds it.

HTTP handlers build a `Job`, `submit` it and await its events; only the worker thread touches `Flux1` and
MLX. Each job's events (steps, previews, images, the end) are handed to the handler's event loop with
`call_soon_threadsafe`, so a slow client never blocks the worker and the worker never blocks a handler.
"""

import asyncio
import collections
import gc
import io
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field

from PIL import Image

from mflux.errors import InvalidArgument, MfluxError

log = logging.getLogger("mflux.server")

DEFAULT_QUEUE = 16  # jobs waiting (not counting the one running); past it, 429 with Retry-After
DEFAULT_TIMEOUT = 600.0  # seconds from submission to the last image, queued time included


class QueueFull(MfluxError):
    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"the queue is full ({limit} jobs waiting; retry after {retry_after} s)")
        self.retry_after = retry_after


@dataclass
class Step:
    step: int
    total: int
    preview: bytes | None  # PNG of the first image of the batch at this step, when asked for


@dataclass
class Result:
    index: int
    seed: int
    png: bytes  # PNG with mflux's tags and the A1111 `parameters` text
    metadata: dict


@dataclass
class End:
    status: str  # "ok", "cancelled", "timeout", "error"
    error: Exception | None = None


@dataclass
class Job:
    """One request's work: `seeds` images of one prompt and settings, or (`load_only`) a model switch."""

    prompt: str = ""
    seeds: list[int] = field(default_factory=list)
    model: str | None = None  # a store name; None: the model loaded now (or the server's default)
    width: int = 1024
    height: int = 1024
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None  # white is repainted
    strength: float | None = None
    loras: tuple[tuple[str, float], ...] = ()  # (path, scale), already resolved inside --lora-dir
    partial_images: int = 0  # this many step previews, evenly spaced (OpenAI's partial_images)
    every_preview: bool = False  # a preview at every step (the web UI)
    load_only: bool = False
    timeout: float = DEFAULT_TIMEOUT
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    submitted: float = 0.0
    started: float | None = None
    finished: float | None = None
    status: str = "queued"
    cancelled: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _events: asyncio.Queue | None = None

    async def events(self):
        """The job's events in order, ending with its `End`."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, End):
                return

    def _emit(self, event) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            pass  # the handler's loop has closed (server shutting down): nobody is waiting


class Models:
    """The one loaded model: switching frees the old one before loading the next, so two never share memory."""

    def __init__(self, default: str | None = None, loader=None):
        self.default = default
        self.flux = None
        self.key: tuple | None = None  # (name, loras) of the loaded model
        self._loader = loader or _load_flux

    @property
    def name(self) -> str | None:
        return self.key[0] if self.key else self.default

    def get(self, name: str | None, loras: tuple = ()):
        name = name or self.name
        if name is None:
            raise InvalidArgument("no model is loaded (start with --model NAME, or name one in the request)")
        key = (name, tuple(loras))
        if key != self.key:
            self.flux = self.key = None
            gc.collect()
            _clear_cache()
            self.flux = self._loader(name, loras)
            self.key = key
        return self.flux


def _load_flux(name: str, loras: tuple):
    from mflux.flux1 import Flux1

    flux = Flux1.from_name(name, lora_paths=[p for p, _ in loras], lora_scales=[s for _, s in loras])
    flux.load()  # the transformer and the VAE now, not in the first request (T5 and CLIP load with it)
    return flux


def _clear_cache() -> None:
    import mlx.core as mx

    mx.clear_cache()


class Worker:
    def __init__(self, models: Models, max_queue: int = DEFAULT_QUEUE):
        self.models = models
        self.max_queue = max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.current: Job | None = None
        self.step = (0, 0)  # (step, total) of the running job, across all its images
        self.preview: bytes | None = None  # the latest step preview (PNG)
        self._seconds_per_job = 10.0  # running mean, for Retry-After
        self.backend: str | None = None  # the MLX device, once the worker has started

    # --- the handlers' side -------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue `job` (FIFO); its events go to the calling event loop. Raises QueueFull past the limit."""
        job._loop = asyncio.get_running_loop()
        job._events = asyncio.Queue()
        with self._cond:
            if len(self._queue) >= self.max_queue:
                self._log(job, "rejected", 0.0, 0.0, "queue full")
                raise QueueFull(self.max_queue, self.retry_after())
            job.submitted = time.monotonic()
            self._queue.append(job)
            self._cond.notify()
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if no such job is waiting or running."""
        with self._cond:
            for job in self._queue:
                if job.id == job_id:
                    self._queue.remove(job)
                    job.cancelled.set()
                    self._finish(job, End("cancelled"))
                    return True
            if self.current and self.current.id == job_id:
                self.current.cancelled.set()
                return True
        return False

    def interrupt(self) -> bool:
        """Cancel the running job (A1111's interrupt)."""
        job = self.current
        if job is None:
            return False
        job.cancelled.set()
        return True

    def job_count(self) -> int:
        with self._cond:
            return len(self._queue) + (self.current is not None)

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def retry_after(self) -> int:
        return max(1, round(self._seconds_per_job))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mflux-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for job in self._queue:
                job.cancelled.set()
                self._finish(job, End("cancelled"))
            self._queue.clear()
            if self.current:
                self.current.cancelled.set()
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout=30)

    # --- the worker thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        import mlx.core as mx

        self.backend = mx.default_device().type.name  # "cpu" or "gpu"
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self.current = job
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.current = None
                    self.step = (0, 0)

    def _run(self, job: Job) -> None:
        job.started = time.monotonic()
        job.status = "running"
        self.preview = None  # never show one job's preview as another's
        if job.started - job.submitted > job.timeout:
            return self._finish(job, End("timeout"))
        try:
            flux = self.models.get(job.model, job.loras)
            if not job.load_only:
                self._generate(flux, job)
        except Exception as e:  # noqa: BLE001 - the job ends with its error, the worker keeps serving
            if not isinstance(e, MfluxError):
                log.exception("job %s failed", job.id)
            return self._finish(job, End("error", e))
        if job.cancelled.is_set():
            return self._finish(job, End("cancelled"))
        if time.monotonic() - job.submitted > job.timeout:
            return self._finish(job, End("timeout"))
        self._finish(job, End("ok"))

    def _generate(self, flux, job: Job) -> None:
        from mflux.flux1 import Config

        config = Config(num_inference_steps=job.steps, height=job.height, width=job.width)
        if job.guidance is not None:
            config.guidance = job.guidance
        steps = job.steps or flux.folder.defaults["steps"]
        total_steps = steps * len(job.seeds)
        previews = job.every_preview or (
            preview_steps(job.partial_images, steps) if job.partial_images else False
        )
        done = 0
        events = _events(flux, job, config, previews)
        try:
            for event in events:
                if job.cancelled.is_set() or time.monotonic() - job.submitted > job.timeout:
                    break
                if isinstance(event, Step):
                    done += 1
                    self.step = (done, total_steps)
                    if event.preview:
                        self.preview = event.preview
                job._emit(event)
        finally:
            events.close()  # stops the engine: the rest of the batch is never computed

    def _finish(self, job: Job, end: End) -> None:
        job.finished = time.monotonic()
        job.status = end.status
        started = job.started or job.finished
        if job.status == "ok" and not job.load_only:
            n = 0.8 * self._seconds_per_job + 0.2 * (job.finished - started)
            self._seconds_per_job = n
        self._log(job, end.status, started - job.submitted, job.finished - started, end.error)
        job._emit(end)

    def _log(self, job: Job, status: str, queued: float, generating: float, error=None) -> None:
        """The one line per request."""
        if job.load_only:
            log.info(
                "load model=%s seconds=%.2f status=%s%s",
                job.model,
                generating,
                status,
                f" error={error}" if error else "",
            )
            return
        log.info(
            "%s model=%s size=%dx%d steps=%s images=%d queued=%.2fs generating=%.2fs status=%s%s",
            "load" if job.load_only else "generate",
            job.model or self.models.name,
            job.width,
            job.height,
            job.steps or "default",
            len(job.seeds),
            queued,
            generating,
            status,
            f" error={error}" if error else "",
        )


def preview_steps(partial_images: int, steps: int) -> frozenset[int]:
    """`partial_images` step numbers spread evenly over `steps` (fewer when there are fewer steps)."""
    k = partial_images
    return frozenset(min(steps, math.ceil(i * steps / (k + 1))) for i in range(1, k + 1))


def _events(flux, job: Job, config, previews):
    """The engine's events for `job` as the worker's Step and Result, PNGs encoded here on the worker."""
    from mflux.flux1 import ImageEvent

    stream = flux.generate(
        job.seeds,
        job.prompt,
        config,
        negative_prompt=job.negative_prompt,
        true_cfg_scale=job.true_cfg_scale,
        image=job.image,
        mask_image=job.mask,
        strength=job.strength,
        previews=previews,
    )
    try:
        for event in stream:
            if isinstance(event, ImageEvent):
                g = event.image
                yield Result(event.index, job.seeds[event.index], g.png_bytes(), g.metadata)
            else:
                preview = event.previews[0] if event.previews else None
                yield Step(event.step, event.total, _png(preview) if preview is not None else None)
    finally:
        stream.close()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
