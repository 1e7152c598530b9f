"""`mflux serve --workers 2` on this CPU: two worker processes, each with its own tiny model, behind the
one queue. Concurrency, equality with the one-thread server, a worker killed mid-job, cancelling, the
flags, and shutdown without orphans."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image

import mflux.server.process
from mflux.errors import MfluxError
from mflux.server.core import ServerSettings, worker_devices
from tests.fixtures import store_hf_folder
from tests.server_harness import module_store, pixels, png, png_bytes, serving, wait_for

SIZE, PX = "32x32", 32

LONG = 100  # steps: about 5 s on this CPU, time enough to kill or cancel a job while it runs


@pytest.fixture(scope="module")
def mflux_home(tmp_path_factory):
    yield from module_store(tmp_path_factory)


@pytest.fixture(scope="module")
def two(mflux_home, tiny_schnell, tiny_dev):
    store_hf_folder(tiny_schnell, "schnell")
    store_hf_folder(tiny_dev, "dev")
    with serving(ServerSettings(model="schnell", devices=(None, None))) as (url, server):
        wait_for(lambda: idle(url, 2), "two warm workers", 120)
        yield SimpleNamespace(url=url, server=server)


def health(url: str) -> dict:
    return requests.get(f"{url}/health", timeout=10).json()


def idle(url: str, n: int) -> bool:
    """`n` workers, each idle with a model loaded."""
    workers = health(url)["workers"]
    return len(workers) == n and all(w["state"] == "idle" and w["model"] for w in workers)


def generate(url: str, prompt: str, seed: int, steps: int) -> requests.Response:
    body = {"prompt": prompt, "size": SIZE, "seed": seed, "steps": steps}
    return requests.post(f"{url}/v1/images/generations", json=body, timeout=120)


def inpaint(url: str, seed: int, steps: int) -> requests.Response:
    """An edit with a mask: the image and the mask travel to the worker process with the job."""
    image = Image.new("RGB", (PX, PX), (200, 40, 40))
    mask = Image.new("RGBA", (PX, PX), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, PX // 2, PX))  # repaint the left half
    files = {
        "image": ("in.png", png_bytes(image), "image/png"),
        "mask": ("m.png", png_bytes(mask), "image/png"),
    }
    data = {"prompt": "a red door", "seed": str(seed), "steps": str(steps)}
    return requests.post(f"{url}/v1/images/edits", files=files, data=data, timeout=120)


def test_two_requests_run_at_once_on_two_workers_and_match_one_worker(two, caplog):
    jobs = [lambda url: generate(url, "a red fox", 1, 8), lambda url: inpaint(url, 2, 8)]
    with caplog.at_level(logging.INFO, logger="mflux.server"):
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda job: job(two.url), jobs))
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    lines = [r for r in caplog.records if r.name == "mflux.server" and "generate " in r.getMessage()]
    assert len(lines) == 2 and all("status=ok" in r.getMessage() for r in lines)
    pids = {int(re.search(r" pid=(\d+)", r.getMessage())[1]) for r in lines}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, neither of them this one
    # each line is logged as its job ends, and says how long it generated: the two intervals overlap
    spans = [
        (r.created - float(re.search(r"generating=([\d.]+)s", r.getMessage())[1]), r.created) for r in lines
    ]
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans

    with serving(ServerSettings(model="schnell")) as (url, _):  # the default: one worker thread
        alone = [job(url) for job in jobs]
    for got, want in zip(replies, alone, strict=True):
        image = png(got.json()["data"][0]["b64_json"])
        assert image.size == (PX, PX)
        assert np.array_equal(pixels(image), pixels(png(want.json()["data"][0]["b64_json"])))


def test_a_worker_killed_mid_job_fails_that_job_and_is_restarted(two):
    with ThreadPoolExecutor(1) as pool:
        doomed = pool.submit(generate, two.url, "doomed", 3, LONG)
        wait_for(lambda: any(w["step"] and w["step"][0] >= 1 for w in health(two.url)["workers"]), "a step")
        victim = next(w for w in health(two.url)["workers"] if w["state"] == "busy")
        os.kill(victim["pid"], signal.SIGKILL)
        r = doomed.result(timeout=60)
    assert r.status_code == 500 and "Traceback" not in r.text
    message = r.json()["error"]["message"]
    assert f"worker {victim['id']} (pid {victim['pid']}) died while running this job" in message
    assert "killed by SIGKILL" in message and r.json()["error"]["code"] == "worker_died"
    assert generate(two.url, "the next one", 4, 1).status_code == 200  # the server keeps serving
    wait_for(lambda: idle(two.url, 2), "the worker restarted", 60)
    again = health(two.url)["workers"][victim["id"]]
    assert again["pid"] != victim["pid"] and again["restarts"] == 1


def test_queue_bound_cancel_and_interrupt_with_worker_processes(two):
    pids = [w["pid"] for w in health(two.url)["workers"]]
    body = {"prompt": "cancel me", "width": PX, "height": PX, "steps": LONG, "previews": False}
    streams = []
    two.server.worker.max_queue = 1
    try:
        for n in range(3):  # two run, one waits
            streams.append(requests.post(f"{two.url}/mflux/v1/generate", json=body, stream=True, timeout=60))
            if n < 2:  # each taken by a worker before the next arrives: a queue of one holds the third
                wait_for(lambda n=n: busy(two.url) == n + 1, f"{n + 1} running jobs")
        # one line iterator per stream, kept: dropping one closes its connection, which cancels its job
        lines = [s.iter_lines(decode_unicode=True, delimiter="\n\n") for s in streams]
        ids = [json.loads(next(it).split("data: ", 1)[1])["job_id"] for it in lines]
        full = requests.post(
            f"{two.url}/v1/images/generations", json={"prompt": "one too many", "size": SIZE}
        )
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    finally:
        two.server.worker.max_queue = 16
    step = seconds_per_step(two.url)
    started = time.monotonic()
    for job_id in (ids[2], ids[0]):  # the waiting one, then a running one
        assert requests.delete(f"{two.url}/mflux/v1/jobs/{job_id}", timeout=10).status_code == 200
    assert requests.post(f"{two.url}/sdapi/v1/interrupt", timeout=10).status_code == 200  # the running ones
    for it in lines:
        events = [block for block in it if block]
        assert events[-1].startswith("event: end") and '"status": "cancelled"' in events[-1]
        assert not any(e.startswith("event: image") for e in events)
    wait_for(lambda: idle(two.url, 2), "two idle workers")
    # the processes stopped at their next step: far sooner than the 80-odd steps they had left
    assert time.monotonic() - started < 40 * step, (time.monotonic() - started, step)
    assert [w["pid"] for w in health(two.url)["workers"]] == pids  # cancelled, not killed


def busy(url: str) -> int:
    return sum(w["state"] == "busy" for w in health(url)["workers"])


def seconds_per_step(url: str) -> float:
    """Both workers' jobs timed over 5 steps, once they are running at speed (past step 3)."""

    def steps() -> list[int]:
        return [w["step"][0] if w["step"] else 0 for w in health(url)["workers"]]

    wait_for(lambda: min(steps()) >= 3, "two running jobs")
    first, t = min(steps()), time.monotonic()
    wait_for(lambda: min(steps()) >= first + 5, "five more steps")
    return (time.monotonic() - t) / 5


def test_timeout_stops_the_job_in_its_worker_process(two, caplog):
    two.server.settings.timeout = 0.5
    try:
        with caplog.at_level(logging.INFO, logger="mflux.server"):
            r = generate(two.url, "too slow", 5, LONG)
            wait_for(lambda: idle(two.url, 2), "two idle workers")
    finally:
        two.server.settings.timeout = 600.0
    assert r.status_code == 504 and "timed out after 0.5 s" in r.json()["error"]["message"]
    (line,) = [r.getMessage() for r in caplog.records if "status=timeout" in r.getMessage()]
    # its process stopped it at the step after the timeout; its 100 steps take about 5 s here
    assert float(re.search(r"generating=([\d.]+)s", line)[1]) < 2.0, line


def test_a_worker_hung_past_the_timeout_is_killed_and_replaced(two, monkeypatch, caplog):
    with ThreadPoolExecutor(2) as pool:  # both warm (a process's first step is slow): a step comes in time
        warm = list(pool.map(lambda seed: generate(two.url, "warm", seed, 8), (1, 2)))
    assert [r.status_code for r in warm] == [200, 200]
    monkeypatch.setattr(mflux.server.process, "CANCEL_GRACE", 1.0)
    monkeypatch.setattr(two.server.settings, "timeout", 3.0)
    before = {w["id"]: w["restarts"] for w in health(two.url)["workers"]}
    with caplog.at_level(logging.INFO, logger="mflux.server"), ThreadPoolExecutor(1) as pool:
        doomed = pool.submit(generate, two.url, "hung", 6, LONG)
        wait_for(lambda: any(w["step"] and w["step"][0] >= 1 for w in health(two.url)["workers"]), "a step")
        victim = next(w for w in health(two.url)["workers"] if w["state"] == "busy")
        os.kill(victim["pid"], signal.SIGSTOP)  # stuck: it reads no cancel and sends nothing more
        stopped = time.monotonic()
        r = doomed.result(timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    message = r.json()["error"]["message"]
    assert message.startswith("the request timed out after 3 s") and "Traceback" not in r.text
    hung = rf"; worker {victim['id']} \(pid {victim['pid']}\) did not stop it within [\d.]+ s, so it was"
    assert re.search(hung + " killed as hung; it is being restarted$", message), message
    # the timeout, then the grace with the job's slowest step (a few tens of ms here)
    assert time.monotonic() - stopped < 10, time.monotonic() - stopped
    assert not _running(victim["pid"])  # killed outright, though stopped
    (line,) = [
        r.getMessage() for r in caplog.records if "generate " in r.getMessage() and "hung" in r.getMessage()
    ]
    assert "status=timeout" in line and f"pid={victim['pid']}" in line
    assert generate(two.url, "the next one", 7, 1).status_code == 200  # the queue keeps moving
    wait_for(lambda: idle(two.url, 2), "the worker restarted", 60)
    again = health(two.url)["workers"][victim["id"]]
    assert again["pid"] != victim["pid"] and again["restarts"] == before[victim["id"]] + 1


def test_a_worker_stopped_while_idle_is_replaced_and_its_job_runs_elsewhere(two, monkeypatch, caplog):
    victim, replies, took = _with_one_idle_worker_stopped(two, monkeypatch, caplog, generate, "idle", 3)
    assert [r.status_code for r in replies] == [200] * 3, [r.text for r in replies]
    assert took < 20, took  # TAKE_TIMEOUT (1 s here), then another worker's run: not the 600 s timeout
    again = health(two.url)["workers"][victim["id"]]
    assert again["pid"] != victim["pid"] and again["restarts"] == victim["restarts"] + 1


def test_a_hung_worker_handed_an_init_image_larger_than_the_pipe_does_not_hang_the_server(
    two, monkeypatch, caplog
):
    side = 512  # the job carries the image at its own size: 512 * 512 * 3 bytes, far past the pipe's buffer
    a, b = socket.socketpair()  # what multiprocessing's Pipe is made of
    with a, b:
        assert side * side * 3 > 2 * a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    image = png_bytes(Image.new("RGB", (side, side), (30, 90, 200)))

    def edit(url: str, prompt: str, seed: int, steps: int) -> requests.Response:
        files = {"image": ("in.png", image, "image/png")}
        data = {"prompt": prompt, "seed": str(seed), "steps": str(steps), "size": SIZE}
        return requests.post(f"{url}/v1/images/edits", files=files, data=data, timeout=30)

    victim, replies, took = _with_one_idle_worker_stopped(two, monkeypatch, caplog, edit, "big", 2)
    assert [r.status_code for r in replies] == [200] * 2, [r.text for r in replies]
    assert all(png(r.json()["data"][0]["b64_json"]).size == (PX, PX) for r in replies)
    assert took < 20, took


def _with_one_idle_worker_stopped(two, monkeypatch, caplog, request, prompt: str, n: int):
    """SIGSTOP one idle worker, then send `n` requests at once, so the stopped worker is handed one: it
    is killed as hung within TAKE_TIMEOUT and its job runs on another. (victim, replies, seconds taken)."""
    wait_for(lambda: idle(two.url, 2), "two idle workers", 60)
    monkeypatch.setattr(mflux.server.process, "TAKE_TIMEOUT", 1.0)
    monkeypatch.setattr(two.server.settings, "timeout", 30.0)  # without the take: a 504 in 35 s, no hang
    victim = health(two.url)["workers"][0]
    os.kill(victim["pid"], signal.SIGSTOP)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.INFO, logger="mflux.server"), ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(lambda seed: request(two.url, prompt, seed, 2), range(n)))
    finally:
        if _running(victim["pid"]):
            os.kill(victim["pid"], signal.SIGKILL)  # not left stopped for the next test
    took = time.monotonic() - started
    assert not _running(victim["pid"])  # killed outright, though stopped
    (line,) = [r.getMessage() for r in caplog.records if "while idle; killed it as hung" in r.getMessage()]
    assert f"worker {victim['id']} (pid {victim['pid']})" in line, line
    wait_for(lambda: idle(two.url, 2), "the worker restarted", 60)
    return victim, replies, took


def test_a_model_switch_reaches_each_worker_with_its_next_job(two):
    options = f"{two.url}/sdapi/v1/options"
    assert requests.post(options, json={"sd_model_checkpoint": "dev"}, timeout=60).status_code == 200
    try:
        assert health(two.url)["default_model"] == "dev"
        with ThreadPoolExecutor(2) as pool:  # neither names a model: both get dev, the last one set
            replies = list(pool.map(lambda seed: generate(two.url, "a fox", seed, 8), (1, 2)))
        assert [png(r.json()["data"][0]["b64_json"]).text["Model"] for r in replies] == ["dev", "dev"]
        assert [w["model"] for w in health(two.url)["workers"]] == ["dev", "dev"]
    finally:
        requests.post(options, json={"sd_model_checkpoint": "schnell"}, timeout=60)


def test_worker_devices_from_the_flags():
    assert worker_devices(None, None, 0) == () == worker_devices(1, None, 4)  # the in-process thread
    assert worker_devices(3, None, 0) == (None, None, None)  # a CPU or a Mac: processes share the device
    assert worker_devices(2, None, 4) == ("0", "1")  # CUDA: GPUs from 0
    assert worker_devices(None, (1, 3), 4) == ("1", "3") == worker_devices(2, (1, 3), 4)
    assert worker_devices(None, (0, 0), 1) == ("0", "0")  # two workers on one GPU
    refusals = [
        ((0, None, 0), "at least 1"),
        ((None, (0,), 0), "no CUDA GPU"),
        ((3, (0, 1), 4), "disagree"),
        ((None, (0, 4), 4), "numbered 0..3"),
        ((5, None, 4), "this host has 4"),
    ]
    for args, words in refusals:
        with pytest.raises(MfluxError, match=words):
            worker_devices(*args)


def test_worker_process_imports_no_mlx_before_it_picks_its_device():
    # a worker sets CUDA_VISIBLE_DEVICES first thing; MLX imported with the module would be too early
    code = "import sys, mflux.server.process; print([m for m in sys.modules if m.startswith('mlx')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("how", ["ctrl-c", "kill-9"])
def test_no_worker_process_outlives_the_server(how, mflux_home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "mflux", "serve", "--workers", "2", "--port", str(port)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def pids() -> list[int] | None:
        assert server.poll() is None, server.stderr.read()
        try:
            pids = [w["pid"] for w in health(url)["workers"]]
        except requests.ConnectionError:
            return None
        return pids if None not in pids else None

    try:
        wait_for(pids, "the server and its two worker processes", 120)
        workers = pids()  # they may still be starting: the signal comes at once, to catch that too
        if how == "ctrl-c":
            os.killpg(server.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
        else:
            server.kill()  # no shutdown at all: each worker sees its pipe to the server close
        _, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert server.returncode == (0 if how == "ctrl-c" else -signal.SIGKILL)
    assert "Traceback" not in err, err
    wait_for(lambda: not any(map(_running, workers)), "no worker process left", 10)


def _running(pid: int) -> bool:
    """Alive, and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
