"""Provisioning real accounts: plan, apply, teardown, with a state file so that reruns converge and
interrupted runs resume.

    plan()      reads the accounts, says what it would do (buying a number is marked: it costs money)
    apply()     does it step by step, writing the state file after every step
    teardown()  restores prior webhook settings, deletes what provision created, releases a bought
                number only when asked to

The state file (``<state dir>/provision.json``, mode 0600) holds ids and prior settings, never a
secret. Twilio goes through the ``twilio`` SDK (pointed at ``TWILIO_API_BASE_URL``), Vapi through
``vapi_api.VapiClient`` (httpx). The SDK is synchronous: its calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Settings, revealed
from .errors import ApiError, ConfigError, TwilioApiError, UsageError, VapiApiError

STATE_FILE = "provision.json"
SERVER_MESSAGES = ["status-update", "speech-update", "transcript", "conversation-update", "tool-calls",
                   "end-of-call-report", "hang", "user-interrupted", "model-output"]
WEBHOOK_FIELDS = ("voice_url", "voice_method", "status_callback", "status_callback_method")


def default_assistant(name: str) -> dict:
    return {
        "name": name,
        "firstMessage": "Hi, thanks for calling. How can I help you today?",
        "model": {"provider": "openai", "model": "gpt-4o",
                  "messages": [{"role": "system", "content": "You are a helpful phone assistant. Keep answers short."}]},
        "voice": {"provider": "11labs", "voiceId": "cgSgspJ2msm6clMCkdW9"},
        "transcriber": {"provider": "deepgram", "model": "nova-2", "language": "en"},
        "serverMessages": SERVER_MESSAGES,
        # barge-in: start speaking after a short pause, stop at once when the caller talks
        "startSpeakingPlan": {"waitSeconds": 0.4},
        "stopSpeakingPlan": {"numWords": 0, "voiceSeconds": 0.2, "backoffSeconds": 1},
    }


def load_assistant_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--assistant-file {path}: {exc.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise UsageError(f"--assistant-file {path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--assistant-file {path}: must hold one assistant object")
    return data


# --- state ----------------------------------------------------------------------------------------

@dataclass
class State:
    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path) -> State:
        path = Path(state_dir) / STATE_FILE
        try:
            return cls(path, json.loads(path.read_text()))
        except FileNotFoundError:
            return cls(path, {})
        except ValueError:
            raise ConfigError(f"{path} is not valid JSON", hint="fix or remove it (it only holds ids)") from None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.data, handle, indent=2)
        os.chmod(self.path, 0o600)

    def section(self, name: str) -> dict:
        return self.data.setdefault(name, {})


# --- options and plan -----------------------------------------------------------------------------

@dataclass
class Options:
    mode: str = "stream"
    number: str | None = None
    area_code: str | None = None
    country: str = "US"
    assistant_name: str = "twivapi"
    assistant: dict | None = None     # from --assistant-file


@dataclass
class Action:
    key: str
    description: str
    costs_money: bool = False
    data: dict = field(default_factory=dict)


@dataclass
class Plan:
    actions: list[Action]
    notes: list[str] = field(default_factory=list)

    @property
    def buys(self) -> bool:
        return any(a.costs_money for a in self.actions)


class Accounts:
    """The two APIs, as provision uses them."""

    def __init__(self, settings: Settings, twilio_client=None, vapi=None):
        from .vapi_api import VapiClient
        settings.require("twilio_account_sid", "twilio_auth_token", "vapi_api_key")
        if twilio_client is None:
            from twilio.rest import Client
            twilio_client = Client(settings.twilio_account_sid, revealed(settings.twilio_auth_token))
            if settings.twilio_api_base_url != "https://api.twilio.com":
                twilio_client.api.base_url = settings.twilio_api_base_url   # the SDK's documented override
        self.twilio = twilio_client
        self.vapi = vapi or VapiClient(settings.vapi_base_url, revealed(settings.vapi_api_key))
        self.settings = settings

    async def tw(self, what: str, fn, *args, **kwargs):
        """Run one SDK call in a thread; its errors become TwilioApiError naming what failed."""
        from twilio.base.exceptions import TwilioException, TwilioRestException
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except TwilioRestException as exc:
            hint = "check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN" if exc.status in (401, 403) else None
            raise TwilioApiError(f"Twilio: {what} failed: HTTP {exc.status}, code {exc.code}: {exc.msg}",
                                 status=exc.status, code=exc.code, hint=hint) from None
        except TwilioException as exc:   # list pages fail with (text, response) instead
            response: Any = exc.args[1] if len(exc.args) > 1 else None   # the SDK's Response (untyped), or None
            status = getattr(response, "status_code", None)
            try:
                message = json.loads(response.text).get("message")
            except (AttributeError, ValueError, TypeError):
                message = str(exc.args[0]) if exc.args else str(exc)
            hint = "check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN" if status in (401, 403) else None
            raise TwilioApiError(f"Twilio: {what} failed: HTTP {status}: {message}", status=status,
                                 hint=hint) from None
        except OSError as exc:
            raise TwilioApiError(f"Twilio: {what} failed: {exc}",
                                 hint=f"is TWILIO_API_BASE_URL ({self.settings.twilio_api_base_url}) right?") from None

    async def find_number(self, phone_number: str):
        found = await self.tw(f"looking up {phone_number}", self.twilio.incoming_phone_numbers.list,
                              phone_number=phone_number, limit=1)
        return found[0] if found else None

    async def aclose(self) -> None:
        await self.vapi.aclose()


def _public(settings: Settings, mode: str) -> str | None:
    if mode in ("stream", "bypass"):
        if not settings.public_url:
            raise ConfigError("provision --mode stream/bypass needs the bridge's public URL: TWIVAPI_PUBLIC_URL",
                              hint="set TWIVAPI_PUBLIC_URL (or pass --public-url), e.g. your ngrok https URL")
        return settings.public_url
    return None


async def plan(accounts: Accounts, options: Options, state: State) -> Plan:
    settings = accounts.settings
    public = _public(settings, options.mode)
    actions: list[Action] = []
    number_state = state.section("number")
    if options.number:
        number = await accounts.find_number(options.number)
        if number is None:
            raise UsageError(f"--number {options.number} is not a number of account {settings.twilio_account_sid}",
                             hint="give a number you own, or leave --number out to buy one")
        actions.append(Action("number.reuse", f"use {options.number} ({number.sid})", data={"sid": number.sid}))
    elif number_state.get("sid"):
        actions.append(Action("number.reuse", f"use {number_state['phone_number']} (bought earlier)",
                              data={"sid": number_state["sid"]}))
    else:
        kwargs: dict[str, Any] = {"voice_enabled": True, "limit": 1}
        if options.area_code:
            kwargs["area_code"] = int(options.area_code)
        offered = await accounts.tw("searching numbers", accounts.twilio.available_phone_numbers(
            options.country).local.list, **kwargs)
        if not offered:
            where = f"area code {options.area_code}" if options.area_code else options.country
            raise UsageError(f"no voice numbers available in {where}", hint="try another --area-code or --country")
        actions.append(Action("number.buy", f"BUY {offered[0].phone_number} ({offered[0].locality or options.country})",
                              costs_money=True, data={"phone_number": offered[0].phone_number}))
    assistant_body = {**default_assistant(options.assistant_name), **(options.assistant or {}),
                      "name": options.assistant_name}
    if public:
        server: dict[str, Any] = {"url": f"{public}/vapi/webhook", "timeoutSeconds": 20}
        if settings.vapi_webhook_secret:
            server["headers"] = {"X-Vapi-Secret": settings.vapi_webhook_secret.reveal()}
        assistant_body["server"] = server
    existing = [a for a in await accounts.vapi.list_assistants() if a.get("name") == options.assistant_name]
    if existing:
        actions.append(Action("assistant.update", f"update assistant '{options.assistant_name}' ({existing[0]['id']})",
                              data={"id": existing[0]["id"], "body": assistant_body, "prior": existing[0]}))
    else:
        actions.append(Action("assistant.create", f"create assistant '{options.assistant_name}'",
                              data={"body": assistant_body}))
    if options.mode == "native":
        actions.append(Action("wire.native", "import the number into Vapi (Vapi answers it)"))
    else:
        actions.append(Action("wire.webhooks", f"point the number's voice URL at {public}/twilio/voice and its "
                                               f"status callback at {public}/twilio/status",
                              data={"voice_url": f"{public}/twilio/voice", "status_callback": f"{public}/twilio/status"}))
    notes = [] if options.mode != "stream" else ["stream mode: run `twivapi serve` at the public URL"]
    return Plan(actions, notes)


def _secret_free(assistant: dict) -> dict:
    """What of an assistant goes into the state file: never a server header or credential."""
    keep = {k: v for k, v in assistant.items() if k in ("server", "serverMessages", "name")}
    if isinstance(keep.get("server"), dict):
        keep["server"] = {k: v for k, v in keep["server"].items() if k not in ("headers", "credentialId")}
        keep["had_server_headers"] = bool((assistant.get("server") or {}).get("headers"))
    return keep


async def apply(accounts: Accounts, options: Options, state: State, the_plan: Plan, progress=lambda msg: None) -> dict:
    """Carry the plan out, saving the state after every step (a rerun resumes and converges)."""
    settings = accounts.settings
    state.data["mode"] = options.mode
    number = state.section("number")
    for action in the_plan.actions:
        progress(action.description)
        if action.key == "number.buy":
            bought = await accounts.tw(f"buying {action.data['phone_number']}",
                                       accounts.twilio.incoming_phone_numbers.create,
                                       phone_number=action.data["phone_number"])
            number.update(sid=bought.sid, phone_number=bought.phone_number, bought=True,
                          prior={f: None for f in WEBHOOK_FIELDS})
        elif action.key == "number.reuse":
            if number.get("sid") != action.data["sid"]:
                fetched = await accounts.tw("reading the number", accounts.twilio.incoming_phone_numbers(
                    action.data["sid"]).fetch)
                number.update(sid=fetched.sid, phone_number=fetched.phone_number, bought=False,
                              prior={f: getattr(fetched, f) for f in WEBHOOK_FIELDS})
        elif action.key == "assistant.create":
            created = await accounts.vapi.create_assistant(action.data["body"])
            state.data["assistant"] = {"id": created["id"], "created": True}
        elif action.key == "assistant.update":
            assistant = state.section("assistant")
            if assistant.get("id") != action.data["id"]:
                assistant.update(id=action.data["id"], created=False, prior=_secret_free(action.data["prior"]))
            await accounts.vapi.update_assistant(action.data["id"], action.data["body"])
        elif action.key == "wire.webhooks":
            await accounts.tw("updating the number's webhooks", accounts.twilio.incoming_phone_numbers(number["sid"]).update,
                              voice_url=action.data["voice_url"], voice_method="POST",
                              status_callback=action.data["status_callback"], status_callback_method="POST")
            number["wired"] = True
        elif action.key == "wire.native":
            await _import_native(accounts, settings, state)
        state.save()   # after every step: an interrupted run resumes from here
    return state.data


async def _import_native(accounts: Accounts, settings: Settings, state: State) -> None:
    number, assistant = state.section("number"), state.section("assistant")
    existing = [n for n in await accounts.vapi.list_phone_numbers() if n.get("number") == number["phone_number"]]
    if existing:
        await accounts.vapi.update_phone_number(existing[0]["id"], {"assistantId": assistant["id"]})
        state.data["vapi_phone_number"] = {"id": existing[0]["id"], "created": state.data.get(
            "vapi_phone_number", {}).get("created", False)}
        return
    if number.get("sid") and "prior" not in number:
        number["prior"] = {f: None for f in WEBHOOK_FIELDS}
    imported = await accounts.vapi.import_twilio_number({
        "number": number["phone_number"], "twilioAccountSid": settings.twilio_account_sid,
        "twilioAuthToken": revealed(settings.twilio_auth_token), "assistantId": assistant["id"],
        "name": "twivapi", "smsEnabled": False})
    state.data["vapi_phone_number"] = {"id": imported["id"], "created": True}


async def teardown(accounts: Accounts, state: State, *, release_number: bool, progress=lambda msg: None) -> list[str]:
    """Undo what provision did, newest first; the state file shrinks as each step is undone."""
    done: list[str] = []
    imported = state.data.get("vapi_phone_number")
    if imported and imported.get("created"):
        progress("removing the number from Vapi")
        await _ignore_missing(accounts.vapi.delete_phone_number(imported["id"]))
        state.data.pop("vapi_phone_number")
        state.save()
        done.append("removed the number from Vapi")
    number = state.data.get("number") or {}
    if number.get("sid") and not (number.get("bought") and release_number):
        prior = number.get("prior") or {}
        progress("restoring the number's webhooks")
        await accounts.tw("restoring the number's webhooks", accounts.twilio.incoming_phone_numbers(number["sid"]).update,
                          voice_url=prior.get("voice_url") or "", voice_method=prior.get("voice_method") or "POST",
                          status_callback=prior.get("status_callback") or "",
                          status_callback_method=prior.get("status_callback_method") or "POST")
        done.append(f"restored the webhooks of {number['phone_number']}")
    assistant = state.data.get("assistant") or {}
    if assistant.get("id"):
        if assistant.get("created"):
            progress("deleting the assistant")
            await _ignore_missing(accounts.vapi.delete_assistant(assistant["id"]))
            done.append("deleted the assistant")
        elif assistant.get("prior"):
            prior = {k: v for k, v in assistant["prior"].items() if k in ("server", "serverMessages")}
            progress("restoring the assistant's server settings")
            await accounts.vapi.update_assistant(assistant["id"], prior or {})
            done.append("restored the assistant's server URL")
        state.data.pop("assistant")
        state.save()
    if number.get("sid") and number.get("bought") and release_number:
        progress(f"releasing {number['phone_number']}")
        await accounts.tw("releasing the number", accounts.twilio.incoming_phone_numbers(number["sid"]).delete)
        done.append(f"released {number['phone_number']}")
    if number.get("sid"):
        state.data.pop("number")
    state.data.pop("mode", None)
    if state.data:
        state.save()
    else:
        state.path.unlink(missing_ok=True)
    return done


async def _ignore_missing(coroutine) -> None:
    try:
        await coroutine
    except VapiApiError as exc:
        if exc.status != 404:
            raise


# --- doctor ---------------------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


async def doctor(settings: Settings, state: State, accounts: Accounts | None = None) -> list[Check]:
    checks: list[Check] = []
    for attr, env in (("twilio_account_sid", "TWILIO_ACCOUNT_SID"), ("twilio_auth_token", "TWILIO_AUTH_TOKEN"),
                      ("vapi_api_key", "VAPI_API_KEY"), ("vapi_webhook_secret", "VAPI_WEBHOOK_SECRET"),
                      ("public_url", "TWIVAPI_PUBLIC_URL")):
        present = bool(getattr(settings, attr))
        checks.append(Check(f"setting {env}", present, "set" if present else "missing",
                            "" if present else f"set {env} in the environment or .env"))
    if not (settings.twilio_account_sid and settings.twilio_auth_token and settings.vapi_api_key):
        return checks
    accounts = accounts or Accounts(settings)
    try:
        await accounts.tw("checking credentials", accounts.twilio.api.v2010.accounts(settings.twilio_account_sid).fetch)
        checks.append(Check("Twilio credentials", True, "accepted"))
    except ApiError as exc:
        checks.append(Check("Twilio credentials", False, str(exc), "check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN"))
    try:
        assistants = await accounts.vapi.list_assistants()
        checks.append(Check("Vapi credentials", True, f"accepted ({len(assistants)} assistants)"))
    except ApiError as exc:
        return checks + [Check("Vapi credentials", False, str(exc), "check VAPI_API_KEY (the private key)")]
    public = settings.public_url
    number = (state.data.get("number") or {})
    if number.get("sid") and state.data.get("mode") in ("stream", "bypass") and public:
        try:
            live = await accounts.tw("reading the number", accounts.twilio.incoming_phone_numbers(number["sid"]).fetch)
            for field_name, wanted in (("voice_url", f"{public}/twilio/voice"),
                                       ("status_callback", f"{public}/twilio/status")):
                got = getattr(live, field_name)
                checks.append(Check(f"number {field_name}", got == wanted, got or "(empty)",
                                    "" if got == wanted else f"run `twivapi provision` again, or set it to {wanted}"))
        except ApiError as exc:
            checks.append(Check("number", False, str(exc), "run `twivapi provision`"))
    elif not number.get("sid"):
        checks.append(Check("number", False, "not provisioned", "run `twivapi provision`"))
    assistant_id = (state.data.get("assistant") or {}).get("id") or settings.vapi_assistant_id
    if assistant_id and public and state.data.get("mode", settings.mode) != "native":
        found = next((a for a in assistants if a.get("id") == assistant_id), None)
        url = ((found or {}).get("server") or {}).get("url")
        wanted = f"{public}/vapi/webhook"
        checks.append(Check("assistant server URL", url == wanted, url or "(none)",
                            "" if url == wanted else f"run `twivapi provision` again, or set it to {wanted}"))
    return checks
