"""Provisioning real accounts: plan, apply, teardown, with a state file so that reruns converge and
interrupted runs resume.

    plan()      reads the accounts, says what it would do (buying a number is marked: it costs money)
    apply()     does it step by step, writing the state file after every step
    teardown()  restores prior webhook settings, deletes what provision created, releases a bought
                number only when asked to

The state file (``<state dir>/provision.json``, mode 0600) holds ids and prior settings, never a
secret. An assistant provision updates keeps what it replaced on Vapi itself, in its metadata
(``PRIOR_KEY``: the prior ``server`` with its headers may hold secrets), so that teardown restores it
exactly. Twilio goes through the ``twilio`` SDK (pointed at ``TWILIO_API_BASE_URL``), Vapi through
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
# stream mode: Vapi cannot transfer or hang up a Twilio call it does not own; with phone-call-control
# requested it hands both to the bridge (bridge/call_control.py), which also answers transfer-destination-request
CALL_CONTROL_MESSAGES = ["phone-call-control", "transfer-destination-request"]
WEBHOOK_FIELDS = ("voice_url", "voice_method", "status_callback", "status_callback_method")
# A number bound to a TwiML App (voice_application_sid) or a SIP trunk (trunk_sid) never calls its
# voice URL: Twilio routes its calls to the app's voice URL or to the trunk instead.
BINDING_FIELDS = ("voice_application_sid", "trunk_sid")
BINDING_NAMES = {"voice_application_sid": "TwiML App", "trunk_sid": "SIP trunk"}


def bindings(number: Any) -> dict[str, str]:
    """What a number (an SDK record) is bound to that overrides its voice URL: field -> sid."""
    return {f: getattr(number, f) for f in BINDING_FIELDS if getattr(number, f, None)}


def describe_bindings(bound: dict[str, str]) -> str:
    return " and ".join(f"{BINDING_NAMES[f]} {sid}" for f, sid in bound.items())
PRIOR_KEY = "twivapiPrior"   # in an updated assistant's metadata: what provision replaced, for teardown


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
        # the bridge ends calls through monitor.controlUrl: set explicitly (the spec's default is true,
        # its example false)
        "monitorPlan": {"controlEnabled": True},
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
    tools: list[dict] | None = None   # from --tools: function-tool definitions (CreateFunctionToolDTO)


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
    number_state = state.data.get("number") or {}   # read only: a dry run saves no empty section
    if options.number:
        number = await accounts.find_number(options.number)
        if number is None:
            raise UsageError(f"--number {options.number} is not a number of account {settings.twilio_account_sid}",
                             hint="give a number you own, or leave --number out to buy one")
        actions.append(Action("number.reuse", f"use {options.number} ({number.sid})", data={"sid": number.sid}))
        bound = bindings(number)
        if bound:
            actions.append(Action("number.unbind", f"unbind {options.number} from its {describe_bindings(bound)} "
                                                   "(while bound, Twilio never calls its voice URL); `twivapi "
                                                   "teardown` binds it back", data={"sid": number.sid, "bound": bound}))
    elif number_state.get("sid"):
        actions.append(Action("number.reuse", f"use {number_state['phone_number']} (bought earlier)",
                              data={"sid": number_state["sid"]}))
    else:
        actions.append(await _buy_action(accounts, options, state))
    assistant_body = {**default_assistant(options.assistant_name), **(options.assistant or {}),
                      "name": options.assistant_name}
    if options.mode == "stream":
        listed = list(assistant_body.get("serverMessages") or [])
        assistant_body["serverMessages"] = listed + [m for m in CALL_CONTROL_MESSAGES if m not in listed]
    if options.tools:
        assistant_body["model"] = with_tools(assistant_body.get("model") or {}, options.tools)
    if public:
        server: dict[str, Any] = {"url": f"{public}/vapi/webhook", "timeoutSeconds": 20}
        if settings.vapi_webhook_secret:
            server["headers"] = {"X-Vapi-Secret": settings.vapi_webhook_secret.reveal()}
        assistant_body["server"] = server
    # ending calls depends on monitor.controlUrl; with VAPI_PUBLIC_KEY the control URL asks for it
    assistant_body["monitorPlan"] = {**(assistant_body.get("monitorPlan") or {}), "controlEnabled": True,
                                     "controlAuthenticationEnabled": bool(settings.vapi_public_key)}
    existing = [a for a in await accounts.vapi.list_assistants() if a.get("name") == options.assistant_name]
    if existing:
        created_here = (state.data.get("assistant") or {}).get("created") and \
            (state.data.get("assistant") or {}).get("id") == existing[0]["id"]
        body = assistant_body if created_here else with_prior(assistant_body, existing[0])
        actions.append(Action("assistant.update", f"update assistant '{options.assistant_name}' ({existing[0]['id']})",
                              data={"id": existing[0]["id"], "body": body, "prior": existing[0]}))
    else:
        actions.append(Action("assistant.create", f"create assistant '{options.assistant_name}'",
                              data={"body": assistant_body}))
    if options.mode == "native":
        actions.append(Action("wire.native", "import the number into Vapi (Vapi answers it)"))
    elif options.mode == "bypass":
        actions.append(Action("wire.import", "import the number into Vapi (bypass mode's POST /call names it by "
                                             "its Vapi id); the import points it at Vapi, so it is pointed back next"))
    if options.mode != "native":
        actions.append(Action("wire.webhooks", f"point the number's voice URL at {public}/twilio/voice and its "
                                               f"status callback at {public}/twilio/status",
                              data={"voice_url": f"{public}/twilio/voice", "status_callback": f"{public}/twilio/status"}))
    notes = [] if options.mode != "stream" else ["stream mode: run `twivapi serve` at the public URL"]
    return Plan(actions, notes)


def with_tools(model: dict, tools: list[dict]) -> dict:
    """``model`` with ``tools`` in its ``tools`` list: a function tool of the same name replaced, the
    rest (other functions, Vapi's own tools) kept in order."""
    names = {t["function"]["name"] for t in tools}
    kept = [t for t in model.get("tools") or [] if not (
        isinstance(t, dict) and t.get("type") == "function" and (t.get("function") or {}).get("name") in names)]
    return {**model, "tools": kept + tools}


# --- the number to buy ------------------------------------------------------------------------------
# A search offers whatever is in stock at that moment, so two searches rarely offer the same number.
# A dry run remembers the number its plan showed (PLANNED, in the state file: no secret, nothing
# bought); the next real run with the same --country and --area-code buys exactly that one when it
# is still offered, and otherwise says it is gone and shows the one it buys instead.

PLANNED = "planned_number"


def _planned(state: State, options: Options) -> str | None:
    planned = state.data.get(PLANNED) or {}
    if planned.get("country") == options.country and planned.get("area_code") == options.area_code:
        return planned.get("phone_number")
    return None


def _pattern(phone_number: str) -> str:
    """Twilio's ``Contains`` for one exact number: its national digits (+1 numbers), else its digits."""
    digits = phone_number.lstrip("+")
    return digits[1:] if phone_number.startswith("+1") and len(digits) == 11 else digits


async def _buy_action(accounts: Accounts, options: Options, state: State) -> Action:
    kwargs: dict[str, Any] = {"voice_enabled": True, "limit": 1}
    if options.area_code:
        kwargs["area_code"] = int(options.area_code)
    search = accounts.twilio.available_phone_numbers(options.country).local.list
    data = {"country": options.country, "area_code": options.area_code}
    wanted = _planned(state, options)
    if wanted:
        found = await accounts.tw(f"checking that {wanted} is still offered", search,
                                  **{**kwargs, "contains": _pattern(wanted), "limit": 20})
        same = next((o for o in found if o.phone_number == wanted), None)
        if same is not None:
            return Action("number.buy", f"BUY {wanted} ({same.locality or options.country}), the number the dry "
                                        "run showed", costs_money=True, data={**data, "phone_number": wanted})
    offered = await accounts.tw("searching numbers", search, **kwargs)
    if not offered:
        where = f"area code {options.area_code}" if options.area_code else options.country
        raise UsageError(f"no voice numbers available in {where}", hint="try another --area-code or --country")
    number = offered[0]
    description = f"BUY {number.phone_number} ({number.locality or options.country})"
    if wanted:
        description += f": {wanted}, the number the dry run showed, is no longer offered"
    return Action("number.buy", description, costs_money=True, data={**data, "phone_number": number.phone_number})


def remember_plan(state: State, the_plan: Plan) -> str | None:
    """After a dry run: keep the number its plan would buy, so that the real run buys that one (if it
    is still offered). Returns it, or None when the plan buys nothing."""
    buy = next((a for a in the_plan.actions if a.key == "number.buy"), None)
    if buy is None:
        return None
    state.data[PLANNED] = {k: buy.data.get(k) for k in ("phone_number", "country", "area_code")}
    state.save()
    return buy.data["phone_number"]


def _secret_free(assistant: dict) -> dict:
    """What of an assistant goes into the state file: never a server header or credential (the exact
    prior is kept on the assistant itself: ``with_prior``)."""
    keep = {k: v for k, v in assistant.items() if k in ("server", "serverMessages", "name")}
    if isinstance(keep.get("server"), dict):
        keep["server"] = {k: v for k, v in keep["server"].items() if k not in ("headers", "credentialId")}
        keep["had_server_headers"] = bool((assistant.get("server") or {}).get("headers"))
    return keep


def with_prior(body: dict, current: dict) -> dict:
    """``body`` for updating an assistant provision did not create, carrying in its metadata
    (``PRIOR_KEY``) every field the update replaces as it was (``fields``; ``absent``: there was none)
    and the prior metadata, so that teardown restores it exactly: the whole ``server`` (its
    ``credentialId``, its headers, or no server at all), the model, voice, transcriber... On Vapi,
    where those values already are: the state file never holds a secret. A rerun keeps the first
    record (what the assistant was before provision ever touched it)."""
    metadata = current.get("metadata") if isinstance(current.get("metadata"), dict) else None
    kept = (metadata or {}).get(PRIOR_KEY)
    if not isinstance(kept, dict):
        replaced = [k for k in body if k not in ("name", "metadata") and current.get(k) != body[k]]
        prior_metadata = {k: v for k, v in (metadata or {}).items() if k != PRIOR_KEY} if metadata is not None else None
        kept = {"fields": {k: current[k] for k in replaced if k in current},
                "absent": [k for k in replaced if k not in current], "metadata": prior_metadata}
    else:   # a rerun: what the record already covers, plus anything this body replaces for the first time
        kept = {**kept, "fields": dict(kept.get("fields") or {}), "absent": list(kept.get("absent") or [])}
        for k in body:
            if k in ("name", "metadata") or k in kept["fields"] or k in kept["absent"] or current.get(k) == body[k]:
                continue
            if k in current:
                kept["fields"][k] = current[k]
            else:
                kept["absent"].append(k)
    own: dict = body["metadata"] if isinstance(body.get("metadata"), dict) else (kept.get("metadata") or {})
    return {**body, "metadata": {**own, PRIOR_KEY: kept}}


async def apply(accounts: Accounts, options: Options, state: State, the_plan: Plan, progress=lambda msg: None) -> dict:
    """Carry the plan out, saving the state after every step (a rerun resumes and converges)."""
    settings = accounts.settings
    state.data["mode"] = options.mode
    number = state.section("number")
    for action in the_plan.actions:
        progress(action.description)
        if action.key == "number.buy":
            try:
                bought = await accounts.tw(f"buying {action.data['phone_number']}",
                                           accounts.twilio.incoming_phone_numbers.create,
                                           phone_number=action.data["phone_number"])
            except TwilioApiError as exc:
                if str(exc.code) != "21422":   # 21422: the number is no longer available
                    raise
                state.data.pop(PLANNED, None)
                state.save()
                raise TwilioApiError(f"{action.data['phone_number']} was taken since the plan was made; nothing "
                                     "was bought", status=exc.status, code=exc.code,
                                     hint="run `twivapi provision` again: its plan offers another number") from None
            number.update(sid=bought.sid, phone_number=bought.phone_number, bought=True,
                          prior={f: None for f in WEBHOOK_FIELDS})
            state.data.pop(PLANNED, None)
        elif action.key == "number.reuse":
            if number.get("sid") != action.data["sid"]:
                fetched = await accounts.tw("reading the number", accounts.twilio.incoming_phone_numbers(
                    action.data["sid"]).fetch)
                number.update(sid=fetched.sid, phone_number=fetched.phone_number, bought=False,
                              prior={f: getattr(fetched, f) for f in WEBHOOK_FIELDS})
                number.pop("bound", None)   # another number's
        elif action.key == "number.unbind":
            # what it was bound to, kept before it is undone (teardown binds it back)
            number["bound"] = {**(number.get("bound") or {}), **action.data["bound"]}
            state.save()
            await accounts.tw("unbinding the number", accounts.twilio.incoming_phone_numbers(number["sid"]).update,
                              **{f: "" for f in action.data["bound"]})
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
        elif action.key in ("wire.native", "wire.import"):
            await _import_native(accounts, settings, state)
        state.save()   # after every step: an interrupted run resumes from here
    return state.data


async def _import_native(accounts: Accounts, settings: Settings, state: State) -> None:
    """Import the number into Vapi (native: Vapi answers it; bypass: POST /call names it by id) and
    record its id (``vapi_phone_number``; `serve --mode bypass` reads it as VAPI_PHONE_NUMBER_ID)."""
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
        bound = number.get("bound") or {}
        if bound:
            progress("binding the number back")
            await accounts.tw("binding the number back", accounts.twilio.incoming_phone_numbers(number["sid"]).update,
                              **bound)
            done.append(f"bound {number['phone_number']} back to its {describe_bindings(bound)}")
    assistant = state.data.get("assistant") or {}
    if assistant.get("id"):
        if assistant.get("created"):
            progress("deleting the assistant")
            await _ignore_missing(accounts.vapi.delete_assistant(assistant["id"]))
            done.append("deleted the assistant")
        elif assistant.get("prior"):
            progress("restoring the assistant's server settings")
            await _ignore_missing(_restore_assistant(accounts, assistant))
            done.append("restored the assistant as it was")
        state.data.pop("assistant")
        state.save()
    if number.get("sid") and number.get("bought") and release_number:
        progress(f"releasing {number['phone_number']}")
        await accounts.tw("releasing the number", accounts.twilio.incoming_phone_numbers(number["sid"]).delete)
        done.append(f"released {number['phone_number']}")
    if number.get("sid"):
        state.data.pop("number")
    state.data.pop("mode", None)
    state.data.pop(PLANNED, None)
    if state.data:
        state.save()
    else:
        state.path.unlink(missing_ok=True)
    return done


async def _restore_assistant(accounts: Accounts, assistant: dict) -> None:
    """Put back what provision replaced on an assistant it updated: the fields recorded in its
    metadata (``with_prior``) as they were, those that were absent removed (null), the metadata as
    it was. An assistant without that record (updated by an older twivapi) gets the state file's
    secret-free server back, as before."""
    current = await accounts.vapi.get_assistant(assistant["id"])
    kept = ((current or {}).get("metadata") or {}).get(PRIOR_KEY)
    if not isinstance(kept, dict):
        prior = {k: v for k, v in assistant["prior"].items() if k in ("server", "serverMessages")}
        await accounts.vapi.update_assistant(assistant["id"], prior or {})
        return
    patch: dict[str, Any] = {k: None for k in kept.get("absent") or []}
    patch.update(kept.get("fields") or {})
    patch["metadata"] = kept.get("metadata")
    await accounts.vapi.update_assistant(assistant["id"], patch)


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
    """The checks, in order; clients it opens itself are closed before it returns (a caller's are the
    caller's to close)."""
    checks: list[Check] = []
    for attr, env in (("twilio_account_sid", "TWILIO_ACCOUNT_SID"), ("twilio_auth_token", "TWILIO_AUTH_TOKEN"),
                      ("vapi_api_key", "VAPI_API_KEY"), ("vapi_webhook_secret", "VAPI_WEBHOOK_SECRET"),
                      ("public_url", "TWIVAPI_PUBLIC_URL")):
        present = bool(getattr(settings, attr))
        checks.append(Check(f"setting {env}", present, "set" if present else "missing",
                            "" if present else f"set {env} in the environment or .env"))
    stream_url = _stream_url_check(settings, str(state.data.get("mode", settings.mode)))
    if stream_url is not None:
        checks.append(stream_url)
    if not (settings.twilio_account_sid and settings.twilio_auth_token and settings.vapi_api_key):
        return checks
    if accounts is not None:
        return await _doctor_accounts(settings, state, accounts, checks)
    owned = Accounts(settings)
    try:
        return await _doctor_accounts(settings, state, owned, checks)
    finally:
        await owned.aclose()   # its aiohttp session: left open, aiohttp warns "Unclosed client session"


async def _binding_check(accounts: Accounts, number: dict) -> list[Check]:
    """A number bound to a TwiML App or a SIP trunk: the reason calls will not arrive, whatever its
    voice URL says."""
    try:
        live = await accounts.tw("reading the number", accounts.twilio.incoming_phone_numbers(number["sid"]).fetch)
    except ApiError:
        return []   # said by the webhook checks
    bound = bindings(live)
    if not bound:
        return [Check("number binding", True, "none (its voice URL answers its calls)")]
    return [Check("number binding", False,
                  f"bound to {describe_bindings(bound)}: Twilio sends its calls there and never calls its voice URL, "
                  "so calls will not arrive", "run `twivapi provision --number "
                  f"{number.get('phone_number', '')}` again (it unbinds it; teardown binds it back), or remove the "
                  "binding in the Twilio Console")]


def _stream_url_check(settings: Settings, mode: str) -> Check | None:
    """Stream mode: whether Twilio can open the media stream the public URL makes (wss://, port 443)."""
    from urllib.parse import urlsplit

    from .twilio_media import loopback, stream_url_problems, ws_url

    if mode != "stream" or not settings.public_url:
        return None
    name, public = "media stream URL (stream mode)", settings.public_url
    error, warning = stream_url_problems(public)
    if error:
        return Check(name, False, error, "set TWIVAPI_PUBLIC_URL to the https:// URL Twilio reaches, on port 443 "
                                         "(your ngrok URL, or run `twivapi serve --tunnel`)")
    if warning:
        return Check(name, False, f"warning: {warning}", "use a public URL on port 443 (a tunnel or a proxy in front)")
    local = " (loopback: the simulators only; Twilio cannot reach it)" if loopback(urlsplit(public).hostname) else ""
    return Check(name, True, ws_url(public) + "/twilio/media" + local)


async def _doctor_accounts(settings: Settings, state: State, accounts: Accounts, checks: list[Check]) -> list[Check]:
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
    if number.get("sid"):
        checks += await _binding_check(accounts, number)
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
