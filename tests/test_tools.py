"""`serve --tools module:attr`, `twivapi tools schema`, `provision --tools`: the public ``@tool`` API,
the JSON Schema from signatures (what Vapi's CreateFunctionToolDTO accepts, checked by the spec and
by the simulator), validation, errors and timeouts as error results, loading errors (exit 2)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from twivapi_cli.bridge.tools import ToolRegistry
from twivapi_cli.cli import app
from twivapi_cli.store.memory import MemoryStore
from twivapi_cli.tools import Tool, as_tool, load_tools, tool

from .support import (
    PUBLIC,
    TOKEN,
    VAPI_KEY,
    VAPI_SECRET,
    bridge_settings,
    free_port,
    new_call_sid,
    running_bridge,
    start_serve,
)

runner = CliRunner()

TOOLS_FILE = '''
import asyncio
import time
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, Field

from twivapi_cli.tools import tool


class Guest(BaseModel):
    name: str
    vip: bool = False


@tool
def book_table(day: Annotated[str, "the day, e.g. friday"], people: Annotated[int, Field(ge=1, le=12)],
               seating: Literal["inside", "terrace"] = "inside", note: Optional[str] = None,
               guests: list[Guest] = []) -> str:
    """Book a table at the restaurant."""
    return f"booked {seating} for {people} on {day}" + (f" ({len(guests)} named)" if guests else "")


@tool(name="order-status", timeout=0.3)
async def lookup(order_id: str) -> dict:
    """Where an order is."""
    if order_id == "slow":
        await asyncio.sleep(5)
    if order_id == "bad":
        raise LookupError(f"no order {order_id}")
    return {"order": order_id, "status": "shipped"}


@tool(timeout=0.3)
def blocking(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


def plain(text: str) -> str:
    return text.upper()


ALL = [book_table, lookup, plain]
'''


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("usertools") / "my_tools.py"
    path.write_text(TOOLS_FILE)
    return path


@pytest.fixture(scope="module")
def tools(tools_file) -> dict[str, Tool]:
    return {t.name: t for t in load_tools(f"{tools_file}:ALL") + load_tools(f"{tools_file}:blocking")}


def test_the_definition_comes_from_the_signature_and_the_docstring(tools):
    definition = tools["book_table"].definition()
    assert definition == {"type": "function", "function": {
        "name": "book_table", "description": "Book a table at the restaurant.",
        "parameters": {"type": "object", "required": ["day", "people"], "properties": {
            "day": {"type": "string", "description": "the day, e.g. friday"},
            "people": {"type": "integer"},
            "seating": {"type": "string", "enum": ["inside", "terrace"], "description": "(default: inside)"},
            "note": {"type": "string", "description": "(default: None)"},
            "guests": {"type": "array", "description": "(default: [])", "items": {
                "type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string"}, "vip": {"type": "boolean", "description": "(default: False)"}}}}}}}}
    assert tools["order-status"].definition()["function"]["description"] == "Where an order is."
    assert tools["plain"].definition()["function"] == {   # undecorated, in a list: a tool all the same
        "name": "plain", "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
                                        "required": ["text"]}}


def test_the_definitions_conform_to_vapi_s_spec(tools):
    from .test_sim_vapi import conforms, spec_or_skip
    spec_or_skip()
    for found in tools.values():
        conforms(found.definition(), "CreateFunctionToolDTO")


def _registry(tools) -> ToolRegistry:
    registry = ToolRegistry.default()
    for found in tools.values():
        registry.add(found, timeout=5.0)
    return registry


async def _run(registry: ToolRegistry, name: str, arguments) -> dict:
    return await registry.run_one({"id": "t1", "function": {"name": name, "arguments": arguments}})


@pytest.mark.parametrize("name, arguments, expected", [
    ("book_table", {"day": "friday", "people": 4}, {"result": "booked inside for 4 on friday"}),
    ("book_table", '{"day": "sat", "people": "2", "seating": "terrace", "guests": [{"name": "Ann"}]}',
     {"result": "booked terrace for 2 on sat (1 named)"}),                     # a JSON string, "2" coerced
    ("order-status", {"order_id": "A1"}, {"result": '{"order":"A1","status":"shipped"}'}),
    ("plain", {"text": "hi", "invented": 1}, {"result": "HI"}),                # extra arguments ignored
    ("lookup_order", {"order_id": "A1"}, {"result": "order A1 is shipped"}),   # the built-ins still work
])
async def test_valid_arguments_reach_the_function(tools, name, arguments, expected):
    result = await _run(_registry(tools), name, arguments)
    assert {k: v for k, v in result.items() if k in ("result", "error")} == expected


@pytest.mark.parametrize("name, arguments, error", [
    ("book_table", {"day": "friday"}, "invalid arguments for 'book_table': people: Field required"),
    ("book_table", {"day": "fri", "people": 40}, "people: Input should be less than or equal to 12"),
    ("book_table", {"day": "fri", "people": 2, "seating": "roof"}, "seating: Input should be 'inside' or 'terrace'"),
    ("order-status", {"order_id": "bad"}, "LookupError: no order bad"),
    ("order-status", {"order_id": "slow"}, "tool 'order-status' timed out"),     # async, its own 0.3 s
    ("blocking", {"seconds": 1}, "tool 'blocking' timed out"),                  # sync: in a thread, cut too
])
async def test_bad_arguments_errors_and_timeouts_are_error_results(tools, name, arguments, error):
    result = await _run(_registry(tools), name, arguments)
    assert "result" not in result and error in result["error"], result
    assert "\n" not in result["error"]


def test_the_decorator_keeps_the_function_and_refuses_what_vapi_would():
    @tool
    def add(a: int, b: int = 1) -> int:
        return a + b
    assert add(2) == 3 and as_tool(add).name == "add"
    with pytest.raises(ValueError, match="1-64 letters"):
        tool(name="no spaces please")(lambda: None)
    with pytest.raises(ValueError, match=r"\*args"):
        tool(name="many")(lambda *items: None)
    with pytest.raises(ValueError, match="must not start with '_'"):
        tool(name="private")(lambda _hidden: None)

    def unresolved(x: NotImported) -> None:  # noqa: F821
        pass
    with pytest.raises(ValueError, match="annotations do not resolve"):
        tool(unresolved)


def test_serve_tools_answers_tool_calls_from_the_module(tools_file):
    settings = bridge_settings("http://127.0.0.1:9", TWIVAPI_TOOLS=f"{tools_file}:ALL")
    with running_bridge(settings, MemoryStore()) as bridge:
        reply = bridge.vapi({"type": "tool-calls", "call": {"id": "v1"}, "toolCallList": [
            {"id": "a", "type": "function", "function": {"name": "book_table", "arguments": {"day": "mon", "people": 3}}},
            {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": {}}}]}).json()
    assert reply["results"][0] == {"toolCallId": "a", "name": "book_table", "result": "booked inside for 3 on mon"}
    assert reply["results"][1]["result"].startswith("20")


def test_tools_schema_prints_the_definitions(tools_file):
    result = runner.invoke(app, ["tools", "schema", f"{tools_file}:ALL"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert [d["function"]["name"] for d in printed] == ["book_table", "order-status", "plain"]
    module = runner.invoke(app, ["tools", "schema", str(tools_file)])   # no :attr: the module's @tool functions
    assert [d["function"]["name"] for d in json.loads(module.stdout)] == ["book_table", "order-status", "blocking"]


def test_a_module_name_is_imported_from_the_current_directory(tools_file, monkeypatch):
    monkeypatch.chdir(tools_file.parent)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tools_file.parent))])
    result = runner.invoke(app, ["tools", "schema", "my_tools:book_table"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["function"]["name"] == "book_table"


@pytest.mark.parametrize("spec, message", [
    ("twivapi_no_such_module:x", "cannot import module 'twivapi_no_such_module': ModuleNotFoundError"),
    ("{broken}:x", "cannot import file '{broken}': SyntaxError"),
    ("{raises}:x", "cannot import file '{raises}': RuntimeError: no database here"),
    ("{file}:nothing_here", "has no attribute 'nothing_here'"),
    ("{file}:Guest.model_config", "dict is not a tool, a list of tools or a module"),
    ("{missing}:x", "no file"),
])
def test_a_tools_path_that_does_not_load_names_it_and_exits_2(tools_file, tmp_path, spec, message):
    broken, raises = tmp_path / "broken.py", tmp_path / "raises.py"
    broken.write_text("def oops(:\n")
    raises.write_text("raise RuntimeError('no database here')\n")
    names = {"broken": broken, "raises": raises, "file": tools_file, "missing": tmp_path / "gone.py"}
    spec, message = spec.format(**names), message.format(**names)
    result = runner.invoke(app, ["tools", "schema", spec])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    env = {"TWILIO_AUTH_TOKEN": TOKEN, "VAPI_WEBHOOK_SECRET": VAPI_SECRET, "TWIVAPI_MODE": "native",
           "TWIVAPI_STORE": "memory://", "TWIVAPI_PORT": str(free_port())}
    served = runner.invoke(app, ["serve", "--tools", spec], env=env)
    assert served.exit_code == 2 and f"--tools {spec}" in served.output and message in served.output


def test_serve_with_tools_and_an_unreachable_forward_url_warns_and_serves(tools_file, tmp_path):
    port = free_port()
    down = f"http://127.0.0.1:{free_port()}/hook"
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_WEBHOOK_SECRET": VAPI_SECRET, "TWIVAPI_PUBLIC_URL": PUBLIC,
           "TWIVAPI_STORE": "memory://", "TWIVAPI_STATE_DIR": str(tmp_path / "state"), "TWIVAPI_DRAIN_TIMEOUT": "1",
           "TWIVAPI_FORWARD_TIMEOUT": "1"}
    proc = start_serve(env, port, "--mode", "native", "--tools", f"{tools_file}:ALL", "--forward-to", down)
    try:
        from twivapi_cli import signing
        body = json.dumps({"message": {"type": "tool-calls", "call": {"id": "v1", "phoneCallProviderId": new_call_sid()},
                                       "toolCallList": [{"id": "t", "type": "function", "function": {
                                           "name": "plain", "arguments": {"text": "ok"}}}]}}).encode()
        reply = httpx.post(f"http://127.0.0.1:{port}/vapi/webhook", content=body,
                           headers={"content-type": "application/json", **signing.sign_vapi(VAPI_SECRET, body)},
                           timeout=20)
        assert reply.json()["results"][0]["result"] == "OK"   # the app is down: the --tools answer
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert f"twivapi: warning: --forward-to {down} is not reachable now" in err, err
    assert f"  tools ({tools_file}:ALL and the built-ins): book_table, echo, get_time, lookup_order, " in err
    assert "built-in answer" in err


def test_provision_tools_adds_them_to_the_assistant_and_the_simulator_accepts_them(tools_file, tmp_path,
                                                                                   monkeypatch):
    from .sims import running_sims
    monkeypatch.chdir(tmp_path)
    assistant_file = tmp_path / "assistant.json"
    assistant_file.write_text(json.dumps({"model": {"provider": "openai", "model": "gpt-4o", "tools": [
        {"type": "function", "function": {"name": "plain", "description": "an old version"}},
        {"type": "endCall"}]}}))
    with running_sims() as sims:
        env = {"TWILIO_ACCOUNT_SID": sims.state.credentials.account_sid, "TWILIO_AUTH_TOKEN": TOKEN,
               "TWILIO_API_BASE_URL": sims.twilio_url, "VAPI_API_KEY": VAPI_KEY, "VAPI_BASE_URL": sims.url,
               "VAPI_WEBHOOK_SECRET": VAPI_SECRET, "TWIVAPI_PUBLIC_URL": PUBLIC,
               "TWIVAPI_STATE_DIR": str(tmp_path / "state")}
        result = runner.invoke(app, ["provision", "--yes", "--assistant-file", str(assistant_file),
                                     "--tools", f"{tools_file}:ALL"], env=env)
        assert result.exit_code == 0, result.output
        [assistant] = sims.state.vapi.assistants.values()
        tools = assistant["model"]["tools"]
        assert [t["type"] for t in tools] == ["endCall", "function", "function", "function"]   # "plain" replaced
        assert [t["function"]["name"] for t in tools[1:]] == ["book_table", "order-status", "plain"]
        assert tools[3]["function"]["parameters"]["properties"] == {"text": {"type": "string"}}
        # and the simulator refuses what Vapi's DTO would: pydantic's raw schema (anyOf, default), a bad name
        from twivapi_cli.tools import load_tools as load
        raw = load(f"{tools_file}:book_table")[0].arguments.model_json_schema()
        refused = sims.vapi("POST", "/assistant", json={"name": "raw", "model": {"provider": "openai", "tools": [
            {"type": "function", "function": {"name": "bad name", "parameters": {
                "type": "object", "properties": raw["properties"]}}}]}})
    assert refused.status_code == 400
    messages = refused.json()["message"]
    assert "model.tools.0.function.name must match /^[a-zA-Z0-9_-]{1,64}$/ regular expression" in messages
    assert any("seating.property default should not exist" in m for m in messages), messages
    assert any("note.property anyOf should not exist" in m for m in messages), messages
