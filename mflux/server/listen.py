"""uvicorn as `mflux serve` runs it under a hostile client: a deadline on each request head, a connection
limit, and a bounded shutdown that drops requests still arriving and answers queued jobs with 503 at once.
The body's deadline is the app's (Guard, in app.py), since uvicorn hands the body to the app as it arrives."""

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mflux.server.core import Server

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def uvicorn_server(app, host: str, port: int, log_level: str = "info") -> uvicorn.Server:
    """The uvicorn server for `create_app`'s app, with the limits of its settings."""
    server: Server = app.state.server
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=head_timed(server.limits.head_seconds),
        limit_concurrency=server.limits.connections,
        timeout_graceful_shutdown=server.settings.shutdown_grace,
    )
    return BoundedShutdown(config, server)


def head_timed(seconds: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing a connection on which no new request head (request line and
    headers) is whole `seconds` after the connection opened or the previous response ended. uvicorn's own
    keep-alive timeout ends at the first byte, so a head sent a byte at a time, or the unread rest of a
    refused request's body sent a byte at a time, would hold the connection forever."""

    class HeadTimed(H11Protocol):
        head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a new request's head is in: the app has it
                self._disarm()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if self.cycle is cycle and not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own deadline

        def shutdown(self) -> None:
            if self.conn.their_state is h11.SEND_BODY:
                # a request still arriving was never whole: nobody is owed its answer, and a client
                # stalled mid-body would otherwise hold the shutdown for its whole grace
                self.transport.close()
                return
            super().shutdown()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.head_deadline = self.loop.call_later(seconds, self._head_timed_out)

        def _disarm(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def _head_timed_out(self) -> None:
            self.head_deadline = None
            if not self.transport.is_closing():
                # h11 answers only a request it has parsed, so the 408 goes out as raw bytes
                self.transport.write(_TIMED_OUT)
                self.transport.close()

    return HeadTimed


class BoundedShutdown(uvicorn.Server):
    """On SIGTERM or Ctrl-C: stop accepting, drop requests still arriving, answer every queued job with 503
    at once, give the running jobs `shutdown_grace` seconds to finish (uvicorn's graceful timeout, which
    then cancels their requests and so their jobs), then stop the workers (the app's lifespan)."""

    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.app_server = server

    async def shutdown(self, sockets=None) -> None:
        for listener in self.servers:
            listener.close()  # uvicorn closes them again: harmless
        self.app_server.worker.refuse_new()
        await super().shutdown(sockets)
