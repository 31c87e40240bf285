"""`twivapi provision` and `twivapi teardown`: wire real accounts, show the plan first, undo it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load, stderr_console, stdout_console


def register(app: typer.Typer) -> None:
    @app.command("provision")
    def provision(
        mode: Optional[str] = typer.Option(None, "--mode", help="native | bypass | stream [TWIVAPI_MODE]."),
        number: Optional[str] = typer.Option(None, "--number", help="Use this number of your account (+1...)."),
        area_code: Optional[str] = typer.Option(None, "--area-code", help="Buy a number in this area code."),
        country: str = typer.Option("US", "--country", help="Country to buy a number in."),
        assistant_name: str = typer.Option("twivapi", "--assistant-name", help="Matched by name: reruns update it."),
        assistant_file: Optional[Path] = typer.Option(None, "--assistant-file", help="Assistant JSON or YAML."),
        public_url: Optional[str] = typer.Option(None, "--public-url", help="The bridge's public URL."),
        tools: Optional[str] = typer.Option(None, "--tools", help="Add your tool functions (module:attr or "
                                            "path/to/tools.py:attr, as serve --tools) to the assistant's "
                                            "model.tools [TWIVAPI_TOOLS]."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; change nothing."),
        yes: bool = typer.Option(False, "--yes", help="Do not ask before acting (buying costs money)."),
        as_json: bool = typer.Option(False, "--json", help="Print a machine-readable result."),
        env_file: Path = ENV_FILE_OPTION,
    ):
        """Buy or reuse a Twilio number, create or update the Vapi assistant, wire them. Idempotent:
        reruns converge, an interrupted run resumes; the state is kept in .twivapi/provision.json."""
        import asyncio

        from .. import provision as lib
        from ..ui import plan_table

        settings = load({"mode": mode, "public_url": public_url, "tools": tools}, env_file)
        with errors_to_exit():
            options = lib.Options(mode=settings.mode, number=number, area_code=area_code, country=country,
                                  assistant_name=assistant_name,
                                  assistant=lib.load_assistant_file(assistant_file) if assistant_file else None,
                                  tools=_tool_definitions(settings.tools))
            state = lib.State.load(settings.state_dir)

            async def run():
                accounts = lib.Accounts(settings)
                try:
                    the_plan = await lib.plan(accounts, options, state)
                    if dry_run:
                        planned = lib.remember_plan(state, the_plan)
                        if not as_json:
                            stderr_console().print(plan_table(the_plan))
                            if planned:
                                stderr_console().print(
                                    f"[dim]{planned} is what the search offers now; `twivapi provision` with the "
                                    "same --country and --area-code buys it if it is still offered, or says it is "
                                    "gone and shows the number it buys instead[/dim]")
                        return the_plan, None
                    stderr_console().print(plan_table(the_plan))
                    if not yes and not typer.confirm("Go ahead?" + (" This buys a number." if the_plan.buys else ""),
                                                     err=True):
                        raise typer.Exit(1)
                    with stderr_console().status("provisioning") as status:
                        result = await lib.apply(accounts, options, state, the_plan,
                                                 progress=lambda m: status.update(m))
                    return the_plan, result
                finally:
                    await accounts.aclose()

            the_plan, result = asyncio.run(run())
            if as_json:
                buy = next((a for a in the_plan.actions if a.key == "number.buy"), None)
                typer.echo(json.dumps({"dry_run": dry_run, "plan": [a.description for a in the_plan.actions],
                                       "buys": buy.data["phone_number"] if buy else None, "state": result}, indent=2))
            elif result is not None:
                stdout_console().print(f"[green]done[/green]: state in {state.path}")

    def _tool_definitions(spec: Optional[str]) -> Optional[list]:
        if not spec:
            return None
        from ..tools import load_tools

        return [found.definition() for found in load_tools(spec)]

    @app.command("teardown")
    def teardown(
        yes: bool = typer.Option(False, "--yes", help="Do not ask."),
        keep_number: bool = typer.Option(False, "--keep-number", help="Keep a number provision bought."),
        env_file: Path = ENV_FILE_OPTION,
    ):
        """Undo provision: restore the number's prior webhooks, delete what was created, and release a
        number provision bought (after confirmation; --keep-number keeps it)."""
        import asyncio

        from .. import provision as lib

        settings = load({}, env_file)
        with errors_to_exit():
            state = lib.State.load(settings.state_dir)
            if not state.data:
                typer.echo(f"nothing to tear down ({state.path} not found)", err=True)
                return
            if {k for k, v in state.data.items() if v} <= {lib.PLANNED}:   # only a dry run's plan: nothing done
                state.path.unlink(missing_ok=True)
                typer.echo("nothing to tear down (only a dry run's plan, now forgotten)", err=True)
                return
            bought = (state.data.get("number") or {}).get("bought")
            release = bought and not keep_number
            if not yes and not typer.confirm(
                    "Undo provisioning" + (f" and RELEASE {state.data['number']['phone_number']}" if release else "")
                    + "?", err=True):
                raise typer.Exit(1)

            async def run():
                accounts = lib.Accounts(settings)
                try:
                    return await lib.teardown(accounts, state, release_number=bool(release))
                finally:
                    await accounts.aclose()

            for line in asyncio.run(run()):
                typer.echo(line)
