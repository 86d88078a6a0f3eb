"""JSON Schemas: load and check them, validate outputs, bound them for decoding, flatten objects for scoring."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.exceptions import NoSuchResource, Unresolvable

from jsonextract.data.io import read_bytes
from jsonextract.errors import UserError

if TYPE_CHECKING:
    from jsonextract.config.serve import SchemaLimits


class SchemaError(UserError):
    """An invalid or unusable JSON Schema; the message says what and where."""


def check_schema(schema: Any, source: str = "schema") -> dict:
    """Return `schema` if it is a valid JSON Schema object, else raise SchemaError naming the problem."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{source}: a JSON Schema must be an object, got {type(schema).__name__}")
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "<root>"
        raise SchemaError(f"{source}: invalid JSON Schema at {where}: {e.message}") from None
    return schema


def check_limits(schema: Any, limits: "SchemaLimits") -> None:
    """SchemaError naming the first bound `schema` breaks, or a `$ref` that is not local (`#/...`). Walks the
    document without recursion, so a schema nested thousands deep is refused, not a RecursionError."""
    properties = 0
    stack: list[tuple[Any, int, str]] = [(schema, 0, "")]
    while stack:
        node, depth, path = stack.pop()
        where = path[:200] or "/"
        if depth > limits.max_depth:
            raise SchemaError(f"schema nests deeper than this deployment's limit of {limits.max_depth} (at {where})")
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                raise SchemaError(f"$ref {ref[:100]!r} at {where}: only local references (#/...) are allowed")
            if isinstance(node.get("properties"), dict):
                properties += len(node["properties"])
                if properties > limits.max_properties:
                    raise SchemaError(f"schema has more than {limits.max_properties} properties (this deployment's "
                                      "limit)")
            enum = node.get("enum")
            if isinstance(enum, list) and len(enum) > limits.max_enum_values:
                raise SchemaError(f"enum at {where} has {len(enum)} values, over this deployment's limit of "
                                  f"{limits.max_enum_values}")
            pattern = node.get("pattern")
            if isinstance(pattern, str) and len(pattern) > limits.max_pattern_length:
                raise SchemaError(f"pattern at {where} is {len(pattern)} characters, over this deployment's "
                                  f"limit of {limits.max_pattern_length}")
            stack.extend((v, depth + 1, f"{path}/{k}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, depth + 1, f"{path}/{i}") for i, v in enumerate(node))
    size = len(canonical_json(schema))  # safe now: the depth is bounded
    if size > limits.max_bytes:
        raise SchemaError(f"schema is {size} bytes, over this deployment's limit of {limits.max_bytes}")


def load_schema(path: str | Path) -> dict:
    p = str(path)
    try:
        text = read_bytes(p, "schema file")
    except UserError as e:
        raise SchemaError(str(e)) from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    return check_schema(schema, str(p))


def schema_hash(schema: dict) -> str:
    return hashlib.sha256(canonical_json(schema, sort_keys=True).encode()).hexdigest()[:16]


def canonical_json(obj: Any, sort_keys: bool = False) -> str:
    """The one serialisation used for training targets and accepted by the decoder: compact, UTF-8."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)


def order_like_schema(obj: Any, schema: dict | None, root: dict | None = None) -> Any:
    """Copy of `obj` whose object keys follow the schema's `properties` order (unknown keys last, as given).

    This is the canonical serialisation of training targets. It has to match the decoder: xgrammar's fixed-order
    grammar forces declared order, and its any_order mode (0.2.8) lets a key repeat, so a weak model loops on one key.
    """
    if schema is None:
        return obj
    root = root if root is not None else schema
    node = schema
    if isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        node = root
        for part in ref[2:].split("/") if ref.startswith("#/") else []:
            node = node.get(part, {}) if isinstance(node, dict) else {}
    if isinstance(obj, dict):
        props = node.get("properties", {}) if isinstance(node, dict) else {}
        keys = [k for k in props if k in obj] + [k for k in obj if k not in props]
        return {k: order_like_schema(obj[k], props.get(k), root) for k in keys}
    if isinstance(obj, list):
        items = node.get("items") if isinstance(node, dict) else None
        return [order_like_schema(v, items if isinstance(items, dict) else None, root) for v in obj]
    return obj


def _refuse_retrieval(uri: str):
    # jsonschema fetches a remote `$ref` over HTTP unless the registry says otherwise: a server-side request
    # forgery when the schema comes from a request. Only local `#/...` references are ever resolved.
    raise NoSuchResource(ref=uri)


def _local_registry():
    return Registry(retrieve=_refuse_retrieval)


def validation_error(obj: Any, schema: dict) -> str | None:
    """None if `obj` validates against `schema`, else a one-line message with the failing path."""
    try:
        err = jsonschema.exceptions.best_match(Draft202012Validator(schema, registry=_local_registry()).iter_errors(obj))
    except Unresolvable as e:
        return f"unresolvable $ref {str(e.ref)[:100]!r} (only local references are resolved)"
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "<root>"
    return f"at {where}: {err.message}"


def bounded(schema: dict, max_string_length: int, max_array_items: int) -> dict:
    """Copy of `schema` where every string has a maxLength and every array a maxItems.

    Hard-won: with a weakly trained model, grammar-constrained output only terminates when every string/array in
    the schema is bounded; unbounded schemas ran to max_new_tokens. Existing bounds are kept.
    """
    out = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            types = node.get("type")
            types = types if isinstance(types, list) else [types]
            if "string" in types and "enum" not in node and "const" not in node and "format" not in node \
                    and "pattern" not in node:
                node.setdefault("maxLength", max_string_length)
            if "array" in types:
                node.setdefault("maxItems", max_array_items)
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(out)
    return out


def flatten(obj: Any, prefix: str = "") -> set[tuple[str, str]]:
    """Object -> set of (path, normalised value) pairs used for field-level scoring.

    Nested objects join keys with '.'; a list contributes one pair per element (so list elements score as a set);
    strings are normalised by strip + casefold; null values and empty containers contribute nothing (a missing or
    null field is never a hit).
    """
    items: set[tuple[str, str]] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            items |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for v in obj:
            items |= flatten(v, prefix)
    elif obj is None:
        pass
    elif isinstance(obj, str):
        if obj.strip():
            items.add((prefix, obj.strip().casefold()))
    else:
        items.add((prefix, json.dumps(obj)))
    return items


# Keywords xgrammar 0.2.8 accepts but does not enforce (checked: a grammar compiled from {"not": ...} allows
# what `not` forbids). The decoder refuses schemas that use them instead of emitting outputs that then fail
# validation.
UNENFORCED_KEYWORDS = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                       "unevaluatedProperties", "unevaluatedItems", "contains", "minContains", "maxContains",
                       "propertyNames", "patternProperties", "$dynamicRef")
_SUBSCHEMA = ("items", "additionalProperties", "additionalItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def unsupported_features(schema: Any, path: str = "") -> list[str]:
    """['not at /properties/x', ...]: keywords the constrained decoder cannot enforce (property *names* are fine)."""
    if not isinstance(schema, dict):
        return []
    found = [f"{k} at {path or '/'}" for k in UNENFORCED_KEYWORDS if k in schema]
    for k in _SUBSCHEMA:
        found += unsupported_features(schema.get(k), f"{path}/{k}")
    for k in _SUBSCHEMA_MAPS:
        for name, sub in (schema.get(k) or {}).items() if isinstance(schema.get(k), dict) else []:
            found += unsupported_features(sub, f"{path}/{k}/{name}")
    for k in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(k) or []) if isinstance(schema.get(k), list) else []:
            found += unsupported_features(sub, f"{path}/{k}/{i}")
    return found
