"""The bridge: Twilio webhooks, Vapi server messages, the media stream. The only web-framework user
besides ``sim/``. ``build_app(settings)`` wires real dependencies; tests call ``create_app`` directly.

    app.py        create_app: routes, lifespan, the typed dependencies (deps.py) built in order
    twilio_hooks  /twilio/voice, /twilio/status, /twilio/after-stream   vapi_hooks  /vapi/webhook
    media         WS /twilio/media: MediaCall (StreamState) + outbound.py (queue, marks, pacing)
    calls         moving and ending calls by trigger     setup     the Vapi setup pool
    drain         per-call ordered processing, parking   signals   listeners, waiting for ready
    sweeper       TTL, lost instances, stale queues, restart recovery
    admin         the loopback admin app (events, sessions, latency, metrics)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import Settings

if TYPE_CHECKING:
    from starlette.applications import Starlette


def build_app(settings: Settings, **options: Any) -> Starlette:
    """The bridge app with its store, cluster and Vapi client built from settings (checked first)."""
    from ..cluster import open_state
    from ..vapi_api import VapiClient
    from .app import check_settings, create_app

    check_settings(settings)
    store, cluster = open_state(settings.store_url, prefix=settings.redis_prefix)
    key = settings.vapi_api_key.reveal() if settings.vapi_api_key else ""
    # one connection pool for every setup in flight, and a few more for ending calls meanwhile
    vapi = VapiClient(settings.vapi_base_url, key, max_connections=settings.setup_concurrency + 32,
                      control_key=settings.vapi_public_key.reveal() if settings.vapi_public_key else None)
    return create_app(settings, store, cluster, vapi, **options)
