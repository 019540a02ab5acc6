"""Runs the HTTP API with uvicorn inside the router's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from router.config import ConfigError, Endpoint
from router.openai_api.app import build_app
from router.server import GeneratorService


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the router's SIGTERM handler stops both
    servers, in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(endpoint: Endpoint) -> socket.socket:
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((endpoint.host, endpoint.port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"--http-port: cannot listen on {endpoint} ({err.strerror}); choose a free port, "
            "or 0 to turn the HTTP API off"
        ) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class HttpApi:
    """The OpenAI-compatible API on its own port; `start()` binds (ConfigError when taken)."""

    def __init__(self, service: GeneratorService, endpoint: Endpoint, grace_s: float) -> None:
        self.endpoint = endpoint
        config = uvicorn.Config(
            build_app(service),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(1, round(grace_s)),
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        sock = _listen(self.endpoint)
        self._task = asyncio.create_task(self._server.serve([sock]), name="http-api")

    async def stop(self) -> None:
        """Stops taking connections; open streams get the grace period, then are closed."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
