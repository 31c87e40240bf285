"""Local simulators of Twilio and Vapi: REST APIs (``twilio_rest``, ``vapi_rest``), their shared state
(``state``), fault injection (``faults``) and a runner (``server.start_sims``); the simulated caller
and assistant that drive calls live beside them. Nothing here reaches the internet.

Importing this package is cheap: the submodules (Starlette, uvicorn, twilio) load on first use.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"SimState": "state", "SimCredentials": "state", "Faults": "faults", "start_sims": "server",
            "RunningSims": "server", "create_twilio_app": "twilio_rest", "create_vapi_app": "vapi_rest"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
