"""The bridge: Twilio webhooks, Vapi server messages, the media stream. The only web-framework user
besides ``sim/``. ``build_app(settings)`` wires real dependencies; tests call ``create_app`` directly."""

from __future__ import annotations

from ..config import Settings


def build_app(settings: Settings, **options):
    """The bridge app with its store and Vapi client built from settings (checked first)."""
    from ..store import open_store
    from ..vapi_api import VapiClient
    from .app import check_settings, create_app

    check_settings(settings)
    store = open_store(settings.store_url, prefix=settings.redis_prefix)
    key = settings.vapi_api_key.reveal() if settings.vapi_api_key else ""
    vapi = VapiClient(settings.vapi_base_url, key)
    return create_app(settings, store, vapi, **options)
