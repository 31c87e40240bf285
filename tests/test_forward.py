"""`serve --forward-to` / `--forward-twilio-to`: a real app on loopback (Starlette on uvicorn) as the
forward target of a real bridge: byte-identical bodies with a credential the app can verify, its
answers returned, the built-in answer when it is slow, down or wrong, the informational queue's
order per call, its drops counted, Twilio's callbacks re-signed for the app's URL."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from twivapi_cli import signing
from twivapi_cli.bridge.admin import create_admin_app
from twivapi_cli.bridge.server import start_in_thread
from twivapi_cli.store.memory import MemoryStore
from twivapi_cli.ui import tail_view

from .polling import wait_for
from .support import PUBLIC, TOKEN, VAPI_SECRET, bridge_settings, free_port, new_call_sid, running_bridge

NO_VAPI = "http://127.0.0.1:9"   # tool calls and status messages never reach Vapi's REST API
APP_ANSWER = {"results": [{"toolCallId": "t1", "result": "from the app"}]}


class App:
    """The user's app: records every request (path, headers, raw body) and answers as its route says."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.release = threading.Event()   # /blocked waits for it
        self.failures: dict[bytes, int] = {}   # /flaky: body -> failures so far
        self.server = start_in_thread(Starlette(routes=[
            Route("/{kind}", self.hook, methods=["POST", "GET"])]))
        self.url = self.server.url

    async def hook(self, request: Request) -> Response:
        kind = request.path_params["kind"]
        body = await request.body()
        if request.method == "GET":
            return Response(status_code=405)
        self.seen.append((kind, dict(request.headers), body))
        if kind == "slow":
            await asyncio.sleep(5)
        if kind == "blocked":
            await asyncio.to_thread(self.release.wait, 20)
        if kind == "error":
            return JSONResponse({"error": "boom"}, status_code=500)
        if kind == "text":
            return Response("ok, thanks", media_type="text/plain")
        if kind == "flaky" and self.failures.get(body, 0) < 1:   # each message fails once, then goes through
            self.failures[body] = self.failures.get(body, 0) + 1
            return Response(status_code=503)
        return JSONResponse(APP_ANSWER)

    def bodies(self, kind: str) -> list[bytes]:
        return [body for k, _, body in self.seen if k == kind]

    def stop(self) -> None:
        self.release.set()
        self.server.stop()


@pytest.fixture(scope="module")
def app():
    running = App()
    yield running
    running.stop()


@pytest.fixture
def fresh(app):
    app.seen.clear()
    app.failures.clear()
    app.release.clear()
    yield app
    app.release.set()


def forwarding(target: str, **extra: str):
    return running_bridge(bridge_settings(NO_VAPI, TWIVAPI_FORWARD_URL=target, **extra), MemoryStore())


def tool_calls(sid: str, order: str = "A1") -> dict:
    return {"type": "tool-calls", "call": {"id": "v-" + sid, "phoneCallProviderId": sid}, "toolCallList": [
        {"id": "t1", "type": "function", "function": {"name": "lookup_order", "arguments": {"order_id": order}}}]}


def post_signed(bridge, message: dict, headers: dict) -> httpx.Response:
    body = json.dumps({"message": message}).encode()
    return bridge.http.post(bridge.url + "/vapi/webhook", content=body,
                            headers={"content-type": "application/json", **headers(body)})


@pytest.mark.parametrize("mode", ["secret", "bearer", "hmac"])
def test_a_tool_call_reaches_the_app_byte_identical_and_its_answer_comes_back(fresh, mode):
    sid = new_call_sid()
    with forwarding(fresh.url + "/answer") as bridge:
        body = json.dumps({"message": tool_calls(sid)}, indent=3).encode()   # odd spacing: bytes, not JSON, kept
        reply = bridge.http.post(bridge.url + "/vapi/webhook", content=body, headers={
            "content-type": "application/json", **signing.sign_vapi(VAPI_SECRET, body, mode)})
        assert reply.status_code == 200 and reply.json() == APP_ANSWER
    [(_, headers, got)] = fresh.seen
    assert got == body
    ok, how = signing.verify_vapi(VAPI_SECRET, httpx.Headers(headers), got)
    assert ok, how
    assert headers["x-twivapi-call-sid"] == sid and headers["x-twivapi-message-type"] == "tool-calls"
    assert headers["x-twivapi-forwarded-by"].startswith("twivapi/")


def test_an_hmac_plan_over_the_url_is_recomputed_for_the_app_s_url(fresh):
    """The plan signs {url}: Vapi's signature is for the bridge's URL, the app's must be for its own."""
    plan = signing.HmacPlan(payload_format="{url}:{timestamp}:{body}", signature_header="x-acme-sig",
                            algorithm="sha512", signature_encoding="base64")
    extra = {"VAPI_HMAC_PAYLOAD_FORMAT": plan.payload_format, "VAPI_HMAC_SIGNATURE_HEADER": "x-acme-sig",
             "VAPI_HMAC_ALGORITHM": "sha512", "VAPI_HMAC_ENCODING": "base64"}
    target = fresh.url + "/answer"
    with forwarding(target, **extra) as bridge:
        reply = post_signed(bridge, tool_calls(new_call_sid()), lambda body: signing.sign_vapi(
            VAPI_SECRET, body, "hmac", plan=plan, url=PUBLIC + "/vapi/webhook"))
        assert reply.status_code == 200 and reply.json() == APP_ANSWER
    [(_, headers, body)] = fresh.seen
    assert signing.verify_vapi(VAPI_SECRET, httpx.Headers(headers), body, plan=plan, url=target) == (True, "hmac")
    assert not signing.verify_vapi(VAPI_SECRET, httpx.Headers(headers), body, plan=plan,
                                   url=PUBLIC + "/vapi/webhook")[0]


@pytest.mark.parametrize("kind", ["slow", "error", "text", "down"])
def test_a_slow_failing_or_absent_app_gives_the_built_in_answer(fresh, kind, caplog):
    target = f"http://127.0.0.1:{free_port()}/hook?token=sekret-in-the-query" if kind == "down" else \
        f"{fresh.url}/{kind}"
    with forwarding(target, TWIVAPI_FORWARD_TIMEOUT="0.5") as bridge, caplog.at_level("WARNING", "twivapi.bridge"):
        started = time.monotonic()
        reply = bridge.vapi(tool_calls(new_call_sid(), "B2"))
        elapsed = time.monotonic() - started
        assert reply.status_code == 200
        assert reply.json()["results"][0]["result"] == "order B2 is processing"   # the built-in tool's
        assert elapsed < 4.5   # the 0.5 s deadline, not the app's 5 s (a generous bound on a loaded machine)
        assert bridge.deps.recorder.counters["forward.fallback"] == 1
        other = bridge.vapi({"type": "assistant-request", "call": {"id": "c1"}})
        assert other.json() == {"assistantId": "asst-test"}   # every request type falls back the same way
    logged = " ".join(r.getMessage() for r in caplog.records if "forward" in r.getMessage())
    assert "built-in answer" in logged and "sekret" not in logged and VAPI_SECRET not in logged


def test_informational_messages_never_hold_the_ack_and_keep_their_order_per_call(fresh):
    with forwarding(fresh.url + "/blocked") as bridge:
        calls = {sid: [f"s{i}" for i in range(8)] for sid in (new_call_sid(), new_call_sid())}
        for i in range(8):
            for sid, statuses in calls.items():
                reply = bridge.vapi({"type": "speech-update", "role": "assistant", "status": statuses[i],
                                     "call": {"id": "v-" + sid, "phoneCallProviderId": sid}})
                assert reply.status_code == 200 and reply.json() == {}   # acked while the app is stuck
        wait_for(lambda: len(fresh.seen) == 2, "the first message of each call in flight")
        assert bridge.deps.forwarder.queued == 16
        fresh.release.set()
        wait_for(lambda: len(fresh.seen) == 16, "all forwarded", timeout=15)
    for sid, statuses in calls.items():
        got = [json.loads(body)["message"]["status"] for _, headers, body in fresh.seen
               if headers["x-twivapi-call-sid"] == sid]
        assert got == statuses


def test_retries_with_backoff_keep_the_order(fresh):
    sid = new_call_sid()
    with forwarding(fresh.url + "/flaky") as bridge:
        for status in ("queued", "ringing", "in-progress"):
            bridge.vapi({"type": "status-update", "status": status, "call": {"id": "v1", "phoneCallProviderId": sid}})
        wait_for(lambda: bridge.deps.recorder.counters.get("forward.delivered") == 3, "delivered", timeout=15)
        assert bridge.deps.recorder.counters["forward.retried"] == 3
    delivered = [json.loads(body)["message"]["status"] for body in fresh.bodies("flaky")]
    assert delivered == ["queued"] * 2 + ["ringing"] * 2 + ["in-progress"] * 2   # a retry before the next one


def test_what_does_not_fit_the_queue_is_dropped_and_counted_in_metrics_and_health(fresh):
    with forwarding(fresh.url + "/blocked", TWIVAPI_FORWARD_QUEUE_LIMIT="3") as bridge:
        admin = start_in_thread(create_admin_app(bridge.app, None))
        try:
            for i in range(10):
                assert bridge.vapi({"type": "transcript", "role": "user", "transcript": f"t{i}",
                                    "transcriptType": "final", "call": {"id": f"v{i % 2}"}}).status_code == 200
            assert bridge.deps.recorder.counters["forward.dropped"] == 7
            metrics = httpx.get(admin.url + "/metrics").text
            assert "twivapi_forward_dropped_total 7.0" in metrics and "twivapi_forward_queued 3.0" in metrics
            assert httpx.get(bridge.url + "/health").json()["forward_dropped"] == 7
            counters = httpx.get(admin.url + "/latency").json()["counters"]   # what `twivapi tail` shows
            assert counters["forward.dropped"] == 7
            assert "forward: 0 answered by your app, 0 built-in fallbacks, 0 delivered, 0 retries, 7 dropped" in \
                _rendered(tail_view({"sessions": [], "latency": {}, "counters": counters}, []))
        finally:
            fresh.release.set()
            admin.stop()


def _rendered(renderable) -> str:
    from rich.console import Console
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_twilio_status_callbacks_are_re_signed_for_the_app_s_url(fresh):
    target = fresh.url + "/twilio-status"
    sid = new_call_sid()
    with running_bridge(bridge_settings(NO_VAPI, TWIVAPI_FORWARD_TWILIO_URL=target), MemoryStore()) as bridge:
        assert bridge.status(sid, "completed", sequence=3, **{"I-Twilio-Idempotency-Token": "tok-1"}).status_code == 204
        assert bridge.status(sid, "completed", sequence=3, **{"I-Twilio-Idempotency-Token": "tok-1"}).status_code == 204
        wait_for(lambda: fresh.bodies("twilio-status"), "forwarded")
        time.sleep(0.2)   # a retry would be forwarded by now too
    [(_, headers, body)] = fresh.seen   # Twilio's retry (same idempotency token) is not forwarded again
    params = signing.parse_form(body)
    assert params.first("CallSid") == sid and params.first("CallStatus") == "completed"
    assert RequestValidator(TOKEN).validate(target, {k: v[0] for k, v in params.items()},
                                            headers["x-twilio-signature"])
    assert headers["i-twilio-idempotency-token"] == "tok-1" and headers["x-twivapi-call-sid"] == sid


def test_a_json_twilio_callback_is_re_signed_through_body_sha256(fresh):
    target = fresh.url + "/twilio-json"
    sid = new_call_sid()
    body = json.dumps({"CallSid": sid, "CallStatus": "completed"}).encode()
    with running_bridge(bridge_settings(NO_VAPI, TWIVAPI_FORWARD_TWILIO_URL=target), MemoryStore()) as bridge:
        signed_url, signature = signing.sign_twilio_json(TOKEN, PUBLIC + "/twilio/status", body)
        path = signed_url.removeprefix(PUBLIC)
        reply = bridge.http.post(bridge.url + path, content=body, headers={
            "content-type": "application/json", "X-Twilio-Signature": signature})
        assert reply.status_code == 204
        wait_for(lambda: fresh.bodies("twilio-json"), "forwarded")
    [(_, headers, got)] = fresh.seen
    assert got == body
    forwarded_url = signing.url_with_body_hash(target, body)
    assert RequestValidator(TOKEN).validate(forwarded_url, body.decode(), headers["x-twilio-signature"])


def test_forwarding_is_off_without_a_url(fresh):
    with running_bridge(bridge_settings(NO_VAPI), MemoryStore()) as bridge:
        assert bridge.vapi(tool_calls(new_call_sid())).json()["results"][0]["result"] == "order A1 is shipped"
        assert bridge.vapi({"type": "hang", "call": {"id": "v1"}}).json() == {}
        assert "forward_dropped" not in httpx.get(bridge.url + "/health").json()
    assert fresh.seen == []
