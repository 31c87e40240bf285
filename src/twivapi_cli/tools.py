"""Your own tools for the bridge: ``from twivapi_cli.tools import tool``.

    from typing import Annotated, Literal
    from twivapi_cli.tools import tool

    @tool
    async def book_table(day: str, people: Annotated[int, "how many guests"], time: str = "19:00") -> str:
        \"\"\"Book a table at the restaurant.\"\"\"
        return f"booked for {people} on {day} at {time}"

A tool is a plain function, sync or async, with typed parameters. Its signature gives the JSON Schema
Vapi's model sees (``definition()``: a ``CreateFunctionToolDTO``) and validates the model's arguments
(pydantic) before the call; its docstring is the description; ``Annotated[T, "text"]`` (or
``pydantic.Field(description=...)``) describes a parameter. What it returns is the result (a string,
or anything JSON-able); what it raises, invalid arguments and a timeout become an error result.
``@tool`` returns the function unchanged (still callable as before), marked with its ``Tool``.

``load_tools("module:attr")`` (``serve --tools`` / ``provision --tools`` / ``tools schema``) reads
tools from a module (imported from the current directory too) or a file (``path/to/tools.py:attr``);
``attr`` may be one tool function, a list or tuple of them (undecorated functions are taken as
tools too), or a module; without ``:attr``, every ``@tool`` function of the module, in order.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from .errors import UsageError

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")   # OpenAIFunction.name
MARK = "__twivapi_tool__"
# the keys of Vapi's JsonSchema (what OpenAIFunctionParameters.properties may hold), and its formats
SCHEMA_KEYS = ("type", "items", "properties", "description", "pattern", "format", "required", "enum", "title")
FORMATS = ("date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid")
JSON_TYPES = ("string", "number", "integer", "boolean", "array", "object")


class ToolArgumentsError(ValueError):
    """The model's arguments do not fit the function's signature."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    function: Callable[..., Any]
    arguments: type[pydantic.BaseModel]   # the signature as a model: validation and the schema
    timeout: float | None = None          # seconds; None: the bridge's TWIVAPI_TOOL_TIMEOUT

    def definition(self) -> dict[str, Any]:
        """The tool as Vapi's ``CreateFunctionToolDTO`` (``model.tools[]`` of an assistant)."""
        function: dict[str, Any] = {"name": self.name, "parameters": parameters_schema(self.arguments)}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}

    async def run(self, arguments: dict[str, Any], timeout: float) -> Any:
        """Validate, then call (a sync function in a worker thread, so the bridge's loop runs on);
        TimeoutError after ``self.timeout`` or ``timeout`` seconds."""
        try:
            values = self.arguments.model_validate(arguments)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
            raise ToolArgumentsError(f"invalid arguments for '{self.name}': {problems}") from None
        kwargs = {name: getattr(values, name) for name in type(values).model_fields}
        if inspect.iscoroutinefunction(self.function):
            call = self.function(**kwargs)
        else:
            call = asyncio.to_thread(self.function, **kwargs)
        return await asyncio.wait_for(call, self.timeout or timeout)


def tool(function: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         timeout: float | None = None) -> Any:
    """Mark ``function`` as a tool: ``@tool`` or ``@tool(name=..., description=..., timeout=...)``."""
    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, MARK, make_tool(fn, name=name, description=description, timeout=timeout))
        return fn
    return mark(function) if function is not None else mark


def make_tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None,
              timeout: float | None = None) -> Tool:
    """The ``Tool`` for a function; ValueError when it cannot be one (a bad name, ``*args``)."""
    tool_name: str = name or str(getattr(fn, "__name__", ""))
    if not NAME.fullmatch(tool_name):
        raise ValueError(f"tool name {tool_name!r}: Vapi allows 1-64 letters, digits, '_' and '-'")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"tool '{tool_name}': timeout must be a positive number of seconds")
    return Tool(tool_name, description if description is not None else inspect.getdoc(fn) or "", fn,
                _arguments_model(fn, tool_name), timeout)


def _arguments_model(fn: Callable[..., Any], tool_name: str) -> type[pydantic.BaseModel]:
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:   # an annotation that does not resolve (a name not imported)
        raise ValueError(f"tool '{tool_name}': its annotations do not resolve ({type(exc).__name__}: {exc})") from None
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD, parameter.POSITIONAL_ONLY):
            raise ValueError(f"tool '{tool_name}': parameter {parameter.name!r} must be a named parameter "
                             "(no *args, **kwargs or positional-only ones)")
        if parameter.name.startswith("_"):   # pydantic would take it for a private attribute, not an argument
            raise ValueError(f"tool '{tool_name}': parameter {parameter.name!r} must not start with '_'")
        annotation = _described(hints.get(parameter.name, Any))
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
    # extra arguments (a model that invents one) are ignored, not an error
    config = pydantic.ConfigDict(extra="ignore", arbitrary_types_allowed=False)
    try:
        return pydantic.create_model(f"{tool_name}_arguments", __config__=config, **fields)
    except Exception as exc:   # a type pydantic cannot validate, a parameter named _private...
        raise ValueError(f"tool '{tool_name}': {type(exc).__name__}: {exc}".splitlines()[0]) from None


def _described(annotation: Any) -> Any:
    """``Annotated[T, "text"]``: the text becomes the parameter's description."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        texts = [e for e in extras if isinstance(e, str)]
        if texts:
            rest = [e for e in extras if not isinstance(e, str)]
            return typing.Annotated[(base, *rest, pydantic.Field(description=" ".join(texts)))]
    return annotation


# --- the schema Vapi accepts ----------------------------------------------------------------------

def parameters_schema(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """``OpenAIFunctionParameters`` for a signature: pydantic's JSON Schema narrowed to Vapi's
    ``JsonSchema`` (no $ref, anyOf, default or bounds: a default is said in the description; bounds
    are still checked when the tool is called)."""
    full = model.model_json_schema()
    converted = _narrow(full, full.get("$defs", {}))
    return {"type": "object", "properties": converted.get("properties", {}), "required": converted.get("required", [])}


def _narrow(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    for union in ("anyOf", "oneOf", "allOf"):
        if union in node:   # T | None, or the first of several alternatives: JsonSchema has no unions
            options = [o for o in node[union] if o.get("type") != "null"] or [{"type": "string"}]
            node = {**_narrow(options[0], defs), **{k: v for k, v in node.items() if k != union}}
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    out: dict[str, Any] = {"type": kind if kind in JSON_TYPES else _type_of(node)}
    description = node.get("description", "")
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
    if "enum" in node:
        if all(isinstance(v, str) for v in node["enum"]):
            out["enum"] = list(node["enum"])
        else:
            description = f"{description} (one of: {', '.join(map(str, node['enum']))})".strip()
    if "default" in node:
        description = f"{description} (default: {node['default']})".strip()
    if description:
        out["description"] = description
    if node.get("format") in FORMATS:
        out["format"] = node["format"]
    if isinstance(node.get("pattern"), str):
        out["pattern"] = node["pattern"]
    if out["type"] == "array":
        out["items"] = _narrow(node.get("items") or {"type": "string"}, defs)
    if out["type"] == "object" and isinstance(node.get("properties"), dict):
        out["properties"] = {k: _narrow(v, defs) for k, v in node["properties"].items()}
        if node.get("required"):
            out["required"] = list(node["required"])
    return out


def _type_of(node: dict[str, Any]) -> str:
    """A type for a schema that names none (``Any``, an enum of mixed values): Vapi requires one."""
    values = node.get("enum") or []
    if values and all(isinstance(v, bool) for v in values):
        return "boolean"
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "integer"
    return "string"


# --- loading module:attr ----------------------------------------------------------------------------

def load_tools(spec: str, *, flag: str = "--tools") -> list[Tool]:
    """The tools ``spec`` names (see the module's docstring); UsageError (exit 2) naming the module
    and the error when it does not import, or naming what is wrong with ``attr``."""
    where, _, attr = spec.rpartition(":") if ":" in spec else (spec, "", "")
    module = _import(where, spec, flag)
    target: Any = module
    if attr:
        try:
            target = functools.reduce(getattr, attr.split("."), module)
        except AttributeError:
            raise UsageError(f"{flag} {spec}: module {module.__name__!r} has no attribute {attr!r}") from None
    tools = _collect(target, spec, flag)
    if not tools:
        raise UsageError(f"{flag} {spec}: no tools found",
                         hint="decorate functions with @tool (from twivapi_cli.tools import tool), or name a list of them")
    names = [t.name for t in tools]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise UsageError(f"{flag} {spec}: more than one tool named {', '.join(doubled)}")
    return tools


def _import(where: str, spec: str, flag: str) -> types.ModuleType:
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    try:
        if is_file:
            path = Path(where).resolve()
            if not path.is_file():
                raise UsageError(f"{flag} {spec}: no file {where}")
            name = f"twivapi_user_tools_{abs(hash(str(path)))}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
            return module
        if "" not in sys.path and str(Path.cwd()) not in sys.path:   # a console script: cwd is not on the path
            sys.path.insert(0, str(Path.cwd()))
        return importlib.import_module(where)
    except UsageError:
        raise
    except BaseException as exc:   # anything the user's module raises on import, SystemExit included
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UsageError(f"{flag} {spec}: cannot import {'file' if is_file else 'module'} {where!r}: "
                         f"{type(exc).__name__}: {exc}") from None


def _collect(target: Any, spec: str, flag: str) -> list[Tool]:
    try:
        if isinstance(target, types.ModuleType):
            return [getattr(v, MARK) for v in vars(target).values() if callable(v) and hasattr(v, MARK)]
        if callable(target):
            return [as_tool(target)]
        if isinstance(target, (list, tuple)):
            return [as_tool(item) for item in target]
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{flag} {spec}: {exc}") from None
    raise UsageError(f"{flag} {spec}: {type(target).__name__} is not a tool, a list of tools or a module")


def as_tool(item: Any) -> Tool:
    """A ``Tool`` as it is, a ``@tool`` function's, or a plain function taken as a tool."""
    if isinstance(item, Tool):
        return item
    marked = getattr(item, MARK, None)
    if isinstance(marked, Tool):
        return marked
    if callable(item):
        return make_tool(item)
    raise TypeError(f"{item!r} is not a function")
