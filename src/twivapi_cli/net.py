"""HTTP clients for the tools that *send* webhooks (replay, the simulated caller and assistant).

They set TCP_NODELAY: httpx writes a request's headers and body separately, and with Nagle's
algorithm on, the body waits for the server's delayed ACK: 40 ms per request on loopback
(measured: a webhook round trip of 44 ms instead of under 2 ms).
"""

from __future__ import annotations

import socket

import httpx

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def async_client(**options) -> httpx.AsyncClient:
    limits = options.pop("limits", httpx.Limits(max_connections=100, max_keepalive_connections=20))
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(socket_options=NODELAY, limits=limits), **options)


def client(**options) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(socket_options=NODELAY), **options)
