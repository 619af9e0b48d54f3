"""The server's TLS context: HTTPS and WSS on the server's one port.

Contract: :func:`server_ssl_context` builds an ``ssl.SSLContext`` for a server socket from
a PEM certificate (chain) file and its PEM private key, with the library's secure
defaults (TLS 1.2 or newer). It raises :class:`TLSConfigError` (a ``ValueError``) with a
one-line message naming the file when a file is missing or unreadable, is not PEM, or
the key does not belong to the certificate. It reads the two files and nothing else;
it never logs key material.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TLSConfigError(ValueError):
    """The certificate or key cannot be used; the message is one line naming the file."""


def _readable(path: Path, what: str, flag: str) -> None:
    try:
        with path.open("rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise TLSConfigError(
            f"cannot read the {what} {flag} {path}: {exc.strerror or exc}"
        ) from None
    if b"-----BEGIN " not in head:
        raise TLSConfigError(f"the {what} {flag} {path} is not a PEM file")


def server_ssl_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """A server-side context serving ``certfile`` with ``keyfile``; raises TLSConfigError."""
    _readable(certfile, "certificate", "--certfile")
    _readable(keyfile, "private key", "--keyfile")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # An empty password: an encrypted key fails here instead of prompting on a terminal.
        ctx.load_cert_chain(certfile=str(certfile), keyfile=str(keyfile), password=b"")
    except ssl.SSLError as exc:
        reason = (exc.reason or "").upper()
        if "KEY_VALUES_MISMATCH" in reason or "mismatch" in str(exc).lower():
            raise TLSConfigError(
                f"the private key --keyfile {keyfile} does not belong to the certificate "
                f"--certfile {certfile}"
            ) from None
        raise TLSConfigError(
            f"cannot use --certfile {certfile} with --keyfile {keyfile}: "
            f"{exc.reason or exc} (expected a PEM certificate and its unencrypted PEM key)"
        ) from None
    except OSError as exc:
        raise TLSConfigError(
            f"cannot read --certfile {certfile} / --keyfile {keyfile}: {exc}"
        ) from None
    return ctx
