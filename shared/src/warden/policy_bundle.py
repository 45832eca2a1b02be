"""A policy bundle as files: which files of a directory the gate loads, and the revision that names them.

The gate, the client that sends a candidate bundle and the events that record one all use this
module, so a revision computed anywhere names the same files. It reads files only: it needs no
Rego engine (a client-only install can send a bundle).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from warden.errors import PermanentError
from warden.secret_arguments import POLICY_DATA_FILE

TEST_SUFFIX = "_test.rego"


class PolicyBundleError(PermanentError):
    """A directory that holds no loadable bundle, or a bundle that cannot be recorded or sent."""


def bundle_file_names(directory: Path, *, include_tests: bool = False) -> list[Path]:
    """The policy files the gate loads from `directory` (the top level only, sorted, so the order and
    so the revision are stable), then its data file; tests only when asked."""
    rego = sorted(p for p in directory.glob("*.rego") if include_tests or not p.name.endswith(TEST_SUFFIX))
    return [*rego, directory / POLICY_DATA_FILE]


def revision_of(files: Mapping[str, bytes]) -> str:
    """The revision of a bundle: `sha256:` and 16 hex digits of a hash over its files' names and bytes."""
    digest = hashlib.sha256()
    for name in sorted(files):
        # Length-prefixed, so no two different bundles can hash the same byte stream.
        encoded, content = name.encode(), files[name]
        digest.update(f"{len(encoded)}:".encode() + encoded + f"{len(content)}:".encode())
        digest.update(content)
    return "sha256:" + digest.hexdigest()[:16]


def revision_token(revision: str) -> str:
    """A revision as a subject token (`sha256:ab..` becomes `sha256-ab..`): the entity id of its events."""
    return revision.replace(":", "-")


@dataclass(frozen=True)
class PolicyBundle:
    """The files of one bundle (relative name to UTF-8 text): its policies, not their tests, and its data."""

    files: Mapping[str, str]

    @classmethod
    def read(cls, directory: Path) -> PolicyBundle:
        """The bundle the gate would load from `directory`; `PolicyBundleError` when it holds none."""
        if not directory.is_dir():
            raise PolicyBundleError(f"{directory}: not a directory")
        names = bundle_file_names(directory)
        if len(names) == 1:
            raise PolicyBundleError(f"{directory}: no .rego policy files")
        files = {}
        for path in names:
            try:
                files[path.name] = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise PolicyBundleError(f"{path}: missing: the policies need their data document") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise PolicyBundleError(f"{path}: cannot be read as UTF-8 text: {exc}") from exc
        return cls(files)

    @property
    def revision(self) -> str:
        return revision_of({name: text.encode() for name, text in self.files.items()})

    def write(self, directory: Path) -> None:
        """Write the files into `directory` (created if need be), e.g. to load or test them there."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            if Path(name).name != name:
                raise PolicyBundleError(f"a bundle's file is named by its bare name, not {name!r}")
            (directory / name).write_text(text, encoding="utf-8")
