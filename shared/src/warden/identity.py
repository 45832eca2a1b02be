"""Connecting as an identity: an NKey seed file, as `warden up` and `warden credentials` write them.

NATS authenticates a client by the NKey (an Ed25519 key pair) it signs the server's nonce with;
the seed never leaves the client. nats-py does the signing; this module only reads the seed and
names the inbox the identity's permissions allow (see `warden.permissions.inbox_prefix`).
"""

import base64
import stat
from pathlib import Path
from typing import Any

import nkeys

from warden.errors import WardenError
from warden.permissions import inbox_prefix

SEED_SUFFIX = ".nk"


class CredentialError(WardenError):
    """A seed file that is missing, unreadable, readable by others, or not an NKey seed."""


def read_seed(seed_file: Path) -> bytes:
    """The seed in `seed_file`, refused if anyone but its owner may read it (as ssh refuses a key)."""
    try:
        mode = seed_file.stat().st_mode
        seed = seed_file.read_bytes().strip()
    except OSError as exc:
        raise CredentialError(f"cannot read the NATS credential {seed_file}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialError(
            f"the NATS credential {seed_file} is readable by others (mode {stat.filemode(mode)}); "
            f"run: chmod 600 {seed_file}"
        )
    return seed


def public_key(seed: bytes) -> str:
    """The public key (`U...`) of a user seed (`SU...`)."""
    try:
        return str(nkeys.from_seed(seed).public_key.decode())
    except (nkeys.NkeysError, ValueError) as exc:
        raise CredentialError(f"not an NKey seed: {type(exc).__name__}") from exc


def connect_options(seed_file: Path | None) -> dict[str, Any]:
    """nats-py `connect` options that authenticate as the identity in `seed_file` (none: anonymous)."""
    if seed_file is None:
        return {}
    seed = read_seed(seed_file)
    return {"nkeys_seed_str": seed.decode(), "inbox_prefix": inbox_prefix(public_key(seed))}


def nkey_connect_fields(seed_file: Path, nonce: str) -> dict[str, str]:
    """The CONNECT fields that answer a server's nonce as nats-py does (public key and signature),
    for the rare client that speaks the NATS protocol itself (the replay's bare reader)."""
    key = nkeys.from_seed(read_seed(seed_file))
    return {"nkey": key.public_key.decode(), "sig": base64.b64encode(key.sign(nonce.encode())).decode()}
