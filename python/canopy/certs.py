"""ZPL CURVE certificates and Z85 keys, as ``canopy keygen``, flux-core,
czmq and pyzmq's ``zmq.auth`` write them::

    #   ZeroMQ CURVE **Secret** Certificate
    #   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

    metadata
        name = "node1"
    curve
        public-key = "<40 Z85 chars>"
        secret-key = "<40 Z85 chars>"

A public certificate has the same layout without ``secret-key``. As the
Rust tools do, a secret certificate that group or other can access is
refused, and its public key must match its secret key.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from .errors import InvalidArgument, require_zmq

_Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_INDEX = {c: i for i, c in enumerate(_Z85)}


def z85_decode(text: str) -> bytes:
    """Decode Z85 text (a multiple of 5 characters)."""
    if len(text) % 5:
        raise ValueError(f"Z85 text length {len(text)} is not a multiple of 5")
    out = bytearray()
    for i in range(0, len(text), 5):
        v = 0
        for c in text[i : i + 5]:
            d = _Z85_INDEX.get(c)
            if d is None:
                raise ValueError(f"'{c}' is not a Z85 character")
            v = v * 85 + d
        if v > 0xFFFFFFFF:
            raise ValueError(f"Z85 group '{text[i:i+5]}' is out of range")
        out += v.to_bytes(4, "big")
    return bytes(out)


def z85_encode(data: bytes) -> str:
    """Encode bytes (a multiple of 4) as Z85."""
    if len(data) % 4:
        raise ValueError(f"Z85 input length {len(data)} is not a multiple of 4")
    out = []
    for i in range(0, len(data), 4):
        v = int.from_bytes(data[i : i + 4], "big")
        chunk = []
        for _ in range(5):
            v, d = divmod(v, 85)
            chunk.append(_Z85[d])
        out.append("".join(reversed(chunk)))
    return "".join(out)


def check_key(text: str, what: str) -> str:
    """A 40-character Z85 CURVE key, validated; returned unchanged."""
    if len(text) != 40:
        raise InvalidArgument(f"{what}: expected 40 Z85 characters, found {len(text)}")
    try:
        z85_decode(text)
    except ValueError as e:
        raise InvalidArgument(f"{what}: {e}") from None
    return text


@dataclass
class Certificate:
    """A parsed certificate; ``secret_key`` only in secret certificates.

    Keys are 40-character Z85 strings.
    """

    public_key: str
    secret_key: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def name(self) -> str | None:
        return self.metadata.get("name")

    def __repr__(self) -> str:  # never print the secret
        secret = "<redacted>" if self.secret_key else None
        return f"Certificate(public_key={self.public_key!r}, secret_key={secret}, metadata={self.metadata!r}, path={self.path!r})"


def parse_certificate(text: str, path: str = "<certificate>") -> Certificate:
    """Parse certificate text (``path`` is for messages only)."""
    section = ""
    public = secret = None
    metadata: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        body = line.strip()
        if not line[0] in " \t":
            if "=" in body:
                raise InvalidArgument(
                    f"{path}:{lineno}: '{body}' must be indented under a section (metadata or curve)"
                )
            section = body
            continue
        key, sep, value = body.partition("=")
        if not sep:
            raise InvalidArgument(f"{path}:{lineno}: expected 'name = \"value\"', found '{body}'")
        key = key.strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = value[1:-1]
        if section == "curve":
            if key == "public-key":
                public = check_key(value, f"{path}:{lineno}: public-key")
            elif key == "secret-key":
                secret = check_key(value, f"{path}:{lineno}: secret-key")
            else:
                raise InvalidArgument(
                    f"{path}:{lineno}: unknown curve field '{key}'; expected public-key or secret-key"
                )
        elif section == "metadata":
            metadata[key] = value
        elif section == "":
            raise InvalidArgument(f"{path}:{lineno}: field outside any section")
        else:
            raise InvalidArgument(f"{path}:{lineno}: unknown section '{section}'; expected metadata or curve")
    if public is None:
        raise InvalidArgument(f"{path}: no curve public-key; is this a ZeroMQ CURVE certificate?")
    if secret is not None:
        require_zmq()  # deriving the public key needs libzmq (with CURVE)
        import zmq

        derived = zmq.curve_public(secret.encode()).decode()
        if derived != public:
            raise InvalidArgument(
                f"{path}: public-key does not match secret-key; regenerate the certificate with canopy keygen"
            )
    return Certificate(public, secret, metadata, path)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"cannot read certificate {path}: {e}; check the path and its permissions") from None


def load_secret_certificate(path: str | os.PathLike[str]) -> Certificate:
    """Load a secret certificate, refusing one that group or other can access."""
    p = os.fspath(path)
    try:
        mode = stat.S_IMODE(os.stat(p).st_mode)
    except OSError as e:
        raise InvalidArgument(f"cannot read certificate {p}: {e.strerror}; check the path and its permissions") from None
    if mode & 0o077:
        raise InvalidArgument(
            f"refusing secret certificate {p}: group or other can read it (mode {mode:o}); run chmod 600 {p}"
        )
    cert = parse_certificate(_read(p), p)
    if cert.secret_key is None:
        raise InvalidArgument(f"{p}: no curve secret-key; this is a public certificate, pass the secret one")
    return cert


def load_public_certificate(path: str | os.PathLike[str]) -> Certificate:
    """Load a public (or secret) certificate for its public key."""
    p = os.fspath(path)
    return parse_certificate(_read(p), p)


def server_key(value: str) -> str:
    """``CANOPY_SERVER_KEY``: 40 Z85 characters, or a certificate file."""
    if len(value) == 40 and not os.path.exists(value):
        return check_key(value, "CANOPY_SERVER_KEY")
    return load_public_certificate(value).public_key
