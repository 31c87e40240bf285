"""Orchestration for `twivapi replay`: validate every fixture before sending anything, run them
(in-process or against a target), repeat/concurrency for load runs, JSON lines and JUnit XML."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import fixtures as fx
from .config import Settings
from .errors import UsageError
from .replay import ROUTES, Credentials, FixtureResult, InProcess, Runner, percentiles

PROJECT_FILE = "twivapi.toml"   # read from the current directory when present (its [replay.routes])


def _check_route(where: str, name: str, path: object) -> tuple[str, str]:
    if name not in ROUTES:
        raise UsageError(f"{where}: unknown route {name!r} (known: {', '.join(ROUTES)})")
    if not isinstance(path, str) or not path.startswith("/"):
        raise UsageError(f"{where}: the path for {name} must be a string starting with / (got {path!r})")
    return name, path


def parse_route(item: str) -> tuple[str, str]:
    """One ``--route NAME=PATH``."""
    name, sep, path = item.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"--route {item!r}: use NAME=PATH (names: {', '.join(ROUTES)})")
    return _check_route(f"--route {item!r}", name.strip(), path.strip())


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``twilio.status = "/x"`` unquoted in TOML is a nested table; ``"twilio.status"`` is a key."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_routes_file(path: Path, *, required: bool) -> dict[str, str]:
    """The ``[replay.routes]`` table of a TOML file (twivapi.toml or a --profile). ``required``: the
    file was named (--profile), so it must exist and have the table."""
    where = f"--profile {path}" if required else str(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"{where}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: not valid TOML: {exc}") from None
    replay = data.get("replay")
    if replay is None and not required:
        return {}   # a project file with other sections only
    unknown = sorted(set(replay) - {"routes"}) if isinstance(replay, dict) else []
    if unknown:
        raise UsageError(f"{where}: unknown key replay.{unknown[0]} (known: replay.routes)")
    if not isinstance(replay, dict) or not isinstance(replay.get("routes"), dict):
        raise UsageError(f"{where}: no [replay.routes] table (e.g. vapi = \"/webhook/vapi\")")
    return dict(_check_route(f"{where}: [replay.routes]", name, value)
                for name, value in _flatten(replay["routes"]).items())


def resolve_routes(route_flags: list[str], profile: Path | None, cwd: Path | None = None
                   ) -> tuple[dict[str, str], list[str]]:
    """(route name -> path, where it came from): ``--profile FILE`` if given, else ./twivapi.toml
    when present, then every ``--route NAME=PATH`` over them (the last one for a name wins)."""
    sources: list[str] = []
    routes: dict[str, str] = {}
    if profile is not None:
        routes = load_routes_file(profile, required=True)
        sources.append(str(profile))
    else:
        project = cwd / PROJECT_FILE if cwd is not None else Path(PROJECT_FILE)
        if project.is_file():
            routes = load_routes_file(project, required=False)
            if routes:
                sources.append(PROJECT_FILE)
    flags = dict(parse_route(item) for item in route_flags)
    if flags:
        sources.append("--route")
    return {**routes, **flags}, sources


def _emit_json(result: FixtureResult) -> None:
    for step in result.steps:
        sys.stdout.write(json.dumps({"fixture": result.fixture, "file": result.path, "run": result.run,
                                     **dataclasses.asdict(step)}) + "\n")
    sys.stdout.flush()


async def run_replay(paths: list[Path], settings: Settings, *, target: str | None, in_process: bool,
                     public_url: str | None, overrides: dict, concurrency: int, repeat: int,
                     twilio_token: str | None, vapi_secret: str | None, as_json: bool,
                     routes: Mapping[str, str] | None = None) -> tuple[list[FixtureResult], list[dict]]:
    """``routes``: our route names -> the target's paths (see ``resolve_routes``); --target only."""
    files = fx.expand(paths)
    if not files:
        raise UsageError("no fixture files given")
    loaded = [(path, fx.load(path)) for path in files]   # a bad fixture stops us before anything is sent
    results: list[FixtureResult] = []
    if in_process:
        env = await asyncio.to_thread(InProcess)
        try:
            for path, fixture in loaded:
                server, url = await asyncio.to_thread(env.bridge, fixture)
                try:
                    results += await _runs(url, None, env.creds, overrides, path, fixture, concurrency, repeat, as_json,
                                           on_call=env.register_call)
                finally:
                    await asyncio.to_thread(server.stop)
        finally:
            await asyncio.to_thread(env.close)
    else:
        creds = Credentials(twilio_token or (settings.twilio_auth_token.reveal() if settings.twilio_auth_token else None),
                            vapi_secret or (settings.vapi_webhook_secret.reveal() if settings.vapi_webhook_secret
                                            else None), settings.twilio_account_sid or "AC" + "0" * 32)
        for path, fixture in loaded:
            results += await _runs(target, public_url, creds, overrides, path, fixture, concurrency, repeat, as_json,
                                   routes or {})
    rows = percentiles(results) if repeat > 1 or concurrency > 1 else []
    return results, rows


async def _runs(target, public_url, creds, overrides, path: Path, fixture, concurrency: int, repeat: int,
                as_json: bool, routes: Mapping[str, str] | None = None, on_call=None) -> list[FixtureResult]:
    runner = Runner(target, creds, public_url=public_url, overrides=overrides, base_dir=path.parent, routes=routes,
                    on_call=on_call)
    gate = asyncio.Semaphore(concurrency)
    try:
        async def one(n: int) -> FixtureResult:
            async with gate:
                result = await runner.run(fixture, str(path), n)
            if as_json:
                _emit_json(result)
            return result
        return list(await asyncio.gather(*(one(n) for n in range(repeat))))
    finally:
        await runner.aclose()


def junit_xml(results: list[FixtureResult]) -> str:
    suites = ET.Element("testsuites", name="twivapi replay")
    for result in results:
        failures = sum(1 for s in result.steps if not s.ok)
        suite = ET.SubElement(suites, "testsuite", name=result.fixture, tests=str(len(result.steps)),
                              failures=str(failures), time=f"{result.seconds:.3f}", file=result.path)
        for step in result.steps:
            case = ET.SubElement(suite, "testcase", classname=result.fixture, name=f"{step.index}: {step.label}",
                                 time=f"{step.ms / 1000:.4f}")
            if not step.ok:
                ET.SubElement(case, "failure", message="; ".join(step.problems)).text = "\n".join(step.problems)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)
