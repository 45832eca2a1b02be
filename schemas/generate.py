"""Generates the contract artefacts (JSON Schemas, AsyncAPI, README subject table) and checks them for drift.

A development tool, not part of the installed package: `make schemas` (or `python -m schemas.generate`
from the repository root) writes them, `--check` reports drift, and the test suite runs the same check.
"""

from __future__ import annotations

import argparse
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
from typing import Any, cast
from urllib.parse import quote, unquote

from faststream.nats import NatsBroker, NatsRouter
from faststream.specification import AsyncAPI
from nats.js import JetStreamContext
from pydantic import TypeAdapter

from warden.agent_runner.app import channels as agent_runner_channels
from warden.audit_projector.advisories import ADVISORIES_TITLE, AdvisoryRecorder, ConsumerAdvisory, advisories_router
from warden.audit_projector.app import SERVICE as PROJECTOR
from warden.audit_projector.app import channels as audit_projector_channels
from warden.channels import ServiceChannels, envelope_schema
from warden.messages import ENVELOPE_TYPES, MESSAGE_TYPES, Payload
from warden.policy_gate.app import channels as policy_gate_channels
from warden.scheduler.app import channels as scheduler_channels
from warden.settings import Settings
from warden.streams import StreamNames
from warden.subjects import CHANNELS, Subjects

JsonObject = dict[str, Any]

# The four services whose declared channels the AsyncAPI document describes.
SERVICE_CHANNELS = (policy_gate_channels, scheduler_channels, agent_runner_channels, audit_projector_channels)

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

_COMPONENT_SCHEMAS = "#/components/schemas/"


def _doc(model: type[Payload]) -> str:
    return inspect.cleandoc(model.__doc__ or "")


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


def _declared_channels(prefix: str) -> list[ServiceChannels]:
    """Each service's channels, as the service declares them when it is built (see warden.channels)."""
    return [channels(prefix) for channels in SERVICE_CHANNELS]


def _describe_received(document: JsonObject, payloads: dict[str, Any]) -> None:
    """Give each subscriber FastStream cannot describe the schema of what it receives (`payloads`,
    by AsyncAPI title: a type pydantic describes).

    FastStream reads a subscriber's payload from its handler's signature. The services' hot paths
    consume through warden.consumers, so those subscribers have no handler and FastStream leaves a
    title where the schema goes; the advisories handler takes the raw message, to judge its body
    itself, and FastStream writes an empty payload. The schemas are written as FastStream writes a
    publisher's: one model by reference, several as `anyOf` under the message's payload name.
    """
    schemas: JsonObject = document["components"]["schemas"]

    def add(name: str, schema: JsonObject) -> None:
        if schemas.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas are both named {name!r}; rename one model")

    for title, described in payloads.items():
        payload = f"{title}:Message:Payload"
        generated = TypeAdapter(described).json_schema(ref_template=_COMPONENT_SCHEMAS + "{model}")
        for name, definition in generated.pop("$defs", {}).items():
            add(name, definition)
        if "anyOf" in generated:
            schemas[payload] = {**generated, "title": payload}
            reference = _COMPONENT_SCHEMAS + quote(payload)
        else:
            add(generated["title"], generated)
            schemas.pop(payload, None)
            # As FastStream writes its own references: the name percent-encoded (`Envelope%5BRunDispatched%5D`).
            reference = _COMPONENT_SCHEMAS + quote(generated["title"])
        for message in document["channels"][title]["messages"].values():
            _resolve_local(document, message["$ref"])["payload"] = {"$ref": reference}
    if not _refers_to(document, "EmptyPayload"):  # FastStream's, for the advisories' raw message
        schemas.pop("EmptyPayload", None)


def _refers_to(document: JsonObject, schema: str) -> bool:
    return f'"{_COMPONENT_SCHEMAS}{quote(schema)}"' in json.dumps(document)


def _resolve_local(document: JsonObject, reference: str) -> JsonObject:
    node: Any = document
    for part in reference.removeprefix("#/").split("/"):
        node = node[unquote(part)]
    return cast(JsonObject, node)


def _advisories(prefix: str) -> NatsRouter:
    """The projector's advisories subscriber, which has a handler, built as the projector builds it.

    The projector includes it in its broker only once it is the active projector (see
    warden.audit_projector.app); its recorder needs no connection here, as nothing is consumed.
    """
    streams = StreamNames.for_prefix(prefix)

    def no_connection() -> JetStreamContext:
        raise RuntimeError("the AsyncAPI document is generated without a connection")

    recorder = AdvisoryRecorder(no_connection, Subjects(prefix), streams, source=PROJECTOR)
    return advisories_router(recorder, streams, inbox_prefix="_INBOX")


def asyncapi_document() -> JsonObject:
    """FastStream's AsyncAPI 3.0 document of what each service declares it receives and sends."""
    prefix = Subjects().prefix
    declared = _declared_channels(prefix)
    broker = NatsBroker(Settings.model_fields["nats_url"].default)
    for service in declared:
        broker.include_router(service.router)
    broker.include_router(_advisories(prefix))
    specification = AsyncAPI(
        broker,
        title="Warden",
        version=_package_version(),
        identifier="urn:warden",
        description="Event-sourced control plane for AI agents on NATS JetStream: what each of its four "
        "services receives and sends. Every message is a JSON envelope (in the spirit of CloudEvents "
        "1.0) whose `type` names the shape of its `data`; schemas/*.schema.json has one JSON Schema per "
        "type. Generated by FastStream from the services' declarations (warden.channels); do not edit.",
        schema_version=ASYNCAPI_VERSION,
    ).to_specification()
    document: JsonObject = json.loads(specification.to_json())
    payloads: dict[str, Any] = {ADVISORIES_TITLE: ConsumerAdvisory}
    for service in declared:
        payloads |= {title: envelope_schema(types) for title, types in service.received.items()}
    _describe_received(document, payloads)
    return document


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
