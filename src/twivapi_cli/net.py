"""HTTP clients for the tools that *send* webhooks (replay, the simulated caller and assistant).

- TCP_NODELAY: httpx's own transport writes a request's headers and body separately, and with
  Nagle's algorithm on the body waits for the server's delayed ACK: 40 ms per request on loopback
  (measured: 44 ms instead of under 2 ms). aiohttp sets it by itself.
- The async client is httpx's API on aiohttp's transport: httpcore's pool checks every pooled
  connection on every request, which at replay's concurrency cost 3.6 ms of CPU per request
  (measured: 275 requests/s); aiohttp's connector does not.
- A request that is idempotent by design (a Twilio webhook carrying its I-Twilio-Idempotency-Token,
  a Vapi message the receiver deduplicates, ending a call) is sent again once when the connection
  was reset under it, as Twilio does by default (``rc=1``, ``rp=ct``): a pooled connection can be
  closed by the server just as it is reused. Nothing else is retried here.
- One TLS context for every async client: httpx builds one per client otherwise (~18 ms of CPU,
  loading the CA bundle), and the simulated assistant makes a client per call; at 100 concurrent
  call starts that serialized the simulator's loop for ~2 s (tests/test_soak.py found it).
"""

from __future__ import annotations

import errno
import functools
import socket
import ssl
from typing import Any

import httpx

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@functools.cache
def tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()   # what httpx would build for each client: certifi's CA bundle


def async_client(**options: Any) -> httpx.AsyncClient:
    from httpx_aiohttp import HttpxAiohttpClient

    limits = options.pop("limits", httpx.Limits(max_connections=100, max_keepalive_connections=100))
    options.setdefault("verify", tls_context())
    return HttpxAiohttpClient(limits=limits, **options)


def client(**options: Any) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(socket_options=NODELAY), **options)


_RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED}


def is_connection_reset(exc: BaseException) -> bool:
    """The connection was closed under the request (reset, or closed before any response) rather
    than the server being slow or unreachable. httpx-aiohttp maps aiohttp's disconnects to
    ``ConnectTimeout``, so the cause chain is what tells."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                             httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return True
        if isinstance(seen, OSError) and seen.errno in _RESET_ERRNOS:
            return True
        if type(seen).__name__ == "ServerDisconnectedError":   # aiohttp's, without importing it here
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def post_idempotent(client: httpx.AsyncClient, url: str, **options: Any) -> httpx.Response:
    """POST a request that is safe to repeat; once more if the connection was reset under it."""
    try:
        return await client.post(url, **options)
    except httpx.TransportError as exc:
        if not is_connection_reset(exc):
            raise
    return await client.post(url, **options)
