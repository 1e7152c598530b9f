"""The bounded FIFO queue, and the runners that take jobs from it: the only code that touches Flux1 and MLX.

HTTP handlers build a `Job`, `submit` it and await its events. Each runner has a thread of this process that
takes the next job and runs it: `ThreadRunner` on a model in this process (`mflux serve`'s default), or
`mflux.server.process.ProcessRunner` in a worker process of its own, one per device (`--workers`,
`--devices`). Each job's events (steps, previews, images, the end) are handed to the handler's event loop
with `call_soon_threadsafe`, so a slow client never blocks a runner and a runner never blocks a handler.
"""

import asyncio
import collections
import gc
import io
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field, fields
from functools import partial

from PIL import Image

from mflux.errors import InvalidArgument, MfluxError

log = logging.getLogger("mflux.server")

DEFAULT_QUEUE = 16  # jobs waiting (not counting the running ones); past it, 429 with Retry-After
DEFAULT_TIMEOUT = 600.0  # seconds from submission to the last image, queued time included
STOP_GRACE = 10.0  # seconds a running job has to stop at shutdown before its worker process is ended
# A job that wants previews at no stated stride gets about this many an image: each is a VAE decode and a
# PNG, and one at every step made a 20-step CPU job crawl
PREVIEWS_PER_IMAGE = 5


class QueueFull(MfluxError):
    def __init__(self, limit: int, retry_after: int):
        jobs = "1 job" if limit == 1 else f"{limit} jobs"
        super().__init__(f"the queue is full ({jobs} waiting; retry after {retry_after} s)")
        self.retry_after = retry_after


class LoadFailed(MfluxError):
    """A model that could not be loaded: the server's files are at fault (503), not the request; `lora`
    when the error is a LoRA's, which the request chose (400)."""

    def __init__(self, message: str, lora: bool = False):
        super().__init__(message)
        self.lora = lora


def load_failed(name: str, loras: tuple, e: Exception) -> LoadFailed:
    """`e`, raised loading `name` with `loras`, as the line a client gets: a LoRA by its file name and a
    model's file by its path in the store, since a client must not learn the server's folders."""
    from mflux.store import store_root

    if not isinstance(e, MfluxError):
        log.error("loading model %s failed", name, exc_info=e)
        return LoadFailed(f"model {name} could not be loaded (see the server's log)")
    message, lora = str(e), False
    for path, _ in loras:
        lora = lora or path in message
        message = message.replace(path, os.path.basename(path))
    message = message.replace(f"{store_root()}{os.sep}", "")
    return LoadFailed(message if lora else f"model {name} could not be loaded: {message}", lora)


class ShuttingDown(MfluxError):
    def __init__(self):
        super().__init__("the server is shutting down (retry when it is back)")


class WorkerLost(Exception):
    """A worker process died (a crash, an out-of-memory kill) or could not start; the runner restarts it."""


class WorkerHung(WorkerLost):
    """A worker process that did not stop a job past its timeout in time: killed, and restarted like a
    dead one; the job ends as timed out."""


class NotTaken(WorkerLost):
    """A worker process that did not take a job handed to it (hung while idle, killed; or gone): restarted,
    and the job goes back to the front of the queue for the next free runner."""


@dataclass
class Queued:
    position: int  # in the queue: 1 is the next job a runner takes


@dataclass
class Started:
    """A runner took the job: it switches model if it must, encodes the prompt, then sends its steps."""


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
class Loaded:
    key: tuple  # (name, loras) of the model the runner now holds


@dataclass
class End:
    status: str  # "ok", "cancelled", "timeout", "error", "shutdown" (still queued when the server stopped)
    error: Exception | None = None


@dataclass
class JobParams:
    """What a job asks for, as plain picklable data: all that a worker process is sent."""

    prompt: str = ""
    seeds: list[int] = field(default_factory=list)
    model: str | None = None  # a store name; None: the server's current model (set as a runner takes it)
    width: int = 1024
    height: int = 1024
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None  # white is repainted
    strength: float | None = None  # None: the variant's default (img2img 0.6, fill 1.0); kontext takes none
    loras: tuple[tuple[str, float], ...] = ()  # (path, scale), already resolved inside --lora-dir
    partial_images: int = 0  # this many step previews, evenly spaced (OpenAI's partial_images)
    preview_every: int | None = 0  # a preview every N steps; 0: none; None: a stride from preview_stride
    load_only: bool = False
    id: str = field(default_factory=lambda: secrets.token_hex(8))


@dataclass
class Job(JobParams):
    """One request's work (`seeds` images of one prompt and settings, or a model switch) and its state."""

    timeout: float = DEFAULT_TIMEOUT
    submitted: float = 0.0
    started: float | None = None
    finished: float | None = None
    status: str = "queued"
    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: tuple[int, int] = (0, 0)  # (step, total) across all its images
    preview: bytes | None = None  # the latest step preview (PNG)
    _loop: asyncio.AbstractEventLoop | None = None
    _events: asyncio.Queue | None = None

    def params(self) -> JobParams:
        return JobParams(**{f.name: getattr(self, f.name) for f in fields(JobParams)})

    def stopped(self) -> bool:
        """Cancelled, or past its timeout: the runner stops it at its next step."""
        return self.cancelled.is_set() or time.monotonic() - self.submitted > self.timeout

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
    """A runner's one loaded model: switching frees the old one before loading the next, so two never
    share memory."""

    def __init__(self, loader=None, low_memory: bool = False):
        self.flux = None
        self.key: tuple | None = None  # (name, loras) of the loaded model
        self._loader = loader or partial(_load_flux, low_memory=low_memory)

    def get(self, name: str | None, loras: tuple = ()):
        if name is None:
            raise InvalidArgument("no model is loaded (start with --model NAME, or name one in the request)")
        key = (name, tuple(loras))
        if key != self.key:
            self.flux = self.key = None
            gc.collect()
            _clear_cache()
            try:
                self.flux = self._loader(name, loras)
            except Exception as e:  # noqa: BLE001 - whatever a damaged model raises, the job ends with one line
                raise load_failed(name, loras, e) from None
            self.key = key
        return self.flux


def _load_flux(name: str, loras: tuple, low_memory: bool = False):
    from mflux.flux1 import Flux1

    flux = Flux1.from_name(
        name, lora_paths=[p for p, _ in loras], lora_scales=[s for _, s in loras], low_memory=low_memory
    )
    if not low_memory:  # which loads each component when a request needs it, and frees it after
        flux.load()  # the transformer and the VAE now, not in the first request (T5 and CLIP load with it)
    return flux


def _clear_cache() -> None:
    import mlx.core as mx

    mx.clear_cache()


def device_type() -> str:
    """MLX's default device in this process: "cpu" or "gpu"."""
    from mflux.backend import import_mlx

    return import_mlx().default_device().type.name


def execute(models: Models, job: JobParams, emit, stopped) -> None:
    """Run `job` on this process's model: switch to its model and LoRAs (emitting Loaded), then emit each
    Step and Result until its images are done or `stopped()`. Raises what failed. The one adapter over
    Flux1.generate, for the worker thread and every worker process alike."""
    flux = models.get(job.model, job.loras)
    emit(Loaded(models.key))
    if job.load_only:
        return
    from mflux.flux1 import Config

    config = Config(num_inference_steps=job.steps, height=job.height, width=job.width)
    if job.guidance is not None:
        config.guidance = job.guidance
    steps = job.steps or flux.folder.defaults["steps"]
    events = _events(flux, job, config, _previews(job, steps))
    try:
        for event in events:
            if stopped():
                break
            emit(event)
    finally:
        events.close()  # stops the engine: the rest of the batch is never computed


def _previews(job: JobParams, steps: int) -> frozenset[int] | bool:
    """What Flux1.generate's `previews` takes for `job`: the 1-based steps to decode, or False."""
    if job.partial_images:
        return preview_steps(job.partial_images, steps)
    every = preview_stride(steps) if job.preview_every is None else job.preview_every
    return frozenset(range(every, steps + 1, every)) if every > 0 else False


def preview_stride(steps: int) -> int:
    """About PREVIEWS_PER_IMAGE previews over `steps`: each step of schnell's 4, every 4th of 20, and for
    A1111's own 50-step default, A1111's own default of every 10th."""
    return max(1, math.ceil(steps / PREVIEWS_PER_IMAGE))


def preview_steps(partial_images: int, steps: int) -> frozenset[int]:
    """`partial_images` step numbers spread evenly over `steps` (fewer when there are fewer steps)."""
    k = partial_images
    return frozenset(min(steps, math.ceil(i * steps / (k + 1))) for i in range(1, k + 1))


def _events(flux, job: JobParams, config, previews):
    """The engine's events for `job` as Step and Result, PNGs encoded here, where the model runs. The
    image arguments mean what the model's variant makes of them (the handlers checked the pairing): a
    kontext model's `image` is the reference its prompt edits (no mask, no strength); a fill model's is
    inpainted where `mask` is white, at `strength` (None: FluxFillPipeline's 1.0); schnell and dev do
    img2img, or inpaint with a mask."""
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


class ThreadRunner:
    """Runs jobs on a model in this process, in its runner's thread: `mflux serve` without --workers."""

    def __init__(self, models: Models):
        self.models = models
        self.index, self.pid, self.device, self.restarts, self.failures = 0, os.getpid(), None, 0, 0
        self.backend: str | None = None  # once started
        self.job: Job | None = None
        self.model: tuple | None = None  # (name, loras) loaded

    def alive(self) -> bool:
        return self.backend is not None

    def start(self) -> None:
        self.backend = device_type()

    def run(self, job: Job, emit) -> Exception | None:
        try:
            execute(self.models, job, emit, job.stopped)
        except Exception as e:  # noqa: BLE001 - the job ends with its error, the runner keeps serving
            if not isinstance(e, MfluxError):
                log.exception("job %s failed", job.id)
            return e
        return None

    def terminate(self) -> None:
        pass  # a thread cannot be stopped from outside: it stops at the job's next step

    def close(self) -> None:
        pass


class Worker:
    """The bounded FIFO queue and its runners: each runner's thread takes the next job when it is free.

    A runner (ThreadRunner, ProcessRunner) has `index`, `pid`, `device`, `backend`, `restarts` and
    `failures`; `job` and `model` (name, loras), which the Worker keeps; and `alive()`, `start()`,
    `run(job, emit)` (the job's error or None; NotTaken puts the job back in the queue), `terminate()` and
    `close()`."""

    def __init__(self, runners: list, default_model: str | None = None, max_queue: int = DEFAULT_QUEUE):
        self.runners = runners
        self.default_model = default_model
        self.model: str | None = None  # the model jobs last named; None: the default
        self.max_queue = max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._refusing = False  # shutting down: no new jobs, and the queued ones were answered
        self._seconds_per_job = 10.0  # running mean, for Retry-After
        self.load_errors: dict[str, str] = {}  # model name -> why it did not load, until it loads (/health)

    # --- the handlers' side -------------------------------------------------------------------------
    @property
    def model_name(self) -> str | None:
        """The model a job that names none gets."""
        return self.model or self.default_model

    def loaded_model(self) -> str | None:
        """`model_name`, once a runner holds it."""
        name = self.model_name
        return name if any(r.model and r.model[0] == name for r in self.runners) else None

    @property
    def backend(self) -> str | None:
        return next((r.backend for r in self.runners if r.backend), None)

    @property
    def current(self) -> Job | None:
        """The running job that started first (what A1111's progress shows)."""
        jobs = self.running()
        return min(jobs, key=lambda j: j.started or 0.0) if jobs else None

    def running(self) -> list[Job]:
        return [job for job in (r.job for r in self.runners) if job is not None]

    def submit(self, job: Job) -> Job:
        """Queue `job` (FIFO); its events go to the calling event loop. Raises QueueFull past the limit."""
        job._loop = asyncio.get_running_loop()
        job._events = asyncio.Queue()
        with self._cond:
            if self._refusing:
                raise ShuttingDown()
            if len(self._queue) >= self.max_queue:
                self._log(job, "rejected", 0.0, 0.0, "queue full")
                raise QueueFull(self.max_queue, self.retry_after())
            job.submitted = time.monotonic()
            self._queue.append(job)
            job._emit(Queued(len(self._queue)))
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
                    self._renumber()
                    return True
            for job in self.running():
                if job.id == job_id:
                    job.cancelled.set()
                    return True
        return False

    def interrupt(self) -> bool:
        """Cancel the running jobs (A1111's interrupt, which has no job id)."""
        jobs = self.running()
        for job in jobs:
            job.cancelled.set()
        return bool(jobs)

    def job_count(self) -> int:
        with self._cond:
            return len(self._queue) + len(self.running())

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def retry_after(self) -> int:
        return max(1, round(self._seconds_per_job / len(self.runners)))

    def load_error(self) -> str | None:
        """Why the model a job that names none gets did not load, the last time it was tried."""
        return self.load_errors.get(self.model_name) if self.model_name else None

    def workers(self) -> list[dict]:
        """Each runner, for /health."""
        out = []
        for r in self.runners:
            job = r.job
            state = "busy" if job else "idle" if r.alive() else "starting"
            out.append(
                {
                    "id": r.index,
                    "pid": r.pid,
                    "device": r.device,
                    "backend": r.backend,
                    "state": state,
                    "model": r.model[0] if r.model else None,
                    "step": list(job.progress) if job else None,
                    "restarts": r.restarts,
                }
            )
        return out

    def start(self) -> None:
        for r in self.runners:
            thread = threading.Thread(
                target=self._serve, args=(r,), name=f"mflux-worker-{r.index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def refuse_new(self) -> None:
        """The server's shutdown has begun: refuse new jobs and end the queued ones as "shutdown" (503) now,
        rather than after the running jobs; the running jobs go on until stop()."""
        with self._cond:
            self._refusing = True
            self._end_queued("shutdown")

    def stop(self) -> None:
        """Cancel every job, let the running ones stop at their next step, then end the worker processes."""
        with self._cond:
            self._stopping = True
            self._end_queued("cancelled")
            for job in self.running():
                job.cancelled.set()
            self._cond.notify_all()
        deadline = time.monotonic() + STOP_GRACE
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for r in self.runners:
            r.terminate()  # those still loading a model or inside a long step
        for thread in self._threads:
            thread.join(timeout=30)

    def _end_queued(self, status: str) -> None:
        # under self._cond
        for job in self._queue:
            job.cancelled.set()
            self._finish(job, End(status))
        self._queue.clear()

    # --- each runner's thread -------------------------------------------------------------------------
    def _serve(self, runner) -> None:
        try:
            while not self._stopping:
                if not runner.alive() and not self._start(runner):
                    continue
                job = self._take(runner)
                if job is not None:
                    self._run(runner, job)
        finally:
            runner.close()

    def _start(self, runner) -> bool:
        """(Re)start `runner`, then load the current model into it; False (after a pause) if it failed."""
        try:
            runner.start()
        except WorkerLost as e:
            runner.failures += 1
            delay = min(30, 2 ** (runner.failures - 1))
            if not self._stopping:
                log.error("%s; retrying in %d s", e, delay)
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, timeout=delay)
            return False
        runner.failures = 0
        if self.model_name and not self._stopping:
            job = Job(model=self.model_name, load_only=True)
            job.submitted = job.started = time.monotonic()
            with self._cond:
                runner.job = job
            self._run(runner, job)
        return True

    def _take(self, runner) -> Job | None:
        """The next job for `runner` (None when stopping, or when its process died while it waited)."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait(timeout=1.0)
                if not runner.alive():
                    return None
            if self._stopping:
                return None
            job = self._queue.popleft()
            job.model = job.model or self.model_name  # one choice for every runner, made in queue order
            if job.model:
                self.model = job.model
            job.started = time.monotonic()
            runner.job = job
            job._emit(Started())
            self._renumber()
            return job

    def _renumber(self) -> None:
        """Tell each queued job its place, after the queue moved (call with the lock held)."""
        for position, job in enumerate(self._queue, 1):
            job._emit(Queued(position))

    def _run(self, runner, job: Job) -> None:
        job.status = "running"
        if (job.model, job.loras) != runner.model:
            runner.model = None  # the runner frees its model before it loads another
        if job.started - job.submitted > job.timeout:
            end = End("timeout")
        else:
            error = runner.run(job, lambda event: self._on_event(runner, job, event))
            if isinstance(error, NotTaken):
                self._put_back(runner, job)
                return
            if error is not None and runner.model is None and self.model == job.model:
                self.model = None  # a model that failed to load is not the current one: back to the default
            if isinstance(error, LoadFailed) and not error.lora:
                self.load_errors[job.model] = str(error)
            if error is not None:
                end = End("timeout" if isinstance(error, WorkerHung) else "error", error)
            elif job.cancelled.is_set():
                end = End("cancelled")
            elif job.stopped():
                end = End("timeout")
            else:
                end = End("ok")
        self._finish(job, end, runner)
        with self._cond:
            runner.job = None

    def _put_back(self, runner, job: Job) -> None:
        """A job `runner` never started: first in the queue again, unless cancelled meanwhile (stop() cancels
        running jobs too); a model load is dropped, since the runner loads again as it restarts."""
        with self._cond:
            runner.job = None
            if job.load_only:
                return
            if not job.cancelled.is_set():
                job.status, job.started = "queued", None
                self._queue.appendleft(job)
                self._renumber()
                self._cond.notify()
                return
            self._finish(job, End("cancelled"), runner)

    def _on_event(self, runner, job: Job, event) -> None:
        if isinstance(event, Loaded):
            runner.model = event.key
            self.load_errors.pop(event.key[0], None)
            return
        if job.stopped():
            return  # a stopped job sends nothing more, though its worker process may have
        if isinstance(event, Step):
            done = job.progress[0] + 1
            job.progress = (done, event.total * len(job.seeds))
            if event.preview:
                job.preview = event.preview
        job._emit(event)

    def _finish(self, job: Job, end: End, runner=None) -> None:
        job.finished = time.monotonic()
        job.status = end.status
        started = job.started or job.finished
        if job.status == "ok" and not job.load_only:
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (job.finished - started)
        self._log(job, end.status, started - job.submitted, job.finished - started, end.error, runner)
        job._emit(end)

    def _log(self, job: Job, status: str, queued: float, generating: float, error=None, runner=None) -> None:
        """The one line per request, naming the worker (its index and process id) that ran it."""
        where = f" worker={runner.index} pid={runner.pid}" if runner else ""
        failed = f" error={error}" if error else ""
        if job.load_only:
            log.info("load model=%s seconds=%.2f status=%s%s%s", job.model, generating, status, where, failed)
            return
        log.info(
            "generate model=%s size=%dx%d steps=%s images=%d queued=%.2fs generating=%.2fs status=%s%s%s",
            job.model or self.model_name,
            job.width,
            job.height,
            job.steps or "default",
            len(job.seeds),
            queued,
            generating,
            status,
            where,
            failed,
        )
