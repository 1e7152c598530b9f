"""`mflux serve`: check the settings, warn about an open bind without a key, then run uvicorn."""

import errno
import ipaddress
import logging
import socket
from pathlib import Path

import click

from mflux.errors import MfluxError
from mflux.server.core import ServerSettings, cuda_gpus, worker_devices


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: str | None = None,
    lora_dir: str | None = None,
    output_dir: str | None = None,
    queue: int = 16,
    timeout: float = 600.0,
    workers: int | None = None,
    devices: tuple[int, ...] | None = None,
    allowed_hosts: tuple[str, ...] = (),
    low_memory: bool = False,
    ignore_memory: bool = False,
) -> None:
    """Serve until interrupted; the model (if named) is checked now and loaded before the first request.
    `workers`/`devices`: see `worker_devices` (None and None: one worker thread in this process).
    `low_memory`: each worker loads one component at a time (Flux1's); a model whose 1024x1024 image
    can't fit the memory the backend can use is refused at the start (mflux.fit), unless `ignore_memory`."""
    from mflux.server.app import create_app
    from mflux.server.listen import uvicorn_server

    several = (workers or 1) > 1 or bool(devices)  # only then is MLX asked for the CUDA GPUs
    planned = worker_devices(workers, devices, cuda_gpus() if several else 0)
    if model is not None:
        check_model(model)  # the clear error now, not a server that fails every request
        if not ignore_memory:
            check_fit(model, low_memory)
    check_port(host, port)  # before the banner: a port in use is one line, not uvicorn's traceback
    if not is_loopback(host) and not api_key:
        click.echo(
            f"warning: serving on {host} without --api-key: anyone who can reach this address can use the "
            "server (set --api-key or MFLUX_API_KEY; without a key, requests must name it by IP address or "
            "by a name given to --allowed-hosts)",
            err=True,
        )
    settings = ServerSettings(
        model=model,
        api_key=api_key or None,
        lora_dir=Path(lora_dir).expanduser() if lora_dir else None,
        output_dir=Path(output_dir).expanduser() if output_dir else None,
        queue=queue,
        timeout=timeout,
        devices=planned,
        allowed_hosts=tuple(allowed_hosts),
        low_memory=low_memory,
    )
    log = logging.getLogger("mflux.server")  # the one line per request
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s mflux %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    click.echo(f"mflux serve: http://{host}:{port}/ (OpenAI: /v1, A1111: /sdapi/v1)", err=True)
    try:
        uvicorn_server(create_app(settings), host, port).run()
    except KeyboardInterrupt:
        pass  # uvicorn raises again the Ctrl-C it has already shut down for (uvicorn.run swallows it too)
    except OSError as e:
        raise MfluxError(f"cannot listen on {host}:{port}: {e.strerror} (choose another --port)") from None


def check_model(name: str) -> None:
    """The model to serve is stored, its files are whole (each one's size, and each weight file's header
    read and checked), as loading it will find them: a damaged model fails the start with one line."""
    from mflux.folders import open_folder
    from mflux.runtime.weights import SafetensorsFile
    from mflux.store import Store

    found = Store().resolve(name)
    folder = open_folder(found.path, name=found.name)
    for path in sorted(folder.path.rglob("*.safetensors")):
        SafetensorsFile(path)  # reads the header only


def check_fit(name: str, low_memory: bool) -> None:
    """Refuse a model whose one 1024x1024 image can't fit (mflux.fit), before anything loads."""
    from mflux import fit
    from mflux.backend import default_precision

    found = fit.find_model(name, None, None)
    plan = fit.plan_for(
        found.architecture,
        found.stored,
        default_precision(),
        found.bits,
        text_tokens=found.text_tokens,
        low_memory=low_memory,
    )
    fit.preflight(found.name, plan, found.bits)


def check_port(host: str, port: int) -> None:
    """Bind `host`:`port` as uvicorn will (every address the name resolves to, SO_REUSEADDR set), and let go:
    an address in use or not ours is one error now, before anything is printed."""
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as e:
        raise MfluxError(
            f"cannot listen on {host}:{port}: {e.strerror} (give --host an address of this machine)"
        ) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise MfluxError(
                        f"port {port} is in use (give --port N or stop the other server)"
                    ) from None
                raise MfluxError(
                    f"cannot listen on {host}:{port}: {e.strerror} (choose another --host or --port)"
                ) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
