"""The server fault suite (issue 33): what a hostile client, a damaged store or a busy port does to
`mflux serve`. Loopback only; every case is bounded in time (short HTTP timeouts, tiny models, 32 px, one
step). Each refusal is one clear error in the dialect's shape: OpenAI's JSON error, A1111's, or the page's."""

import socket

import pytest
import uvicorn
from click.testing import CliRunner

from mflux.cli import cli


def serve(*args) -> tuple:
    """`mflux serve ARGS` in this process with uvicorn replaced: (exit code, output, uvicorn's calls)."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
        r = CliRunner().invoke(cli, ["serve", *args])
    return r.exit_code, r.output, calls


# --- starting ----------------------------------------------------------------------------------------
def test_a_port_in_use_is_one_line_and_no_banner():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output, calls = serve("--port", str(port))
    assert (code, calls) == (1, [])
    assert output == f"error: port {port} is in use (give --port N or stop the other server)\n"
