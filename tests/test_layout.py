"""The layout rules the code relies on (GUIDE.md): only bridge/ and sim/ import the web framework,
only ui.py and the CLI import rich/typer, and only config.py reads the environment."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "twivapi_cli"


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def modules():
    return [p for p in PACKAGE.rglob("*.py")]


def rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def test_only_bridge_and_sim_import_the_web_framework():
    offenders = [rel(p) for p in modules() if "starlette" in imports(p)
                 and not rel(p).startswith(("bridge/", "sim/"))]
    assert offenders == []


def test_only_ui_and_cli_import_rich_and_typer():
    offenders = [rel(p) for p in modules() if {"rich", "typer"} & imports(p)
                 and not (rel(p) in ("ui.py", "cli.py") or rel(p).startswith("commands/"))]
    assert offenders == []


def test_only_config_reads_the_environment():
    offenders = []
    for path in modules():
        text = path.read_text()
        if ("os.environ" in text or "os.getenv" in text) and rel(path) not in ("config.py",):
            offenders.append(rel(path))
    # replay exposes TWIVAPI_*/REPLAY_* as {{env.X}} fixture variables: a documented, deliberate read
    assert offenders == ["replay.py"]


def test_commands_import_nothing_heavy_at_module_level():
    heavy = {"uvicorn", "starlette", "twilio", "numpy", "httpx", "redis", "websockets", "pyngrok", "rich"}
    for path in (PACKAGE / "commands").glob("*.py"):
        tree = ast.parse(path.read_text())
        top = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                top.add(node.module.split(".")[0])
        assert not (top & heavy), (path.name, top & heavy)
