"""Connection failures in plain words: certificate refusals, unreachable servers, tokens.

Contract:

* ``https://``/``wss://`` servers are verified against the system's CAs, or against
  ``ca_file`` when set; nothing here ever turns verification off.
* :func:`cert_error` finds the certificate verification failure behind a connection
  error (engine.io hides it behind a bare "Connection error"); :func:`tls_words` puts
  it in plain words (not trusted / hostname mismatch naming the certificate's names /
  expired); :func:`connect_error_words` and :func:`is_auth_refusal` word the rest. All
  three are pure.
* :func:`certificate_names` is the one piece of I/O: it reads the names a trusted
  certificate claims (chain verified, hostname not), and gives ``[]`` on any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Final
from urllib.parse import urlsplit

__all__ = [
    "AUTH_FAILED_WORDS",
    "HOSTNAME_CODES",
    "cert_error",
    "certificate_names",
    "connect_error_words",
    "is_auth_refusal",
    "tls_words",
]

AUTH_FAILED_WORDS: Final = (
    "The server refused this device's token. Check the auth_token setting "
    "(`fedtray-client config set auth_token ...`)."
)

#: OpenSSL verify codes meaning "no trusted CA vouches for this certificate".
UNTRUSTED_CODES: Final = frozenset({2, 18, 19, 20, 21})
HOSTNAME_CODES: Final = frozenset({62, 64})  # hostname / IP address mismatch
EXPIRED_CODE: Final = 10


def is_auth_refusal(message: str) -> bool:
    """True when a connection refusal is the server turning the token down."""
    return message.strip().lower().startswith("unauthorized")


def connect_error_words(message: str, url: str) -> str:
    """A socketio/engineio connection error in plain words."""
    text = message.strip()
    # engine.io reports every transport failure (refused, DNS, TLS, timeout) this way.
    if text in ("", "Connection error", "Unexpected connection error"):
        return f"cannot reach the server at {url} (nothing answered there)"
    return text


def cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a connection error, if that was it.

    engine.io turns a TLS failure into a bare "Connection error"; the cause survives in
    the exception chain (aiohttp's ``ClientConnectorCertificateError``).
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # aiohttp's wrapper also subclasses the ssl error but lacks its verify_code.
        if isinstance(current, ssl.SSLCertVerificationError) and hasattr(current, "verify_code"):
            return current
        todo.extend([current.__cause__, current.__context__])
        inner = getattr(current, "certificate_error", None)
        if isinstance(inner, BaseException):
            todo.append(inner)
    return None


def tls_words(
    code: int | None, detail: str, host: str, ca_file: str | None, names: list[str]
) -> str:
    """A certificate refusal in plain words (``names``: the certificate's names)."""
    if code in HOSTNAME_CODES:
        if names:
            return (
                f"the certificate is for {', '.join(names)}, not {host} (hostname mismatch): "
                "connect with a name the certificate lists"
            )
        return f"the server's certificate is not valid for {host} (hostname mismatch)"
    if code in UNTRUSTED_CODES:
        if ca_file:
            return (
                f"the server's certificate is not trusted (self-signed or unknown CA): "
                f"the CA in ca_file {ca_file} did not sign it"
            )
        return (
            "the server's certificate is not trusted (self-signed or unknown CA): "
            "set ca_file to the CA that signed it "
            "(`fedtray-client config set ca_file /path/ca.pem`)"
        )
    if code == EXPIRED_CODE:
        return "the server's certificate has expired (or this computer's clock is wrong)"
    return f"the server's certificate was refused: {detail or 'verification failed'}"


async def certificate_names(url: str, ca_file: str | None) -> list[str]:
    """The DNS/IP names of the server's certificate, read without the hostname check.

    The chain is still verified, so this only reads what a trusted certificate claims;
    any failure gives ``[]`` (the caller then words the error without the names).
    """
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return []
    port = parts.port or 443
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        ctx.check_hostname = False
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), 5.0
        )
    except (OSError, ssl.SSLError, TimeoutError):
        return []
    try:
        cert = writer.get_extra_info("peercert") or {}
        return [str(value) for _, value in cert.get("subjectAltName", ())]
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
