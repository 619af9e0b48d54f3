"""The one handler guard both peers register their Socket.IO handlers through.

Given an event's :class:`~client.protocol.events.EventSpec` and an async handler that
takes the parsed payload model, the guard promises, for every call python-socketio makes:

- exactly one payload argument, an object that fits the payload model, reaches the
  handler; anything else is refused with ``bad_request`` (or the code a model's
  ``check_wire`` names) before the handler runs;
- a :class:`~client.errors.FedtrayError` raised by an optional ``check`` (run before
  parsing, e.g. the server's "registered?") or by the handler becomes an ``ErrorAck``
  with its code for an acknowledged event, and a log line for an unacknowledged one;
- any other exception is logged with its traceback and answered ``internal_error``
  (acknowledged events) without leaking its text to the peer;
- the handler's return is checked against the spec: an acknowledged event's handler
  returns an instance of ``spec.ack`` (sent as its wire dict); an unacknowledged
  event's returns ``None``. Anything else is logged as a bug and, for an acknowledged
  event, answered ``internal_error``.

It never raises into python-socketio (task cancellation excepted) and does no I/O besides
logging.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from client.errors import FedtrayError
from client.protocol import error_ack, parse
from client.protocol.events import A, EventSpec, P

log = logging.getLogger(__name__)

Answer = dict[str, Any] | None
"""What a guarded handler gives python-socketio: the ack's wire dict, or None."""


async def answer(
    spec: EventSpec[P, A],
    args: tuple[Any, ...],
    handler: Callable[[P], Awaitable[A | None]],
    *,
    check: Callable[[], object] | None = None,
    who: str | Callable[[], str] = "the peer",
    logger: logging.Logger = log,
) -> Answer:
    """Run ``handler`` on the event's arguments as python-socketio passed them.

    ``check`` runs first (before parsing) and refuses by raising FedtrayError. ``who``
    names the sender in log lines (a callable: asked only when a line is written). Returns
    the answer for python-socketio: the ack's wire dict (or an ErrorAck's) for an
    acknowledged event, ``None`` for an unacknowledged one.
    """
    try:
        if check is not None:
            check()
        if len(args) != 1:
            raise FedtrayError(
                "bad_request", f"{spec.name} takes exactly one payload object, got {len(args)}"
            )
        result = await handler(parse(spec.payload, args[0]))
    except FedtrayError as exc:
        sender = who if isinstance(who, str) else who()
        if spec.acked:
            logger.info("%s from %s refused: %s: %s", spec.name, sender, exc.code, exc.message)
            return error_ack(exc.code, exc.message)
        logger.warning("%s from %s ignored: %s: %s", spec.name, sender, exc.code, exc.message)
        return None
    except Exception:
        logger.exception(
            "bug while handling %s from %s", spec.name, who if isinstance(who, str) else who()
        )
        if spec.acked:
            return error_ack("internal_error", f"could not handle {spec.name} (a bug here)")
        return None
    return _checked(spec, result, logger)


def _checked(spec: EventSpec[Any, Any], result: object, logger: logging.Logger) -> Answer:
    """The wire answer for a handler's ``result``, after checking it against the spec."""
    if spec.ack is None:
        if result is not None:
            logger.error(
                "bug: the handler of %s returned %.80r; it is not acked", spec.name, result
            )
        return None
    if isinstance(result, spec.ack):
        wire: dict[str, Any] = result.to_wire()
        return wire
    logger.error(
        "bug: the handler of %s returned %.80r, not a %s", spec.name, result, spec.ack.__name__
    )
    return error_ack("internal_error", f"could not answer {spec.name} (a bug here)")


def guard(
    spec: EventSpec[P, A],
    handler: Callable[[P], Awaitable[A | None]],
    *,
    who: str = "the server",
    logger: logging.Logger = log,
) -> Callable[..., Awaitable[Answer]]:
    """A python-socketio *client* handler (``async (*args)``) for ``spec`` around ``handler``.

    Register it with ``sio.on(spec.name, guard(spec, handler))``.
    """

    async def on_event(*args: Any) -> Answer:
        return await answer(spec, args, handler, who=who, logger=logger)

    on_event.__name__ = f"on_{spec.name.replace(':', '_')}"
    return on_event


def guard_sid(
    spec: EventSpec[P, A],
    handler: Callable[[str, P], Awaitable[A | None]],
    *,
    check: Callable[[str], object] | None = None,
    who: Callable[[str], str] = lambda sid: f"sid {sid}",
    logger: logging.Logger = log,
) -> Callable[..., Awaitable[Answer]]:
    """A python-socketio *server* handler (``async (sid, *args)``) for ``spec``.

    ``handler`` gets the connection's sid and the parsed payload; ``check(sid)`` runs
    before parsing and refuses by raising FedtrayError (e.g. ``not_registered``); ``who``
    names the sender of a sid in log lines.
    """

    async def on_event(sid: str, *args: Any) -> Answer:
        async def call(model: P) -> A | None:
            return await handler(sid, model)

        pre = None if check is None else (lambda: check(sid))
        return await answer(spec, args, call, check=pre, who=lambda: who(sid), logger=logger)

    on_event.__name__ = f"on_{spec.name.replace(':', '_')}"
    return on_event
