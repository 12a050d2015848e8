"""The JSON schema of the study configuration: the one source of every default.

Kept apart from :mod:`msifusion.config` (which reads sheets and image headers) so that any stage
can take its defaults from here without importing more.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).with_name("schemas") / "config.schema.yaml"


def load_schema() -> dict:
    """The JSON schema of ``config.yaml`` as a dict (a fresh copy)."""
    return copy.deepcopy(_schema())


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def default(key: str):
    """The default of a configuration key, from the schema (the one source of defaults).

    Parameters
    ----------
    key : str
        Dotted key, e.g. ``"registration.min_score"``; per-modality keys start with
        ``"modality."`` (e.g. ``"modality.nmf.rank"``), the settings of any chain modality.

    Returns
    -------
    object
        A copy of the default (lists and dicts may be changed by the caller).

    Raises
    ------
    KeyError
        The key is not in the schema or has no default.

    >>> default("registration.min_score")
    0.6
    """
    root = _schema()
    parts = key.split(".")
    node = root["$defs"]["modality"] if parts[0] == "modality" else root["properties"][parts[0]]
    for part in parts[1:]:
        node = resolve_ref(node, root)["properties"][part]
    if "default" not in node:
        raise KeyError(f"config key {key!r} has no default in the schema")
    return copy.deepcopy(node["default"])


def resolve_ref(schema: dict, root: dict) -> dict:
    """The sub-schema a local ``$ref`` (``#/...``) points to, else ``schema`` itself."""
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if isinstance(ref, str) and ref.startswith("#/"):
        node = root
        for part in ref[2:].split("/"):
            node = node[part]
        return node
    return schema


def reference_table() -> str:
    """Every configuration key with its type, default and description, as a Markdown table
    (the key reference of ``config/README.md``, generated so that it cannot drift from the
    schema: ``python -m msifusion config-keys``)."""
    root = _schema()
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def cell(text) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    def walk(node: dict, prefix: str, required: set) -> None:
        for name, sub in node.get("properties", {}).items():
            sub = resolve_ref(sub, root)
            key = f"{prefix}{name}"
            types = sub.get("type", "enum" if "enum" in sub else "")
            types = " or ".join(types) if isinstance(types, list) else types
            if "enum" in sub:
                types += " (" + ", ".join(map(_yaml_value, sub["enum"])) + ")"
            dflt = ("required" if name in required else
                    f"`{_yaml_value(sub['default'])}`" if "default" in sub else "")
            if sub.get("type") != "object" or "description" in sub:
                rows.append(f"| `{key}` | {cell(types)} | {dflt} | {cell(sub.get('description', ''))} |")
            if name == "modalities":
                walk(root["$defs"]["modality"], f"{key}.<name>.", set())
            elif sub.get("type") == "object":
                walk(sub, f"{key}.", set(sub.get("required", [])))
            elif sub.get("type") == "array" and isinstance(sub.get("items"), dict) \
                    and "properties" in sub["items"]:
                walk(sub["items"], f"{key}[].", set(sub["items"].get("required", [])))

    walk(root, "", set(root.get("required", [])))
    return "\n".join(rows) + "\n"


def _yaml_value(value) -> str:
    """A default as it is written in YAML (``null``, ``true``, ``[0, 1]``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()
