"""Signed decisions: what the policy gate signs (Ed25519), and how a runner checks a decision before acting on it.

A decision binds itself to the one request it answers: its id, tenant, run, tool call, the
request's own id and stream sequence, a hash of the tool's arguments, the effect, the policy
revision, the expiry (if any) and a hash of the policy input it was made on. The gate signs those
fields; a runner acts only on a decision whose signature checks out against a key it trusts *and*
whose fields name the very request it published. A decision forged by anyone who can write the
events stream, altered on the way, or borrowed from another request (same tool call id, other
arguments) is refused.

Keys are files: the gate's signing key (32 random bytes, base64, mode 600) and the list of public
keys runners trust (one base64 key per line; `#` starts a comment). Rotation: add the new public
key to the trusted list, restart the gates with the new signing key, and drop the old public key
once no decision signed with it is still awaited (see docs/security.md).
"""

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing

from warden.errors import WardenError
from warden.identity import read_seed
from warden.messages import DecisionMade, ModelCallRequested, ToolCallRequested

SIGNING_KEY_FILE = "decision-signing.key"
TRUSTED_KEYS_FILE = "decision-keys.pub"
# The audit projector's key for checkpoints of the audit chains (warden.audit_chain), and its public half.
CHECKPOINT_KEY_FILE = "checkpoint-signing.key"
CHECKPOINT_KEYS_FILE = "checkpoint-keys.pub"
# The operator's key for evidence bundles (warden.evidence): it signs a bundle's manifest, so the
# scope and file hashes are the exporter's. Its own key, so each key vouches for one thing: no
# service holds it, and a stolen checkpoint key cannot sign an export (nor this one a checkpoint).
EVIDENCE_KEY_FILE = "evidence-signing.key"
EVIDENCE_KEYS_FILE = "evidence-keys.pub"


class SigningKeyError(WardenError):
    """A signing key or trusted-keys file that is missing or malformed."""


def arguments_hash(arguments: Mapping[str, Any]) -> str:
    """A tool call's arguments, hashed in one canonical form (sorted keys, no spaces, UTF-8)."""
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def input_hash(document: Mapping[str, Any]) -> str:
    """A decision's policy input, hashed in the same canonical form as arguments (see `arguments_hash`)."""
    return arguments_hash(document)


def bound_arguments(request: ToolCallRequested | ModelCallRequested) -> dict[str, Any]:
    """What a decision on a call is made on, and its hash binds: a tool call's arguments, or a model
    call's model and output cap (a decision on one model cannot be spent on another)."""
    if isinstance(request, ToolCallRequested):
        return request.arguments
    return {"model": request.model, "max_output_tokens": request.max_output_tokens}


@dataclass(frozen=True)
class DecisionBinding:
    """Every field a decision's signature covers."""

    decision_id: str
    tenant: str
    run_id: str
    tool_call_id: str | None
    request_id: str
    request_seq: int
    arguments_hash: str | None
    effect: str
    policy_revision: str
    expires_at: str | None
    # The hash of the policy input it was made on; None on decisions signed before inputs were
    # kept, whose signed bytes leave the field out, so they still verify.
    input_hash: str | None = None

    @classmethod
    def of(cls, decision: DecisionMade, tenant: str, run_id: str) -> "DecisionBinding":
        expires = decision.expires_at.isoformat() if isinstance(decision.expires_at, datetime) else None
        return cls(
            decision_id=decision.decision_id,
            tenant=tenant,
            run_id=run_id,
            tool_call_id=decision.tool_call_id,
            request_id=decision.request_id,
            request_seq=decision.request_seq,
            arguments_hash=decision.arguments_hash,
            effect=decision.effect,
            policy_revision=decision.policy_revision,
            expires_at=expires,
            input_hash=decision.input_hash,
        )

    def signed_bytes(self) -> bytes:
        """What is signed: the fields as canonical JSON, prefixed so no other Warden signature can be
        mistaken for a decision's."""
        # vars(), not dataclasses.asdict(): the fields are flat, and asdict's deep copy cost more
        # than the JSON itself.
        fields = vars(self)
        if self.input_hash is None:
            fields = {name: value for name, value in fields.items() if name != "input_hash"}
        return b"warden-decision-v1\n" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _public_key_text(key: nacl.signing.VerifyKey) -> str:
    return base64.b64encode(bytes(key)).decode()


class Signer:
    """An Ed25519 signing key read from its file, signing bytes (base64 signatures)."""

    def __init__(self, key: nacl.signing.SigningKey) -> None:
        self.key = key
        self.public_key = _public_key_text(key.verify_key)

    @classmethod
    def from_file(cls, path: Path, what: str = "signing key") -> "Signer":
        try:
            return cls(nacl.signing.SigningKey(base64.b64decode(read_seed(path), validate=True)))
        except (binascii.Error, ValueError, nacl.exceptions.CryptoError) as exc:
            raise SigningKeyError(f"{path} does not hold a {what}: {exc}") from exc

    def sign_bytes(self, data: bytes) -> str:
        return base64.b64encode(self.key.sign(data).signature).decode()


class TrustedKeys:
    """Public keys signatures are trusted from, and the check of one signature."""

    def __init__(self, public_keys: Iterable[str], what: str = "signing") -> None:
        self.keys: dict[str, nacl.signing.VerifyKey] = {}
        for text in public_keys:
            try:
                self.keys[text] = nacl.signing.VerifyKey(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError, nacl.exceptions.CryptoError) as exc:
                raise SigningKeyError(f"not an Ed25519 public key: {text!r}") from exc
        if not self.keys:
            raise SigningKeyError(f"no trusted {what} key: every signature would be refused")

    @classmethod
    def read(cls, path: Path, what: str = "signing") -> list[str]:
        """The keys a trusted-keys file lists (one base64 key per line; `#` starts a comment)."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SigningKeyError(f"cannot read the trusted {what} keys {path}: {exc.strerror}") from exc
        return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]

    def refusal_of(self, data: bytes, signing_key: str | None, signature: str | None) -> str | None:
        """Why `signature` over `data` does not hold (None: it does)."""
        if not signature or not signing_key:
            return "unsigned"
        key = self.keys.get(signing_key)
        if key is None:
            return "signed with a key that is not trusted"
        try:
            key.verify(data, base64.b64decode(signature))
        except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError):
            return "bad signature (forged or altered)"
        return None


class DecisionSigner(Signer):
    """The gate's key: signs each decision's binding."""

    @classmethod
    def from_file(cls, path: Path, what: str = "decision signing key") -> "DecisionSigner":
        return cls(Signer.from_file(path, what).key)

    def sign(self, binding: DecisionBinding) -> str:
        return self.sign_bytes(binding.signed_bytes())


class DecisionVerifier(TrustedKeys):
    """The keys a runner trusts decisions from, and the check of one decision's signature."""

    def __init__(self, public_keys: Iterable[str]) -> None:
        super().__init__(public_keys, "decision")

    @classmethod
    def from_file(cls, path: Path) -> "DecisionVerifier":
        return cls(TrustedKeys.read(path, "decision"))

    def refusal(self, decision: DecisionMade, tenant: str, run_id: str) -> str | None:
        """Why this decision's signature does not hold (None: it does)."""
        if decision.signature is None or decision.signing_key is None:
            return "unsigned"
        if decision.signing_key not in self.keys:
            return "signed with a key this runner does not trust"
        return self.refusal_of(
            DecisionBinding.of(decision, tenant, run_id).signed_bytes(), decision.signing_key, decision.signature
        )


def create_key_pair(directory: Path, key_name: str, public_name: str, comment: str) -> bool:
    """Create a signing key and add its public half to the trusted-keys file beside it, unless the key
    exists; True if made."""
    key_file, trusted = directory / key_name, directory / public_name
    if key_file.exists():
        return False
    key = nacl.signing.SigningKey.generate()
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(base64.b64encode(bytes(key)) + b"\n")
    with trusted.open("a", encoding="utf-8") as file:
        file.write(f"{_public_key_text(key.verify_key)}  # {comment}\n")
    return True


def create_signing_key(directory: Path) -> bool:
    """Create the gate's signing key and the trusted-keys file beside it, unless one exists; True if made."""
    return create_key_pair(directory, SIGNING_KEY_FILE, TRUSTED_KEYS_FILE, "the policy gate's decision key")


def create_checkpoint_key(directory: Path) -> bool:
    """Create the audit projector's checkpoint key and its public-key file, unless it exists; True if made."""
    return create_key_pair(directory, CHECKPOINT_KEY_FILE, CHECKPOINT_KEYS_FILE, "the audit projector's checkpoint key")


def create_evidence_key(directory: Path) -> bool:
    """Create the operator's evidence (export) key and its public-key file, unless it exists; True if made."""
    return create_key_pair(directory, EVIDENCE_KEY_FILE, EVIDENCE_KEYS_FILE, "the operator's evidence (export) key")
