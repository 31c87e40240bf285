"""Orchestration for `twivapi replay`: validate every fixture before sending anything, run them
(in-process or against a target), repeat/concurrency for load runs, JSON lines and JUnit XML."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from . import fixtures as fx
from .config import Settings
from .errors import UsageError
from .replay import Credentials, FixtureResult, InProcess, Runner, percentiles


def _emit_json(result: FixtureResult) -> None:
    for step in result.steps:
        sys.stdout.write(json.dumps({"fixture": result.fixture, "file": result.path, "run": result.run,
                                     **dataclasses.asdict(step)}) + "\n")
    sys.stdout.flush()


async def run_replay(paths: list[Path], settings: Settings, *, target: str | None, in_process: bool,
                     public_url: str | None, overrides: dict, concurrency: int, repeat: int,
                     twilio_token: str | None, vapi_secret: str | None, as_json: bool
                     ) -> tuple[list[FixtureResult], list[dict]]:
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
                    results += await _runs(url, None, env.creds, overrides, path, fixture, concurrency, repeat, as_json)
                finally:
                    await asyncio.to_thread(server.stop)
        finally:
            await asyncio.to_thread(env.close)
    else:
        creds = Credentials(twilio_token or (settings.twilio_auth_token.reveal() if settings.twilio_auth_token else None),
                            vapi_secret or (settings.vapi_webhook_secret.reveal() if settings.vapi_webhook_secret
                                            else None), settings.twilio_account_sid or "AC" + "0" * 32)
        for path, fixture in loaded:
            results += await _runs(target, public_url, creds, overrides, path, fixture, concurrency, repeat, as_json)
    rows = percentiles(results) if repeat > 1 or concurrency > 1 else []
    return results, rows


async def _runs(target, public_url, creds, overrides, path: Path, fixture, concurrency: int, repeat: int,
                as_json: bool) -> list[FixtureResult]:
    runner = Runner(target, creds, public_url=public_url, overrides=overrides, base_dir=path.parent)
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
