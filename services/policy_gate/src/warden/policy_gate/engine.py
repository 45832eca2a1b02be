"""The gate's Rego engine: loads the policy pack into regorus and turns an input document into a decision."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import pydantic_core
import regorus

from warden.errors import PermanentError
from warden.policy_bundle import TEST_SUFFIX, PolicyBundle, bundle_file_names, revision_of
from warden.secret_arguments import POLICY_DATA_FILE, secret_argument_names_of, shipped_policy_dir

SHIPPED_POLICY_DIR = shipped_policy_dir()

DECISION_QUERY = "data.warden.authz.decision"
DECISION_PACKAGE = "warden.authz"
DATA_FILE = POLICY_DATA_FILE

Effect = Literal["allow", "deny", "require_approval"]
EFFECTS: frozenset[str] = frozenset({"allow", "deny", "require_approval"})

# regorus reports parse errors as "--> file:line:col" followed by the offending source line and
# "error: <message>"; evaluation errors use the same layout.
_LOCATION = re.compile(r"-->\s*(?P<file>.+?):(?P<line>\d+):(?P<column>\d+)\s*$", re.MULTILINE)
_ERROR_TEXT = re.compile(r"^error:\s*(?P<message>.*)", re.MULTILINE | re.DOTALL)
# With RUST_BACKTRACE (or RUST_LIB_BACKTRACE) set, even to an empty string, regorus appends a
# Rust stack trace to every error message; it says nothing about the policy, so it is cut off.
_BACKTRACE_MARKER = "Stack backtrace:"


@dataclass(frozen=True)
class PolicyResult:
    """What the policies decided about one input document, why, and how long it took."""

    effect: Effect
    reasons: tuple[str, ...]
    evaluation_ms: float


class PolicyLoadError(PermanentError):
    """A policy file does not parse, or the data file is not a valid JSON object."""

    def __init__(self, file: str, line: int | None, column: int | None, message: str) -> None:
        self.file = file
        self.line = line
        self.column = column
        self.message = message
        location = file
        if line is not None:
            location += f":{line}"
            if column is not None:
                location += f":{column}"
        super().__init__(f"{location}: {message}")


class PolicyEvaluationError(PermanentError):
    """The engine could not produce a well-formed decision; the gate records that as a deny."""


@dataclass(frozen=True)
class _RegorusFailure:
    """A regorus error message split into the parts a person needs."""

    file: str | None
    line: int | None
    column: int | None
    message: str

    def render(self) -> str:
        if self.file is None or self.line is None:
            return self.message
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


def parse_regorus_error(exc: BaseException) -> _RegorusFailure:
    text = str(exc).split(_BACKTRACE_MARKER, 1)[0].strip()
    location = _LOCATION.search(text)
    error = _ERROR_TEXT.search(text)
    message = " ".join(error.group("message").split()) if error else " ".join(text.split())
    if location is None:
        return _RegorusFailure(None, None, None, message or type(exc).__name__)
    return _RegorusFailure(location.group("file"), int(location.group("line")), int(location.group("column")), message)


def is_engine_failure(exc: BaseException) -> bool:
    # A Rust panic inside regorus surfaces as pyo3's PanicException, which derives from
    # BaseException; it is a failure of this one evaluation, not a reason to stop the process.
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


@dataclass(frozen=True)
class _Source:
    """One file of the pack as loaded: the name errors show, the name hashed, and its content."""

    display_path: str
    relative_path: str
    content: bytes


@dataclass(frozen=True)
class _Pack:
    """Everything read from a policy directory, parsed once and replayable into new engines."""

    policies: tuple[_Source, ...]
    data_source: _Source
    data: Mapping[str, Any]

    def revision(self) -> str:
        return revision_of({source.relative_path: source.content for source in (*self.policies, self.data_source)})

    def bundle(self) -> PolicyBundle:
        """The files the revision names, as text: what a `policy.activated` event records."""
        return PolicyBundle(
            {source.relative_path: source.content.decode() for source in (*self.policies, self.data_source)}
        )

    def build_engine(self) -> Any:
        engine = regorus.Engine()
        for source in self.policies:
            try:
                engine.add_policy(source.display_path, source.content.decode())
            except Exception as exc:
                failure = parse_regorus_error(exc)
                raise PolicyLoadError(source.display_path, failure.line, failure.column, failure.message) from exc
        engine.add_data(dict(self.data))
        return engine

    def build_vm(self) -> Any:
        """The pack compiled for regorus's VM (RVM): the same decisions several times faster."""
        modules = [(source.display_path, source.content.decode()) for source in self.policies]
        program = regorus.Program.compile_from_modules(self.data_source.content.decode(), modules, [DECISION_QUERY])
        vm = regorus.Rvm()
        vm.load_program(program)
        vm.set_data_json(self.data_source.content.decode())
        return vm


def _checked_text(display: str, relative: str, content: bytes) -> _Source:
    try:
        content.decode()
    except UnicodeDecodeError as exc:
        raise PolicyLoadError(display, None, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return _Source(display, relative, content)


def read_pack(directory: Path, *, include_tests: bool) -> _Pack:
    if not directory.is_dir():
        raise PolicyLoadError(str(directory), None, None, "not a directory")
    *rego_files, data_path = bundle_file_names(directory, include_tests=include_tests)
    if not rego_files:
        raise PolicyLoadError(str(directory), None, None, "no .rego policy files")
    if not data_path.is_file():
        raise PolicyLoadError(str(data_path), None, None, "missing: the policies need their data document")
    sources = [
        _checked_text(str(path), path.relative_to(directory).as_posix(), path.read_bytes())
        for path in (*rego_files, data_path)
    ]
    return _pack_of(sources)


def pack_of_bundle(bundle: PolicyBundle, origin: str) -> _Pack:
    """The pack a bundle's files make, as `read_pack` would read them from a directory; errors name
    each file as `<origin>/<name>` (origin: where the bundle came from, e.g. `revision sha256:..`)."""
    names = sorted(name for name in bundle.files if name.endswith(".rego") and not name.endswith(TEST_SUFFIX))
    if not names:
        raise PolicyLoadError(origin, None, None, "no .rego policy files")
    if DATA_FILE not in bundle.files:
        raise PolicyLoadError(f"{origin}/{DATA_FILE}", None, None, "missing: the policies need their data document")
    sources = [_Source(f"{origin}/{name}", name, bundle.files[name].encode()) for name in (*names, DATA_FILE)]
    return _pack_of(sources)


def _pack_of(sources: Sequence[_Source]) -> _Pack:
    """The last source is the data document; the others are policies."""
    *policies, data_source = sources
    try:
        data = json.loads(data_source.content)
    except json.JSONDecodeError as exc:
        raise PolicyLoadError(data_source.display_path, exc.lineno, exc.colno, f"invalid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise PolicyLoadError(
            data_source.display_path, None, None, "must hold a JSON object (it becomes the root of data)"
        )
    return _Pack(tuple(policies), data_source, data)


def _names(data: Mapping[str, Any], key: str) -> frozenset[str]:
    warden = data.get("warden")
    section = warden.get(key) if isinstance(warden, dict) else None
    return frozenset(section) if isinstance(section, dict) else frozenset()


# How long a call that needs approval waits for one when the data does not say (`approvals.expiry_seconds`).
DEFAULT_APPROVAL_EXPIRY_SECONDS = 1800.0


def _approval_expiry_seconds(data: Mapping[str, Any]) -> float:
    warden = data.get("warden")
    approvals = warden.get("approvals") if isinstance(warden, dict) else None
    value = approvals.get("expiry_seconds") if isinstance(approvals, dict) else None
    if value is None:
        return DEFAULT_APPROVAL_EXPIRY_SECONDS
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 30 * 86_400:
        raise PolicyLoadError(
            DATA_FILE, None, None, f"approvals.expiry_seconds must be 0 < seconds <= 30 days, not {value!r}"
        )
    return float(value)


class PolicyEngine:
    """The loaded policy pack, ready to decide requests in a fraction of a millisecond.

    Thread safety: safe to call from any thread, one call at a time per thread. regorus engines
    are bound to the thread that created them (using one from another thread panics), so each
    thread gets its own engine, built from the already-validated pack on its first evaluation.
    """

    def __init__(self, pack: _Pack, engine: Any) -> None:
        self._pack = pack
        self.revision: str = pack.revision()
        self._agents = _names(pack.data, "agents")
        self._tools = _names(pack.data, "tools")
        self.approval_expiry_seconds = _approval_expiry_seconds(pack.data)
        try:
            self.secret_arguments = secret_argument_names_of(pack.data)
        except ValueError as exc:
            raise PolicyLoadError(pack.data_source.display_path, None, None, str(exc)) from exc
        self._local = threading.local()
        self._local.engine = _warmed_up(engine)

    @classmethod
    def load(cls, directory: Path) -> PolicyEngine:
        """Load every `*.rego` (not `*_test.rego`) at the top of `directory` plus its `data.json`.

        Raises PolicyLoadError naming the file (and line and column where known) that is wrong.
        """
        return cls._of_pack(read_pack(directory, include_tests=False), str(directory))

    @classmethod
    def from_bundle(cls, bundle: PolicyBundle, origin: str) -> PolicyEngine:
        """Load a bundle given as files (a candidate sent by an operator); errors name `origin`."""
        return cls._of_pack(pack_of_bundle(bundle, origin), origin)

    @classmethod
    def _of_pack(cls, pack: _Pack, origin: str) -> PolicyEngine:
        engine = pack.build_engine()
        # Without this package the decision would be undefined for every input: refuse to start.
        if f"data.{DECISION_PACKAGE}" not in engine.get_packages():
            raise PolicyLoadError(origin, None, None, f"no policy file declares package {DECISION_PACKAGE}")
        return cls(pack, engine)

    @property
    def bundle(self) -> PolicyBundle:
        """The files this engine was loaded from (its revision's), as text."""
        return self._pack.bundle()

    def warm_up(self) -> None:
        """Build this thread's compiled VM now, not inside the first decision made on it."""
        self._vm()

    def _engine(self) -> Any:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            engine = self._local.engine = _warmed_up(self._pack.build_engine())
        return engine

    def _vm(self) -> Any:
        vm = getattr(self._local, "vm", None)
        if vm is None:
            try:
                vm = self._pack.build_vm()
            except BaseException as exc:
                if not is_engine_failure(exc):
                    raise
                vm = False  # this pack does not compile for the VM: the interpreter decides alone
            self._local.vm = vm
        return vm

    def evaluate(self, input_document: Mapping[str, Any]) -> PolicyResult:
        """Evaluate `data.warden.authz.decision` for one request (see `evaluate_interpreted`).

        The compiled VM answers first. Anything but a well-formed decision from it (undefined,
        which is how the VM reports a rule conflict or a builtin error, or a failure) is
        evaluated again by the interpreter, the reference: its answer, or its precise error, stands.
        So is a decision with "<undefined>" in a reason: the VM prints that for a value that is
        undefined where the interpreter (and OPA) leave the element out of the set.
        """
        vm = self._vm()
        if vm:
            started = time.perf_counter()
            try:
                # pydantic-core's JSON codec: a fifth of the json module's time on these documents.
                vm.set_input_json(pydantic_core.to_json(input_document).decode())
                effect, reasons = _check_decision(pydantic_core.from_json(vm.execute()))
                if any(_RVM_UNDEFINED in reason for reason in reasons):
                    raise PolicyEvaluationError("the compiled VM printed an undefined value")
            except (PolicyEvaluationError, ValueError):
                pass
            except BaseException as exc:
                if not is_engine_failure(exc):
                    raise
            else:
                return PolicyResult(effect, reasons, (time.perf_counter() - started) * 1000.0)
        return self.evaluate_interpreted(input_document)

    def evaluate_interpreted(self, input_document: Mapping[str, Any]) -> PolicyResult:
        """Evaluate `data.warden.authz.decision` for one request.

        The input document (see policies/README.md)::

            {"action": "run.start" | "tool.call",
             "tenant": "acme", "principal": "alice", "agent": "researcher",
             "tool": {"name": "web.fetch", "arguments": {"url": "https://example.com/x"}},  # null for run.start
             "run": {"id": "R1", "usage": {"steps": 2, "tool_calls": 1, "input_tokens": 0, "output_tokens": 0}}}

        Returns the effect ("allow", "deny" or "require_approval") with the policies' reasons.
        Raises PolicyEvaluationError when the engine fails or the decision is undefined or not
        of that shape; the gate records that as a deny (fail closed).
        """
        engine = self._engine()
        started = time.perf_counter()
        try:
            engine.set_input(dict(input_document))
            value = engine.eval_rule(DECISION_QUERY)
        except BaseException as exc:
            if not is_engine_failure(exc):
                raise
            failure = parse_regorus_error(exc)
            raise PolicyEvaluationError(f"evaluating {DECISION_QUERY} failed: {failure.render()}") from exc
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        effect, reasons = _check_decision(value)
        return PolicyResult(effect=effect, reasons=reasons, evaluation_ms=elapsed_ms)

    def knows_agent(self, agent: str) -> bool:
        """Whether the pack's data names this agent (`data.warden.agents`)."""
        return agent in self._agents

    def knows_tool(self, tool: str) -> bool:
        """Whether the pack's data names this tool (`data.warden.tools`)."""
        return tool in self._tools


# How the VM returns an undefined result (its JSON output is the string, not null).
_RVM_UNDEFINED = "<undefined>"


def _warmed_up(engine: Any) -> Any:
    # A fresh regorus engine spends milliseconds (about 14 ms here) on its first evaluation; pay
    # that while loading, not inside the first request's decision. The outcome does not matter:
    # a real evaluation reports its own errors.
    with contextlib.suppress(Exception):
        engine.set_input({})
        engine.eval_rule(DECISION_QUERY)
    return engine


def _check_decision(value: object) -> tuple[Effect, tuple[str, ...]]:
    if value is None or value == _RVM_UNDEFINED:
        raise PolicyEvaluationError(f"{DECISION_QUERY} is undefined for this input")
    if not isinstance(value, dict):
        raise PolicyEvaluationError(f"{DECISION_QUERY} must be an object, got {type(value).__name__}: {value!r:.200}")
    effect = value.get("effect")
    reasons = value.get("reasons")
    if effect not in EFFECTS:
        raise PolicyEvaluationError(f"{DECISION_QUERY}.effect must be one of {sorted(EFFECTS)}, got {effect!r:.200}")
    if not isinstance(reasons, list | tuple) or not all(isinstance(r, str) for r in reasons):
        raise PolicyEvaluationError(f"{DECISION_QUERY}.reasons must be a list of strings, got {reasons!r:.200}")
    return cast(Effect, effect), tuple(reasons)
