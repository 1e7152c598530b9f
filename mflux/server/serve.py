"""`mflux serve`: check the settings, warn about an open bind without a key, then run uvicorn."""

import ipaddress
import logging
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
) -> None:
    """Serve until interrupted; the model (if named) is checked now and loaded before the first request.
    `workers`/`devices`: see `worker_devices` (None and None: one worker thread in this process)."""
    from mflux.server.app import create_app
    from mflux.server.listen import uvicorn_server
    from mflux.store import Store

    several = (workers or 1) > 1 or bool(devices)  # only then is MLX asked for the CUDA GPUs
    planned = worker_devices(workers, devices, cuda_gpus() if several else 0)
    if model is not None:
        Store().resolve(model)  # the clear error now, not at the first request
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
