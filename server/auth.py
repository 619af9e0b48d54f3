"""Device authentication by shared tokens.

Contract: :class:`TokenChecker` says whether the ``auth`` object a Socket.IO client sent
on connect carries one of the configured tokens. Comparison uses
:func:`hmac.compare_digest` against every token (no early exit on the first match, so
timing does not reveal which token or prefix matched). With no tokens configured every
connection is accepted. Tokens are never logged, never put in a message and never shown
in ``repr``. :func:`read_tokens_file` is the only I/O here; it raises :class:`TokenFileError`
with a one-line message when the file cannot be read or holds no token.
"""

from __future__ import annotations

import hmac
from pathlib import Path

UNAUTHORIZED_MESSAGE = (
    "unauthorized: a valid token is required to connect to this server; "
    "set the server token in the fedtray settings"
)


class TokenFileError(ValueError):
    """The tokens file is missing, unreadable or empty."""


class TokenChecker:
    """Checks connection tokens; ``enabled`` is False when no token is configured."""

    def __init__(self, tokens: tuple[str, ...] | list[str]) -> None:
        self._tokens = tuple(t.encode("utf-8") for t in tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def __repr__(self) -> str:
        return f"TokenChecker({len(self._tokens)} tokens)"

    def check(self, auth: object) -> bool:
        """True when tokens are off, or ``auth`` is ``{"token": <a configured token>}``."""
        if not self._tokens:
            return True
        if not isinstance(auth, dict):
            return False
        token = auth.get("token")
        if not isinstance(token, str) or not token:
            return False
        given = token.encode("utf-8")
        matched = False
        for expected in self._tokens:
            # Compare against all tokens so the time taken does not depend on which matched.
            matched |= hmac.compare_digest(given, expected)
        return matched


def parse_tokens(text: str) -> list[str]:
    """Tokens from a tokens file's text: one per line; blank lines and ``#`` comments skipped."""
    tokens = []
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped:
            tokens.append(stripped)
    return tokens


def read_tokens_file(path: Path) -> list[str]:
    """The tokens in ``path``; raises TokenFileError when unreadable or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read tokens file {path}: {exc}") from None
    tokens = parse_tokens(text)
    if not tokens:
        raise TokenFileError(f"tokens file {path} holds no token (one per line, # comments)")
    return tokens
