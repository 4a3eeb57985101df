"""The structured-output fields of an OpenAI-compatible body into one engine Constraint:
OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema":
{"name", "schema", "strict"}}), vLLM's `structured_outputs` ({"json" | "regex" | "grammar" |
"choice" | "json_object": ...}) and vLLM's older `guided_json`, `guided_regex`,
`guided_grammar` and `guided_choice`. At most one may constrain a request; a second is
refused (400, naming it), as is a malformed one. Whether a schema, regex or grammar is
valid is the engine's check (server/structured_output.py), also a 400 naming the field.
"""

from __future__ import annotations

import json
import re

from loraquilt.server.generation import ErrorKind, GenerationError
from loraquilt.server.request import Constraint, RequestError

STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_grammar",
                     "guided_choice")
STRUCTURED_OUTPUTS_KINDS = {"json": "json_schema", "regex": "regex", "grammar": "grammar", "choice": "choice",
                            "json_object": "json_object"}
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name


def _bad(param: str, message: str) -> GenerationError:
    return GenerationError(ErrorKind.INVALID_ARGUMENT, f"{param}: {message}", param)


def structured_fields(body: dict) -> dict:
    """{"constraint": Constraint} for the body's structured-output field, {} when it has none."""
    found = []
    for name in STRUCTURED_FIELDS:
        value = body.get(name)
        if value is not None:
            constraint = _PARSERS[name](value)
            if constraint is not None:
                found.append((name, constraint))
    if len(found) > 1:
        raise _bad(found[1][0], f"give at most one of {', '.join(name for name, _ in found)} "
                                "(one structured-output constraint per request)")
    return {"constraint": found[0][1]} if found else {}


def _constraint(kind: str, value, param: str) -> Constraint:
    """A Constraint of a JSON value (a schema object or a JSON string, a list of choices, text)."""
    if kind in ("json_schema", "choice") and not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))  # key order kept: it is the output's
    try:
        return Constraint(kind, value, param)
    except RequestError as error:
        raise GenerationError(ErrorKind.INVALID_ARGUMENT, str(error), error.field) from None


def _response_format(value) -> Constraint | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _bad("response_format", 'must be an object with a "type": text, json_object or json_schema')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return _constraint("json_object", "", "response_format")
    if kind != "json_schema":
        raise _bad("response_format", f"type must be text, json_object or json_schema, got {kind[:40]!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format", 'json_schema must be an object {"name", "schema", "strict"}')
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.fullmatch(name):
        raise _bad("response_format", "json_schema.name must be 1-64 characters of [A-Za-z0-9_-]")
    if not isinstance(spec.get("schema"), dict):
        raise _bad("response_format", "json_schema.schema must be a JSON schema (an object)")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise _bad("response_format", "json_schema.strict must be a boolean")
    return _constraint("json_schema", spec["schema"], "response_format")


def _structured_outputs(value) -> Constraint:
    if not isinstance(value, dict):
        raise _bad("structured_outputs", f"must be an object with one of {', '.join(STRUCTURED_OUTPUTS_KINDS)}")
    unknown = sorted(key for key, item in value.items() if key not in STRUCTURED_OUTPUTS_KINDS
                     and item not in (None, False))
    if unknown:
        raise _bad(f"structured_outputs.{unknown[0][:40]}", "is not supported")
    given = [key for key in STRUCTURED_OUTPUTS_KINDS if value.get(key) not in (None, False)]
    if len(given) != 1:
        raise _bad("structured_outputs", f"give exactly one of {', '.join(STRUCTURED_OUTPUTS_KINDS)}, "
                                         f"got {len(given)}")
    key = given[0]
    param = f"structured_outputs.{key}"
    if key == "json_object":
        if value[key] is not True:
            raise _bad(param, "must be true")
        return _constraint("json_object", "", param)
    return _checked(STRUCTURED_OUTPUTS_KINDS[key], value[key], param)


def _checked(kind: str, value, param: str) -> Constraint:
    """A constraint of a JSON value whose type the kind fixes."""
    if kind == "json_schema" and not isinstance(value, (dict, str)):
        raise _bad(param, "must be a JSON schema (an object, or its JSON text)")
    if kind in ("regex", "grammar") and not isinstance(value, str):
        raise _bad(param, "must be a string")
    if kind == "choice" and not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        raise _bad(param, "must be a list of strings")
    return _constraint(kind, value, param)


_PARSERS = {
    "response_format": _response_format,
    "structured_outputs": _structured_outputs,
    "guided_json": lambda value: _checked("json_schema", value, "guided_json"),
    "guided_regex": lambda value: _checked("regex", value, "guided_regex"),
    "guided_grammar": lambda value: _checked("grammar", value, "guided_grammar"),
    "guided_choice": lambda value: _checked("choice", value, "guided_choice"),
}
