"""Vapi REST client (httpx): assistants, phone numbers, calls. Errors become ``VapiApiError``.

Takes an ``httpx.AsyncClient`` (or builds one), so tests and the demo point it at the simulator by
base URL, never by patching. NestJS-style error bodies (``message`` str or list, ``error``,
``statusCode``) are turned into one readable line; the API key never appears in it.
"""

from __future__ import annotations

import json as jsonlib
import ssl
from typing import Any
from xml.etree import ElementTree

import httpx
from httpx_aiohttp import HttpxAiohttpClient
from httpx_aiohttp.transport import AiohttpTransport

from . import __version__, net
from .errors import VapiApiError

MULAW_8K = {"format": "mulaw", "container": "raw", "sampleRate": 8000}
PCM16_16K = {"format": "pcm_s16le", "container": "raw", "sampleRate": 16000}
AUDIO_FORMATS = {"mulaw-8k": MULAW_8K, "pcm16-16k": PCM16_16K}


_FIXED_PATHS = ("/call", "/assistant", "/phone-number")
_DEFAULT_HEADERS = {"accept": "application/json", "user-agent": f"twivapi/{__version__}"}


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code} (non-JSON body)"
    if isinstance(body, dict):
        message = body.get("message", body.get("error", ""))
        if isinstance(message, list):
            message = "; ".join(str(m) for m in message)
        return f"HTTP {response.status_code}: {message}"
    return f"HTTP {response.status_code}"


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (the delta form; an HTTP date is treated as absent)."""
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < 3600 else None


def _with_id(call: Any) -> dict:
    """A created call must be an object with a string id (anything else: an error, never a crash)."""
    if not isinstance(call, dict) or not isinstance(call.get("id"), str) or not call["id"]:
        raise VapiApiError("Vapi POST /call answered without a call id")
    return call


def _is_twiml(text: str) -> bool:
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return False
    return root.tag == "Response"


class VapiClient:
    def __init__(self, base_url: str, api_key: str, *, client: httpx.AsyncClient | None = None,
                 timeout: float = 10.0, max_connections: int = 20, verify: ssl.SSLContext | None = None,
                 control_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        # Live Call Control with monitorPlan.controlAuthenticationEnabled: "Authorization: Bearer
        # <vapi-public-api-key>" (the spec); without it, the control URL needs no key
        self._control_headers = {"Authorization": f"Bearer {control_key}"} if control_key else None
        self._api_key, self._timeout = api_key, timeout
        self._injected = client is not None
        self._verify: ssl.SSLContext | bool = verify or ssl.create_default_context()
        # httpx's API over aiohttp's transport: ~450 µs of CPU per POST /call instead of ~900 µs with
        # httpx's own (benchmarks/bench_webhooks.py); call setup is the bridge's hottest path. One
        # pool for every setup in flight (``max_connections``: TWIVAPI_SETUP_CONCURRENCY and a margin):
        # aiohttp's connector, unlike httpcore's pool, does not scan its connections per request.
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        # Our own client's requests go straight to its transport (``_send``): the client's per-request
        # machinery (URL and header merging, auth, redirects, cookie jar) is half of what is left,
        # ~190 of ~420 µs of CPU per POST /call, for features this API never uses.
        self._transport = None if client is not None else AiohttpTransport(verify=self._verify, limits=limits)
        self._client = client or HttpxAiohttpClient(base_url=self.base_url, timeout=timeout, verify=self._verify,
                                                    limits=limits, transport=self._transport)
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._urls: dict[str, httpx.URL] = {}

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                      timeout: float | None = None, idempotent: bool = False,
                      headers: dict[str, str] | None = None) -> Any:
        """One request; ``idempotent`` ones are sent once more if the connection was reset under them
        (a pooled connection the server closed as we reused it). POST /call never is: a second
        attempt could create a second call. ``headers`` replace the API key's."""
        kwargs: dict[str, Any] = {"json": json, "params": params, "headers": headers or self._headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            try:
                response = await self._send(method, path, **kwargs)
            except httpx.TransportError as exc:
                if not (idempotent and net.is_connection_reset(exc)):
                    raise
                response = await self._send(method, path, **kwargs)
        except httpx.TimeoutException:
            raise VapiApiError(f"Vapi {method} {path} timed out", hint="Vapi is slow or VAPI_BASE_URL is wrong") from None
        except httpx.HTTPError as exc:
            raise VapiApiError(f"Vapi {method} {path} failed: {type(exc).__name__}",
                               hint=f"is VAPI_BASE_URL ({self.base_url}) reachable?") from None
        if response.status_code >= 400:
            hint = "check VAPI_API_KEY" if response.status_code == 401 else None
            raise VapiApiError(f"Vapi {method} {path}: {_error_text(response)}", status=response.status_code,
                               hint=hint, retry_after=_retry_after(response))
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise VapiApiError(f"Vapi {method} {path} answered {response.status_code} with a non-JSON body",
                               status=response.status_code) from None

    async def _send(self, method: str, path: str, *, json: Any, params: dict | None, headers: dict[str, str],
                    timeout: float | None = None) -> httpx.Response:
        """One request, read whole: through an injected client as given, else to our transport."""
        if self._transport is None:
            if timeout is None:
                return await self._client.request(method, path, json=json, params=params, headers=headers)
            return await self._client.request(method, path, json=json, params=params, headers=headers, timeout=timeout)
        url = self._urls.get(path) if not params else None
        if url is None:
            absolute = path.startswith(("http://", "https://"))   # a call's control URL
            url = httpx.URL(path if absolute else self.base_url + path, params=params)
            if not params and path in _FIXED_PATHS:   # parsed once: not the per-call ones
                self._urls[path] = url
        content = None if json is None else jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":"),
                                                           allow_nan=False).encode()
        request = httpx.Request(method, url, headers={**_DEFAULT_HEADERS, **headers}, content=content,
                                extensions={"timeout": httpx.Timeout(timeout or self._timeout).as_dict()})
        if content is not None:
            request.headers["content-type"] = "application/json"
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    # --- calls ----------------------------------------------------------------------------------
    async def create_websocket_call(self, assistant_id: str, audio_format: str = "mulaw-8k", *,
                                    metadata: dict | None = None, timeout: float | None = None) -> dict:
        body = {"assistantId": assistant_id,
                "transport": {"provider": "vapi.websocket", "audioFormat": AUDIO_FORMATS[audio_format]}}
        if metadata:  # CreateCallDTO has no top-level metadata; the assistant overrides do
            body["assistantOverrides"] = {"metadata": metadata}
        call = _with_id(await self.request("POST", "/call", json=body, timeout=timeout))
        transport = call.get("transport")
        url = transport.get("websocketCallUrl") if isinstance(transport, dict) else None
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            await self._refuse(call, "Vapi POST /call answered without a transport.websocketCallUrl")
        return call

    async def create_bypass_call(self, assistant_id: str, phone_number_id: str, customer_number: str, *,
                                 metadata: dict | None = None, timeout: float | None = None) -> dict:
        body = {"assistantId": assistant_id, "phoneNumberId": phone_number_id,
                "phoneCallProviderBypassEnabled": True, "customer": {"number": customer_number}}
        if metadata:
            body["assistantOverrides"] = {"metadata": metadata}
        call = _with_id(await self.request("POST", "/call", json=body, timeout=timeout))
        details = call.get("phoneCallProviderDetails")
        twiml = details.get("twiml") if isinstance(details, dict) else None
        if not isinstance(twiml, str) or not _is_twiml(twiml):
            # Twilio would tell the caller "an application error has occurred": refuse it instead
            await self._refuse(call, "Vapi POST /call (bypass) answered without a <Response> TwiML document "
                                     "in phoneCallProviderDetails.twiml")
        return call

    async def get_call(self, call_id: str) -> dict:
        return await self.request("GET", f"/call/{call_id}")

    async def _refuse(self, call: dict, why: str) -> None:
        """A created call we cannot use: end it (if it says how), never leave it running; raise why."""
        try:
            await self.end_call(call)
        except VapiApiError:
            pass
        raise VapiApiError(why)

    async def end_call(self, call: dict) -> None:
        """End a live call through Live Call Control (never DELETE /call: that erases data)."""
        monitor = call.get("monitor")
        control_url = monitor.get("controlUrl") if isinstance(monitor, dict) else None
        if not isinstance(control_url, str) or not control_url:
            return
        await self.request("POST", control_url, json={"type": "end-call"}, idempotent=True,  # ending twice is harmless
                           headers=self._control_headers)

    # --- assistants and numbers -----------------------------------------------------------------
    async def list_assistants(self) -> list[dict]:
        return await self.request("GET", "/assistant", params={"limit": 1000}) or []

    async def create_assistant(self, body: dict) -> dict:
        return await self.request("POST", "/assistant", json=body)

    async def update_assistant(self, assistant_id: str, body: dict) -> dict:
        return await self.request("PATCH", f"/assistant/{assistant_id}", json=body)

    async def get_assistant(self, assistant_id: str) -> dict:
        return await self.request("GET", f"/assistant/{assistant_id}")

    async def delete_assistant(self, assistant_id: str) -> None:
        await self.request("DELETE", f"/assistant/{assistant_id}")

    async def list_phone_numbers(self) -> list[dict]:
        return await self.request("GET", "/phone-number", params={"limit": 1000}) or []

    async def import_twilio_number(self, body: dict) -> dict:
        return await self.request("POST", "/phone-number", json={"provider": "twilio", **body})

    async def update_phone_number(self, number_id: str, body: dict) -> dict:
        return await self.request("PATCH", f"/phone-number/{number_id}", json=body)

    async def delete_phone_number(self, number_id: str) -> None:
        await self.request("DELETE", f"/phone-number/{number_id}")
