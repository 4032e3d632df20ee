"""Gemini's OpenAPI-subset ``Schema`` (``parameters``, ``responseSchema``) ->
JSON Schema, so tools declared the old way translate to other protocols."""

from __future__ import annotations

from typing import Any

# Schema fields that have no JSON Schema meaning
_DROP = frozenset({"nullable", "propertyOrdering", "property_ordering", "example"})
_RENAME = {"any_of": "anyOf", "min_items": "minItems", "max_items": "maxItems", "min_length": "minLength",
           "max_length": "maxLength", "min_properties": "minProperties", "max_properties": "maxProperties"}


def openapi_to_json_schema(schema: Any) -> Any:
    """Lower-case the ``type`` enums (``OBJECT`` -> ``object``), turn
    ``nullable: true`` into a ``null`` type alternative, recurse into
    properties / items / anyOf."""
    if isinstance(schema, list):
        return [openapi_to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP:
            continue
        key = _RENAME.get(key, key)
        if key == "type" and isinstance(value, str):
            value = value.lower()
            if value == "type_unspecified":
                continue
        elif key == "properties" and isinstance(value, dict):
            value = {name: openapi_to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "anyOf"):
            value = openapi_to_json_schema(value)
        out[key] = value
    if schema.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out
