"""Worker processes (`mflux serve --workers N`, `--devices 0,1`): one per device, each with its own model.

`ProcessRunner` is the parent's side: it starts a process, hands it one job at a time and relays what comes
back to the queue's `Worker`. `main` is the process's side: MLX on its device, one `Models`, and the same
`execute` the in-process worker thread runs. Processes start with multiprocessing's "spawn" (forking a
process in which MLX has started is unsafe). The messages are plain picklable data that mflux creates:

    parent -> process   ("job", JobParams)  ("cancel",)  ("stop",)
    process -> parent   ("ready", backend)  ("failed", message)  ("taken",)  ("event", Step | Result | Loaded)
                        ("done", None | (kind, message)), kind "user", "model", "lora" or "crash"

A process says "taken" as soon as it has read a job, so one that hangs while idle (stopped, deadlocked
between jobs) is found when it is next handed a job, within TAKE_TIMEOUT, and the job goes back to the queue.

This module imports no MLX at its top: a process sets CUDA_VISIBLE_DEVICES before MLX starts.
"""

import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing import resource_tracker
from multiprocessing.reduction import ForkingPickler

from mflux.errors import MfluxError
from mflux.server.worker import (
    Job,
    JobParams,
    LoadFailed,
    Models,
    NotTaken,
    WorkerHung,
    WorkerLost,
    device_type,
    execute,
    log,
)

START_TIMEOUT = 300.0  # seconds for a process to start MLX and say it is ready
POLL = 0.1  # seconds between checks of a running job's cancel and timeout
# Seconds a process has to stop a job, past both its timeout and the cancel it was sent, before it is
# taken for hung (stuck in a kernel, deadlocked, stopped) and killed; the job's slowest step so far is
# added, so a slow device is not mistaken for a hung one.
CANCEL_GRACE = 5.0
# Seconds an idle process has to read a job handed to it and say so before it is taken for hung, killed
# and restarted; the job goes back to the queue. An idle process waits in recv: it answers in milliseconds.
TAKE_TIMEOUT = 5.0


class ProcessRunner:
    """Runs jobs in a worker process of its own; a process that dies is started again by its Worker."""

    def __init__(self, index: int, device: str | None = None, low_memory: bool = False):
        self.index = index
        self.device = device  # its CUDA_VISIBLE_DEVICES; None: the host's one device, shared
        self.low_memory = low_memory  # its Flux1's low_memory
        self.pid: int | None = None
        self.backend: str | None = None
        self.job: Job | None = None
        self.model: tuple | None = None  # (name, loras) the process holds
        self.restarts = 0
        self.failures = 0  # starts that failed in a row (the Worker waits longer after each)
        self._process = None
        self._conn = None

    def alive(self) -> bool:
        """Started and ready for jobs."""
        return self.backend is not None and self._process is not None and self._process.is_alive()

    def start(self) -> None:
        """Start the process and wait until MLX runs in it; raises WorkerLost if it cannot."""
        if self._process is not None:
            log.error("%s exited while idle (%s); restarting it", self._name(), self._reap())
        if self.pid is not None:
            self.restarts += 1
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        process = ctx.Process(
            target=main,
            args=(theirs, self.index, self.device, self.low_memory),
            name=f"mflux-worker-{self.index}",
            daemon=True,
        )
        self.model = self.backend = None
        # Ctrl-C reaches the whole process group; a process starts with SIGINT blocked (the mask outlives
        # spawn's exec), so one that is still importing does not die of it; `main` then ignores it. The
        # resource tracker first: starting it unblocks SIGINT in this thread, as it does for its own.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            process.start()
        except Exception as e:  # noqa: BLE001 - e.g. a script that starts a server without `if __name__ ...`
            ours.close()
            raise WorkerLost(f"worker {self.index} could not be started: {e}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            theirs.close()  # the parent keeps only its end, so the process's death reads as end-of-file
        self._process, self._conn, self.pid = process, ours, process.pid
        try:
            if not ours.poll(START_TIMEOUT):
                self._process.kill()
                self._reap()
                raise WorkerLost(f"{self._name()} did not start in {START_TIMEOUT:g} s")
            message = ours.recv()
        except (EOFError, OSError):
            raise WorkerLost(f"{self._name()} exited while starting ({self._reap()})") from None
        if message[0] == "failed":
            self._reap()
            raise WorkerLost(f"{self._name()} could not start: {message[1]}")
        self.backend = message[1]

    def run(self, job: Job, emit) -> Exception | None:
        """Send `job` to the process and relay its events until it is done; asks the process to stop the
        job once it is cancelled or past its timeout, and kills it as hung if it has not stopped the job
        CANCEL_GRACE s (plus its slowest step) past both. Returns the job's error, if any: NotTaken when
        the process never took it (`_hand`)."""
        since = None  # once the cancel is sent: when the grace began (then, or at the timeout if later)
        last = slowest = 0.0  # when the latest event came; the longest wait between two events
        not_taken = self._hand(job)
        if not_taken is not None:
            return not_taken
        try:
            while True:
                if self._conn.poll(POLL):
                    message = self._conn.recv()
                    if message[0] == "event":
                        now = time.monotonic()
                        slowest, last = max(slowest, now - last) if last else 0.0, now
                        emit(message[1])
                    elif message[0] == "done":
                        return _error(message[1])
                if since is None and job.stopped():
                    self._conn.send(("cancel",))
                    since = max(time.monotonic(), job.submitted + job.timeout)
                if since is not None and time.monotonic() > since + CANCEL_GRACE + slowest:
                    return self._hung(job, CANCEL_GRACE + slowest)
        except (EOFError, OSError):
            return self._lost(job)

    def _hand(self, job: Job) -> NotTaken | None:
        """Send `job` and wait until the process says it has taken it; NotTaken if it has not within
        TAKE_TIMEOUT (then killed as hung) or is gone. The send has a thread of its own: a job larger than
        the pipe's buffer (one with an init image) blocks until the process reads it, which a hung one never
        does; the kill ends that send with a broken pipe."""
        data = ForkingPickler.dumps(("job", job.params()))
        sender = threading.Thread(
            target=_send, args=(self._conn, data), name=f"mflux-send-{self.index}", daemon=True
        )
        sender.start()
        try:
            taken = self._conn.poll(TAKE_TIMEOUT) and self._conn.recv()[0] == "taken"
        except (EOFError, OSError):
            taken = None  # the process is gone
        if taken:
            sender.join()  # the process has read the whole job: the send is over
            return None
        pid = self.pid
        if taken is False:
            self._process.kill()  # SIGKILL: a stopped process reads nothing, not even a stop
        self._process.join(timeout=5)
        sender.join(timeout=5)  # its send fails once the process's end of the pipe is closed
        how = self._reap()
        if taken is False:
            log.error(
                "%s did not take job %s within %.1f s while idle; killed it as hung, restarting it",
                self._name(pid),
                job.id,
                TAKE_TIMEOUT,
            )
            return NotTaken(
                f"worker {self.index} (pid {pid}) did not take this job within {TAKE_TIMEOUT:g} s"
            )
        log.error("%s exited while idle (%s); restarting it", self._name(pid), how)
        return NotTaken(f"worker {self.index} (pid {pid}) exited before it took this job ({how})")

    def terminate(self) -> None:
        """End the process now (shutdown, after the grace): its runner's thread then sees it gone."""
        process = self._process
        if process is not None and process.is_alive():
            process.terminate()

    def close(self) -> None:
        """Ask the process to exit and make sure it has: no worker process outlives the server."""
        if self._process is None:
            return
        try:
            self._conn.send(("stop",))
        except OSError:
            pass  # already gone
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        self._reap()

    def _lost(self, job: Job) -> WorkerLost:
        pid, how = self.pid, self._reap()
        log.error("%s died while running job %s (%s); restarting it", self._name(pid), job.id, how)
        return WorkerLost(
            f"worker {self.index} (pid {pid}) died while running this job ({how}); it is being restarted"
        )

    def _hung(self, job: Job, grace: float) -> WorkerHung:
        pid = self.pid
        self._process.kill()  # SIGKILL: a process that reads no cancel reads no stop either
        self._reap()
        log.error(
            "%s did not stop job %s within %.1f s of its timeout; killed it as hung, restarting it",
            self._name(pid),
            job.id,
            grace,
        )
        return WorkerHung(
            f"worker {self.index} (pid {pid}) did not stop it within {grace:.1f} s, so it was killed as hung; "
            "it is being restarted"
        )

    def _reap(self) -> str:
        """Wait for the dead process; how it ended, in words."""
        self._process.join(timeout=5)
        code = self._process.exitcode
        self._conn.close()
        self._process = self._conn = None
        if code is None:
            return "still running"
        if code < 0:
            name = signal.Signals(-code).name
            return f"killed by {name}" + (", perhaps for lack of memory" if -code == signal.SIGKILL else "")
        return f"exit code {code}"

    def _name(self, pid: int | None = None) -> str:
        on = f", CUDA device {self.device}" if self.device is not None else ""
        return f"worker {self.index} (pid {pid or self.pid}{on})"


def _send(conn, data: bytes) -> None:
    try:
        conn.send_bytes(data)
    except OSError:
        pass  # the process is gone, or was killed as hung: its runner's thread says which


def _error(error) -> Exception | None:
    if error is None:
        return None
    kind, message = error
    if kind in ("model", "lora"):
        return LoadFailed(message, lora=kind == "lora")
    return MfluxError(message) if kind == "user" else RuntimeError(message)


# --- the worker process -------------------------------------------------------------------------------
def main(conn, index: int, device: str | None, low_memory: bool = False) -> None:
    """A worker process: MLX on its device, one model, one job at a time, until told to stop or the
    parent is gone (its end of the pipe closes when it exits, however it exits)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us; a pending Ctrl-C is dropped
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    _log_to_stderr(index)
    try:
        _serve(conn, device, low_memory)
    except (EOFError, ConnectionError):
        pass  # the parent is gone


def _serve(conn, device: str | None, low_memory: bool = False) -> None:
    try:
        conn.send(("ready", _device_backend(device)))
    except MfluxError as e:
        conn.send(("failed", str(e)))
        return
    models = Models(low_memory=low_memory)
    while True:
        message = conn.recv()
        if message[0] == "job":
            conn.send(("taken",))
        if message[0] == "stop" or (message[0] == "job" and not _run(conn, models, message[1])):
            return


def _device_backend(device: str | None) -> str:
    name = device_type()
    if device is not None and name != "gpu":
        raise MfluxError(f"MLX sees no GPU with CUDA_VISIBLE_DEVICES={device}")
    return name


def _run(conn, models: Models, job: JobParams) -> bool:
    """Run one job, sending its events and then its end; False when the process should exit."""
    seen = None

    def stopped() -> bool:
        nonlocal seen
        try:
            while seen is None and conn.poll():
                seen = conn.recv()[0]  # "cancel" or "stop"
        except (EOFError, ConnectionError):
            seen = "stop"  # the parent is gone
        return seen is not None

    error = None
    try:
        execute(models, job, lambda event: conn.send(("event", event)), stopped)
    except Exception as e:  # noqa: BLE001 - the job ends with its error, the process keeps serving
        if not isinstance(e, MfluxError | ConnectionError):  # ConnectionError: the parent is gone
            log.exception("job %s failed", job.id)
        error = (_kind(e), str(e))
    conn.send(("done", error))
    return seen != "stop"


def _kind(e: Exception) -> str:
    """How the parent rebuilds a job's error (`_error`): what the client is told depends on it."""
    if isinstance(e, LoadFailed):
        return "lora" if e.lora else "model"
    return "user" if isinstance(e, MfluxError) else "crash"


def _log_to_stderr(index: int) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s mflux worker {index} pid {os.getpid()} %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
