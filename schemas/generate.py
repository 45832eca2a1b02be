"""Generates the contract artefacts (JSON Schemas, AsyncAPI, README subject table) and checks them for drift.

A development tool, not part of the installed package: `make schemas` (or `python -m schemas.generate`
from the repository root) writes them, `--check` reports drift, and the test suite runs the same check.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import functools
import importlib.metadata
import inspect
import json
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from warden.messages import ENVELOPE_TYPES, MESSAGE_TYPES, Payload
from warden.subjects import CHANNELS, Channel, Subjects

JsonObject = dict[str, Any]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI_VERSION = "3.0.0"
SCHEMA_DIR = "schemas"
ASYNCAPI_FILE = "asyncapi.json"
SCHEMA_SUFFIX = ".schema.json"
REGENERATE_COMMAND = "make schemas"
# The distribution whose version the AsyncAPI document carries.
DISTRIBUTION = "warden-control-plane"
README_START = "<!-- subjects:start -->"
README_END = "<!-- subjects:end -->"

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")
_LOCAL_DEFS = "#/$defs/"
_COMPONENT_SCHEMAS = "#/components/schemas/"

# Every placeholder a channel pattern may use needs words here; an unknown one fails generation
# rather than shipping an undocumented parameter.
_PARAMETER_DESCRIPTIONS: dict[str, str] = {
    "prefix": "Installation prefix (setting `WARDEN_SUBJECT_PREFIX`), so several installations "
    "or test runs can share one NATS server.",
    "tenant": "Tenant id; equals the envelope's `tenant`.",
    "actor": "Who sends the command; equals the envelope's `actor` (else the gate rejects it, "
    "`actor_mismatch`). A tenant's credential may publish only on its own actor's subject.",
    "type": "Message type; equals the envelope's `type`. Spans two subject tokens (e.g. `run.submitted`).",
    "entity": "Kind of entity the event is about.",
    "entity_id": "Id of that entity (a run id, a command id for rejections, a stream name for gaps); "
    "equals the envelope's `entity_id`.",
}
# Where a subscriber can cross-check a subject token against the envelope it carries.
_PARAMETER_LOCATIONS: dict[str, str] = {
    "tenant": "$message.payload#/tenant",
    "actor": "$message.payload#/actor",
    "type": "$message.payload#/type",
    "entity_id": "$message.payload#/entity_id",
}


def _doc(model: type[Payload]) -> str:
    return inspect.cleandoc(model.__doc__ or "")


def _first_sentence(text: str) -> str:
    head, dot, _ = text.partition(". ")
    return head + dot.strip() if dot else text


@functools.cache
def _package_version() -> str:
    """The installed package's version, else the one in pyproject.toml (a source checkout)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        return str(project.get("version", "0.0.0"))


def schema_id(type_name: str) -> str:
    """The `$id` of a type's JSON Schema: stable, versioned, and not a URL anyone must host."""
    return f"urn:warden:schema:{type_name}:v{MESSAGE_TYPES[type_name].SCHEMA_VERSION}"


def _envelope_schema(type_name: str) -> JsonObject:
    model = MESSAGE_TYPES[type_name]
    schema = ENVELOPE_TYPES[type_name].model_json_schema()
    properties: JsonObject = schema["properties"]
    # pydantic sees `type: str`; pinning it makes each schema accept only its own message type.
    properties["type"] = {
        "const": type_name,
        "description": "The message type; it selects the schema of `data`.",
        "title": "Type",
        "type": "string",
    }
    version = model.SCHEMA_VERSION
    properties["schema_version"] = {
        **properties["schema_version"],
        "const": version,
        "description": "Version of the `data` shape this schema describes; older versions are upcast on read.",
    }
    if version > 1:
        # An absent schema_version means 1 to the reader, which is not this shape.
        properties["schema_version"].pop("default", None)
        schema["required"] = [*schema["required"], "schema_version"]
    kind = model.KIND
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": schema_id(type_name),
        **schema,
        "title": f"{model.__name__}Envelope",
        "description": f"Envelope of a `{type_name}` {kind} (schema_version {version}). {_doc(model)}",
    }


def json_schemas() -> dict[str, JsonObject]:
    """One JSON Schema (draft 2020-12) per message type: the whole envelope with that payload."""
    return {type_name: _envelope_schema(type_name) for type_name in MESSAGE_TYPES}


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: (
                _COMPONENT_SCHEMAS + value.removeprefix(_LOCAL_DEFS)
                if key == "$ref" and isinstance(value, str) and value.startswith(_LOCAL_DEFS)
                else _rewrite_refs(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def _component_schemas(schemas: dict[str, JsonObject]) -> JsonObject:
    """Hoist every schema's `$defs` into one shared namespace, as AsyncAPI tooling resolves `$ref`s
    against the document root and does not honour an embedded `$id`."""
    components: JsonObject = {}

    def add(name: str, schema: JsonObject) -> None:
        if name in components and components[name] != schema:
            raise ValueError(f"two different schemas are both named {name!r}; rename one model")
        components[name] = schema

    for type_name, original in schemas.items():
        schema = copy.deepcopy(original)
        for keyword in ("$schema", "$id"):
            schema.pop(keyword, None)
        for def_name, definition in schema.pop("$defs", {}).items():
            add(def_name, _rewrite_refs(definition))
        add(type_name, _rewrite_refs(schema))
    return dict(sorted(components.items()))


def _channel_parameters(channel: Channel) -> JsonObject:
    parameters: JsonObject = {}
    for name in _PLACEHOLDER.findall(channel.pattern):
        if name not in _PARAMETER_DESCRIPTIONS:
            raise ValueError(f"channel {channel.name!r} uses {{{name}}}, which schemas/generate.py does not describe")
        parameter: JsonObject = {"description": _PARAMETER_DESCRIPTIONS[name]}
        if name == "prefix":
            parameter["default"] = Subjects().prefix
        elif name == "type":
            parameter["enum"] = list(channel.message_types)
        elif name == "entity":
            parameter["enum"] = sorted({MESSAGE_TYPES[t].ENTITY for t in channel.message_types})
        if name in _PARAMETER_LOCATIONS:
            parameter["location"] = _PARAMETER_LOCATIONS[name]
        parameters[name] = parameter
    return parameters


def _message(type_name: str) -> JsonObject:
    model = MESSAGE_TYPES[type_name]
    doc = _doc(model)
    return {
        "name": type_name,
        "title": model.__name__,
        "summary": _first_sentence(doc),
        "description": doc,
        "contentType": "application/json",
        "payload": {"$ref": _COMPONENT_SCHEMAS + type_name},
        "correlationId": {
            "description": "Shared by every message of one causal chain, starting with the command's id.",
            "location": "$message.payload#/correlation_id",
        },
        "tags": [{"name": model.KIND}],
        "x-warden-entity": model.ENTITY,
        "x-warden-schema-version": model.SCHEMA_VERSION,
    }


def asyncapi_document() -> JsonObject:
    """The AsyncAPI 3.0 document for every channel in the catalogue and every registered type."""
    channels: JsonObject = {}
    operations: JsonObject = {}
    for channel in CHANNELS:
        channels[channel.name] = {
            "address": channel.pattern,
            "title": channel.name.capitalize(),
            "description": channel.description,
            "parameters": _channel_parameters(channel),
            "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in channel.message_types},
        }
        messages = [{"$ref": f"#/channels/{channel.name}/messages/{name}"} for name in channel.message_types]
        channel_ref = {"$ref": f"#/channels/{channel.name}"}
        operations[f"{channel.name}.send"] = {
            "action": "send",
            "channel": channel_ref,
            "messages": messages,
            "title": f"Publish {channel.name}",
            "description": f"Published by {channel.published_by}.",
        }
        operations[f"{channel.name}.receive"] = {
            "action": "receive",
            "channel": channel_ref,
            "messages": messages,
            "title": f"Consume {channel.name}",
            "description": f"Consumed by {channel.consumed_by}.",
        }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:warden",
        "info": {
            "title": "Warden",
            "version": _package_version(),
            "description": "Event-sourced control plane for AI agents on NATS JetStream. Every message "
            "is a JSON envelope (in the spirit of CloudEvents 1.0) whose `type` names the shape of "
            "its `data`. Generated from the message models and the subject catalogue "
            "(warden.messages, warden.subjects); do not edit.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": {name: _message(name) for name in MESSAGE_TYPES},
            "schemas": _component_schemas(json_schemas()),
        },
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _with_prefix(text: str, prefix: str) -> str:
    # Subject patterns inside prose become code spans, so `{run_id}` and `>` render literally.
    return re.sub(r"\{prefix\}(\.\S*[^\s.,;:])?", lambda m: f"`{prefix}{m.group(1) or ''}`", text)


def subject_table_markdown(prefix: str = "warden") -> str:
    """The README's subject catalogue: one row per channel, shown under the default prefix."""
    rows = [
        "| Subject pattern | Carries | Published by | Consumed by | What for |",
        "| --- | --- | --- | --- | --- |",
    ]
    for channel in CHANNELS:
        cells = (
            f"`{channel.pattern.replace('{prefix}', prefix)}`",
            ", ".join(f"`{name}`" for name in channel.message_types),
            channel.published_by,
            channel.consumed_by,
            _with_prefix(channel.description, prefix),
        )
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def _dump(document: JsonObject) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render_artefacts() -> dict[str, str]:
    """Every generated file, keyed by its path relative to the project root (POSIX separators)."""
    files = {f"{SCHEMA_DIR}/{name}{SCHEMA_SUFFIX}": _dump(schema) for name, schema in json_schemas().items()}
    files[f"{SCHEMA_DIR}/{ASYNCAPI_FILE}"] = _dump(asyncapi_document())
    return dict(sorted(files.items()))


def _extra_files(root: Path, expected: dict[str, str]) -> list[Path]:
    # Only `*.schema.json` counts as ours: anything else in schemas/ is left alone.
    directory = root / SCHEMA_DIR
    if not directory.is_dir():
        return []
    return sorted(
        path for path in directory.glob(f"*{SCHEMA_SUFFIX}") if path.relative_to(root).as_posix() not in expected
    )


def write_artefacts(root: Path) -> list[Path]:
    """Bring `root/schemas/` in line with the registry; return the paths written or removed.

    Files already up to date are not touched, so an unchanged tree returns an empty list. A
    `*.schema.json` no message type produces any more is deleted (it is in the list, and gone).
    """
    expected = render_artefacts()
    changed: list[Path] = []
    for relative, content in expected.items():
        path = root / relative
        data = content.encode("utf-8")
        if path.is_file() and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        changed.append(path)
    for path in _extra_files(root, expected):
        path.unlink()
        changed.append(path)
    return changed


def write_readme_table(root: Path) -> bool:
    """Put the generated subject table between the README's markers; whether anything changed."""
    readme = root / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start == -1 or end < start:
        return False
    updated = text[: start + len(README_START)] + "\n" + subject_table_markdown() + text[end:]
    if updated == text:
        return False
    readme.write_text(updated, encoding="utf-8")
    return True


def check_artefacts(root: Path, *, diff_lines: int = 12) -> list[str]:
    """Describe every way `root/schemas/` differs from what would be generated; empty if in sync."""
    expected = render_artefacts()
    problems: list[str] = []
    for relative, content in expected.items():
        path = root / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
            continue
        actual = path.read_bytes().decode("utf-8", errors="replace")
        if actual != content:
            diff = list(
                difflib.unified_diff(
                    actual.splitlines(), content.splitlines(), "checked in", "generated", n=1, lineterm=""
                )
            )
            shown = "\n    ".join(diff[:diff_lines]) + ("\n    ..." if len(diff) > diff_lines else "")
            problems.append(f"{relative} is stale:\n    {shown}")
    for path in _extra_files(root, expected):
        problems.append(f"{path.relative_to(root).as_posix()} is extra: no registered message type generates it")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the artefacts (or, with --check, only report drift) and say what changed."""
    parser = argparse.ArgumentParser(prog="python -m schemas.generate", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="project root")
    parser.add_argument("--check", action="store_true", help="report drift and exit 1 instead of writing")
    parser.add_argument("--table", action="store_true", help="print the README subject table and exit")
    args = parser.parse_args(argv)
    root: Path = args.root
    if args.table:
        sys.stdout.write(subject_table_markdown())
        return 0
    if args.check:
        problems = check_artefacts(root)
        for problem in problems:
            print(problem)
        if problems:
            print(f"contract artefacts are out of date; run `{REGENERATE_COMMAND}`")
        return 1 if problems else 0
    changed = write_artefacts(root)
    if write_readme_table(root):
        changed.append(root / "README.md")
    for path in changed:
        print(f"{'wrote' if path.exists() else 'removed'} {path.relative_to(root).as_posix()}")
    if not changed:
        print(f"{SCHEMA_DIR}/ is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
