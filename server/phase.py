"""The federation's one round phase, as a pure state machine.

Contract: :class:`PhaseMachine` is the single owner of where the federation stands and of
the round it is running:

* ``closed`` -- between rounds (the start state, and after each round attempt);
* ``waiting`` -- for enough eligible devices, with a reason (also the pause before a
  retried round);
* ``starting`` -- a round is open and its devices are being started;
* ``training`` -- the open round waits for reports;
* ``aggregating`` -- the round is closed to submissions; the new version is being built;
* ``finished`` -- every configured round is complete (terminal).

Only the moves in :data:`TRANSITIONS` are made; any other raises :class:`PhaseError` (a
bug in the caller, never a device's fault) and changes nothing. :meth:`PhaseMachine.aggregate`
closes the round to submissions in the same step, so "the round is closed" and "the phase
is aggregating" can never disagree. :meth:`PhaseMachine.current` is the ``currentRound``
view of the status API. No I/O, no clock: callers pass the times.
"""

from __future__ import annotations

from typing import Literal, get_args

from server.rounds import Round
from server.status import CurrentRound, FederationPhase as Phase, current_from_round

PHASES: tuple[Phase, ...] = get_args(Phase)

#: phase -> the phases it may move to.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    "closed": frozenset({"waiting", "starting", "finished"}),
    "waiting": frozenset({"waiting", "starting"}),
    "starting": frozenset({"training"}),
    "training": frozenset({"aggregating"}),
    "aggregating": frozenset({"closed"}),
    "finished": frozenset(),
}


class PhaseError(RuntimeError):
    """A move the phase table does not allow (a bug in the caller)."""


class PhaseMachine:
    """The current phase, the round number it concerns and the open (or last) round."""

    def __init__(self) -> None:
        self._phase: Phase = "closed"
        self._number = 0
        self._reason: str | None = None
        self._round: Round | None = None
        self._previous: Round | None = None

    # --- queries --------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def round(self) -> Round | None:
        """The open round, or the last one once it closed (None before the first)."""
        return self._round

    @property
    def finished(self) -> bool:
        return self._phase == "finished"

    def round_for(self, round_id: str) -> Round | None:
        """The current round, or the previous one when ``round_id`` names it (so a resend
        whose ack was lost as that round closed is answered ``duplicate``, not
        ``round_closed``)."""
        previous = self._previous
        if previous is not None and previous.round_id == round_id:
            return previous
        return self._round

    def current(self, now_mono: float, now_unix: float) -> CurrentRound | None:
        """The status API's ``currentRound``: None between rounds and once finished."""
        phase, rnd = self._phase, self._round
        if phase == "waiting":
            return CurrentRound(number=self._number, phase="waiting", waiting_reason=self._reason)
        if phase in ("starting", "training", "aggregating") and rnd is not None:
            shown: Literal["starting", "training", "aggregating"] = (
                "starting" if phase == "starting" else
                "training" if phase == "training" else "aggregating"
            )  # fmt: skip
            return current_from_round(rnd, shown, now_mono, now_unix)
        return None

    # --- transitions ----------------------------------------------------------------

    def _move(self, to: Phase) -> None:
        if to not in TRANSITIONS[self._phase]:
            raise PhaseError(f"the federation cannot go from {self._phase} to {to}")
        self._phase = to

    def wait(self, number: int, reason: str) -> None:
        """Waiting before round ``number``, for ``reason``."""
        self._move("waiting")
        self._number, self._reason = number, reason

    def open(self, rnd: Round) -> None:
        """``rnd`` is the open round; the one before it is kept for late resends."""
        self._move("starting")
        if self._round is not None:
            self._previous = self._round
        self._round, self._number, self._reason = rnd, rnd.number, None

    def train(self) -> None:
        self._move("training")

    def aggregate(self) -> list[str]:
        """Close the round to submissions; the devices still working (to be cancelled)."""
        self._move("aggregating")
        assert self._round is not None  # "training" is only reached through open()
        return self._round.close()

    def close(self) -> None:
        """The round attempt is over (completed or abandoned)."""
        self._move("closed")

    def finish(self) -> None:
        """Every configured round is complete; nothing moves after this."""
        self._move("finished")
