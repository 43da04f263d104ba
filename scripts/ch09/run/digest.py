"""SHA-256 digests of checkpoints: the one check that a file is the one that was published.

An SB3 checkpoint is a zip of cloudpickled objects, so loading one runs code. A file from elsewhere is
therefore checked against a known digest BEFORE anything in it is unpickled:

| function             | what it does                                                          |
|----------------------|-----------------------------------------------------------------------|
| ``sha256_file``      | hex digest of a file, read in chunks (checkpoints can be gigabytes)   |
| ``read_sha256sums``  | parse a ``SHA256SUMS`` file (``sha256sum`` format: ``<hex>  <name>``) |
| ``parse_sha256sums`` | the same for its text (a ``SHA256SUMS`` fetched over HTTP)            |
| ``write_sha256sums`` | write one for the files of a folder, in the same format               |
| ``verify_sha256``    | raise ``DigestMismatchError`` (one sentence) if a file's digest differs |

``sha256sum -c SHA256SUMS`` checks the same files from a shell.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

CHUNK_BYTES = 1 << 20
"""Bytes read per call while hashing: large files are never read whole."""

SHA256SUMS_NAME = "SHA256SUMS"
"""The conventional name of a digest list (as written by ``sha256sum``)."""

_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")


class DigestMismatchError(ValueError):
    """A file's SHA-256 is not the expected one; the message is one sentence that says what to do."""


def sha256_file(path: Path) -> str:
    """Lower-case hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def is_hex_digest(text: str) -> bool:
    """Whether ``text`` is a 64-character hexadecimal SHA-256 digest."""
    return bool(_HEX_DIGEST.match(text.strip()))


def read_sha256sums(path: Path) -> dict[str, str]:
    """``{file name: hex digest}`` from a ``SHA256SUMS`` file; a malformed line raises ``ValueError``."""
    return parse_sha256sums(Path(path).read_text(), str(path))


def parse_sha256sums(text: str, source: str) -> dict[str, str]:
    """``{file name: hex digest}`` from the text of a ``SHA256SUMS`` file (``source`` names it in errors)."""
    digests: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not is_hex_digest(parts[0]):
            raise ValueError(f"{source}:{number} is not a '<sha256>  <file name>' line; regenerate the file.")
        digests[parts[1].lstrip("*").strip()] = parts[0].lower()
    return digests


def write_sha256sums(folder: Path, names: Iterable[str]) -> Path:
    """Write ``folder/SHA256SUMS`` for the files ``names`` (relative to ``folder``); return its path."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in sorted(names)]
    target = folder / SHA256SUMS_NAME
    target.write_text("".join(lines))
    return target


def verify_sha256(path: Path, expected: str, label: str | None = None) -> str:
    """Return the digest of ``path`` if it equals ``expected``; otherwise raise ``DigestMismatchError``.

    ``label`` names the file in the message (default: its path), e.g. the URL a ``.part`` file came from.
    """
    if not is_hex_digest(expected):
        raise DigestMismatchError(
            f"{expected!r} is not a SHA-256 digest; pass the 64 hexadecimal characters from the release's SHA256SUMS."
        )
    actual = sha256_file(path)
    if actual != expected.strip().lower():
        raise DigestMismatchError(
            f"{label or path} has SHA-256 {actual[:16]}... but {expected.strip().lower()[:16]}... was expected, so it "
            "is not the published file (damaged or altered) and was not loaded; download it again from the release."
        )
    return actual
