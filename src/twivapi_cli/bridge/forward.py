"""`serve --forward-to URL`: every Vapi server message, as Vapi sent it, to the user's app too.

The body is forwarded byte for byte with the credential the app would check on Vapi's own request
(the kind the bridge accepted: ``X-Vapi-Secret``, bearer, the plain ``X-Vapi-Signature``, or an HMAC
re-computed for the app's URL with a fresh timestamp), plus ``X-Twivapi-Call-Sid``,
``X-Twivapi-Message-Type`` and ``X-Twivapi-Forwarded-By``.

- Request messages (tool-calls...) are answered with the app's answer, within
  ``TWIVAPI_FORWARD_TIMEOUT``; a timeout, a connection error, a non-2xx status or a body that is not
  a JSON object gives the bridge's built-in answer instead (``answer``'s fallback), logged and
  counted (``forward.fallback``).
- Informational messages never hold the ack (``inform``): they wait in one bounded queue per app,
  delivered in order per call (one line per call, concurrent across calls) with retries and
  exponential backoff; what does not fit or is never delivered is dropped and counted
  (``forward.dropped``).
- ``--forward-twilio-to``: Twilio's status callbacks, the same way as informational messages, their
  ``X-Twilio-Signature`` computed for the app's URL.

The bridge's own processing (state, barge-in, ending calls) happens before any of this.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from .. import __version__, net, signing
from ..config import Settings, revealed
from .events import Recorder
from .http import HttpError, parse_json_object

log = logging.getLogger("twivapi.bridge")

BACKOFF_S = 0.25          # the first retry's wait; doubled each time
BACKOFF_MAX_S = 8.0
CONCURRENCY = 32          # deliveries in flight at once, across calls
STOP_GRACE_S = 2.0        # a stopping bridge waits this long for its queue to empty
PERMANENT = frozenset(range(400, 500)) - {408, 425, 429}   # the app refused the message: not retried
DROP_LOG_EVERY = 100      # past the first drop, one line per this many

Signer = Callable[[str], dict[str, str]]   # the credential headers for the URL posted to


def where(url: str) -> str:
    """A URL as logs may show it: scheme, host and path (no user:password@, no query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def vapi_signer(settings: Settings, how: str, headers: Mapping[str, str], body: bytes) -> Signer:
    """The credential Vapi's request carried (``how``: what ``signing.verify_vapi`` matched), made
    again for the app's request: the same secret, or the configured HMAC plan over the same body."""
    from .vapi_hooks import hmac_plan

    secret = revealed(settings.vapi_webhook_secret)
    mode = {"x-vapi-secret": "secret", "bearer": "bearer", "x-vapi-signature": "signature", "hmac": "hmac",
            "hmac-body": "hmac-body"}.get(how, "secret")
    plan = hmac_plan(settings)
    message_id = headers.get(plan.message_id_header, "") if plan.message_id_header else ""
    return lambda url: signing.sign_vapi(secret, body, mode, plan=plan, url=url, message_id=message_id)


def twilio_signer(settings: Settings, body: bytes, params: signing.Params | None) -> Callable[[str], tuple[str, str]]:
    """(URL to post to, X-Twilio-Signature) for a Twilio callback re-sent to the app's URL: form
    parameters signed with the URL, or a JSON body through ``bodySHA256``."""
    token = revealed(settings.twilio_auth_token)
    if params is None:
        return lambda url: signing.sign_twilio_json(token, url, body)
    return lambda url: (url, signing.twilio_signature(token, url, params))


@dataclass
class Delivery:
    url: str
    body: bytes
    headers: dict[str, str]                        # besides the credential
    credential: Callable[[str], tuple[str, dict[str, str]]]   # url -> (url to post to, credential headers)
    what: str                                      # for logs: "vapi status-update", "twilio status"
    call_sid: str | None


class Forwarder:
    def __init__(self, settings: Settings, recorder: Recorder, instance: str):
        self.settings, self.recorder = settings, recorder
        self.vapi_url, self.twilio_url = settings.forward_url, settings.forward_twilio_url
        self.forwarded_by = f"twivapi/{__version__} {instance}"
        self._client: httpx.AsyncClient | None = None
        self._lines: dict[str, collections.deque[Delivery]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self.queued = 0

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:   # made on first use, on the serving loop
            self._client = net.async_client(timeout=self.settings.forward_timeout, follow_redirects=False)
        return self._client

    def _headers(self, kind: str, call_sid: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"X-Twivapi-Forwarded-By": self.forwarded_by, "X-Twivapi-Message-Type": kind, **(extra or {})}
        if call_sid:
            headers["X-Twivapi-Call-Sid"] = call_sid
        return headers

    # --- request messages: the app's answer, or the built-in one -----------------------------------

    async def answer(self, kind: str, body: bytes, sign: Signer, call_sid: str | None,
                     builtin: Callable[[], Awaitable[dict | None]]) -> dict | None:
        """The app's answer to a request message, or ``builtin()``'s when it has none in time."""
        url = self.vapi_url
        assert url is not None
        headers = {"Content-Type": "application/json", **self._headers(kind, call_sid), **sign(url)}
        try:
            async with asyncio.timeout(self.settings.forward_timeout):
                response = await self._http().post(url, content=body, headers=headers)
                content = await response.aread()
            if not 200 <= response.status_code < 300:
                raise _Refused(f"answered HTTP {response.status_code}")
            reply = parse_json_object(content, not_object=("not_object", "its answer is not a JSON object"))
        except TimeoutError:
            return await self._fallback(kind, call_sid, f"no answer within {self.settings.forward_timeout:g} s "
                                                        "(TWIVAPI_FORWARD_TIMEOUT)", builtin)
        except httpx.HTTPError as exc:
            return await self._fallback(kind, call_sid, f"unreachable ({type(exc).__name__})", builtin)
        except HttpError as exc:
            return await self._fallback(kind, call_sid, f"its answer is not a JSON object ({exc.message})", builtin)
        except _Refused as exc:
            return await self._fallback(kind, call_sid, str(exc), builtin)
        self.recorder.count("forward.answered")
        return reply

    async def _fallback(self, kind: str, call_sid: str | None, why: str,
                        builtin: Callable[[], Awaitable[dict | None]]) -> dict | None:
        assert self.vapi_url is not None
        log.warning("forward %s to %s: %s; answered with the bridge's built-in answer", kind, where(self.vapi_url), why)
        await self.recorder.record("forward.fallback", call_sid, type=kind, reason=why)
        return await builtin()

    # --- informational messages: queued, in order per call -----------------------------------------

    def inform_vapi(self, kind: str, body: bytes, sign: Signer, call_sid: str | None, key: str) -> bool:
        """Queue an informational Vapi message for the app; False when dropped (the queue is full)."""
        if self.vapi_url is None:
            return False
        delivery = Delivery(self.vapi_url, body, {"Content-Type": "application/json", **self._headers(kind, call_sid)},
                            lambda url: (url, sign(url)), f"vapi {kind}", call_sid)
        return self._enqueue("vapi:" + key, delivery)

    def inform_twilio(self, call_sid: str, body: bytes, content_type: str, params: signing.Params | None,
                      idempotency_token: str | None) -> bool:
        """Queue a Twilio status callback for ``--forward-twilio-to``, signed for its URL."""
        if self.twilio_url is None:
            return False
        signer = twilio_signer(self.settings, body, params)

        def credential(url: str) -> tuple[str, dict[str, str]]:
            target, signature = signer(url)
            return target, {signing.TWILIO_SIGNATURE_HEADER: signature}

        extra = {"Content-Type": content_type or "application/x-www-form-urlencoded"}
        if idempotency_token:
            extra["I-Twilio-Idempotency-Token"] = idempotency_token
        delivery = Delivery(self.twilio_url, body, self._headers("twilio-status", call_sid, extra), credential,
                            "twilio status callback", call_sid)
        return self._enqueue("twilio:" + call_sid, delivery)

    def _enqueue(self, key: str, delivery: Delivery) -> bool:
        if self.queued >= self.settings.forward_queue_limit:
            self._drop(delivery, f"the queue is full ({self.settings.forward_queue_limit}, TWIVAPI_FORWARD_QUEUE_LIMIT)")
            return False
        self._lines.setdefault(key, collections.deque()).append(delivery)
        self.queued += 1
        if key not in self._workers:
            self._workers[key] = asyncio.create_task(self._drain(key), name=f"forward-{key}")
        return True

    def _drop(self, delivery: Delivery, why: str) -> None:
        self.recorder.count("forward.dropped")
        dropped = self.recorder.counters["forward.dropped"]
        if dropped == 1 or dropped % DROP_LOG_EVERY == 0:
            log.warning("forward %s to %s: dropped, %s (%d dropped so far)", delivery.what, where(delivery.url), why,
                        dropped)

    async def _drain(self, key: str) -> None:
        line = self._lines[key]
        try:
            while line:
                try:
                    await self._deliver(line[0])
                except Exception:   # a bug must not stall the call's line: drop this one, go on
                    log.exception("forward %s: unexpected error", line[0].what)
                    self._drop(line[0], "an unexpected error (logged)")
                line.popleft()
                self.queued -= 1
        finally:
            if not line:   # no await between this check and the removal: nothing can slip in unseen
                del self._lines[key]
                del self._workers[key]

    async def _deliver(self, delivery: Delivery) -> None:
        """Send with retries and backoff; the call's later messages wait meanwhile (order per call)."""
        why = ""
        for attempt in range(self.settings.forward_retries):
            if attempt:
                self.recorder.count("forward.retried")
                await asyncio.sleep(min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1)))
            url, credential = delivery.credential(delivery.url)   # a fresh HMAC timestamp each time
            try:
                async with self._slots, asyncio.timeout(self.settings.forward_timeout):
                    response = await self._http().post(url, content=delivery.body,
                                                       headers={**delivery.headers, **credential})
                    await response.aread()
            except TimeoutError:
                why = f"no answer within {self.settings.forward_timeout:g} s"
                continue
            except httpx.HTTPError as exc:
                why = f"unreachable ({type(exc).__name__})"
                continue
            if 200 <= response.status_code < 300:
                self.recorder.count("forward.delivered")
                return
            why = f"answered HTTP {response.status_code}"
            if response.status_code in PERMANENT:
                break
        self._drop(delivery, f"not delivered: {why}")

    # --- the rest --------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        counters = self.recorder.counters
        if self.vapi_url is None and self.twilio_url is None:
            return {}
        return {"forward_queued": self.queued, "forward_dropped": counters.get("forward.dropped", 0),
                "forward_fallbacks": counters.get("forward.fallback", 0)}

    async def stop(self) -> None:
        """Give the queue ``STOP_GRACE_S`` to empty, then drop (and count) what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE_S
        while self._workers and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for task in list(self._workers.values()):
            task.cancel()
        for line in list(self._lines.values()):
            for delivery in line:
                self._drop(delivery, "the bridge stopped first")
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class _Refused(Exception):
    pass


def unreachable(url: str, timeout: float = 2.0) -> str | None:
    """Why ``url`` cannot be reached now (for serve's start-up warning), or None: any HTTP answer,
    even a 404 or 405, means the app is there."""
    try:
        with httpx.Client(timeout=timeout) as client:
            client.get(url)
    except httpx.HTTPError as exc:
        text = str(exc).replace(url, where(url))   # never the URL's query or user:password@
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return None
