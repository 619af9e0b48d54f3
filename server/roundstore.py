"""Persistence of the open round, so a server crash (even ``kill -9``) loses no update.

Contract: :class:`RoundStore` keeps, in the server's state directory, ``round.json``
(:class:`SavedRound`: round id, number, attempt, base version, wall-clock start and
deadline, required reports, and per selected device its partition index and, once it
reported, its sample count, metrics and update file) and ``round/`` (each accepted
update, as safetensors written by the codec; never a pickle). Every file is written
atomically (:func:`client.atomicfile.write_atomic`: temporary file, fsync, replace).

The server writes an update's file, then ``round.json`` naming it, before it
acknowledges the update; it clears both only after the round's new global version and
history are saved (:class:`server.store.Store` first, then :meth:`RoundStore.clear`), so
at any moment a crash either keeps the update here or has already folded it into a saved
version. :meth:`RoundStore.load` and :meth:`RoundStore.load_update` raise
:class:`server.store.StoreError` with one line when the files are unreadable; deciding
whether a saved round may go on is the server's job.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from client.atomicfile import write_atomic
from client.weights import Layout, StateDict, WeightsError, decode
from server.store import StoreError

ROUND_FILE = "round.json"
ROUND_DIR = "round"
ROUND_FORMAT = 1


class _Saved(BaseModel):
    # camelCase on disk, like history.json and the wire.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SavedSlot(_Saved):
    """One selected device of the open round, as persisted."""

    index: int = Field(ge=0)
    reported: bool = False
    num_samples: int = Field(default=0, ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    update_file: str | None = None


class SavedRound(_Saved):
    """The open round, as persisted in ``round.json``."""

    format: int = ROUND_FORMAT
    task: str
    round_id: str
    number: int = Field(ge=1)
    attempt: int = Field(ge=1)
    base_version: int = Field(ge=0)
    started_unix: float
    deadline_unix: float
    required: int = Field(ge=1)
    slots: dict[str, SavedSlot]


class RoundStore:
    """The open round's files in one server's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    @staticmethod
    def update_file_name(device_id: str) -> str:
        """The file name (in ``round/``) of a device's accepted update."""
        return hashlib.sha256(device_id.encode("utf-8")).hexdigest()[:32] + ".safetensors"

    def save_update(self, device_id: str, data: bytes) -> str:
        """Persist one accepted update (safetensors bytes); return its file name."""
        name = self.update_file_name(device_id)
        write_atomic(self.state_dir / ROUND_DIR / name, data)
        return name

    def save(self, saved: SavedRound) -> None:
        """Persist the open round (atomically replacing the previous ``round.json``)."""
        write_atomic(
            self.state_dir / ROUND_FILE,
            saved.model_dump_json(indent=1, by_alias=True).encode("utf-8"),
        )

    def load(self) -> SavedRound | None:
        """The open round a previous run left, or None; StoreError when unreadable."""
        path = self.state_dir / ROUND_FILE
        if not path.exists():
            return None
        try:
            saved = SavedRound.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None
        if saved.format != ROUND_FORMAT:
            raise StoreError(f"{path} has format {saved.format}, not {ROUND_FORMAT}")
        return saved

    def load_update(self, name: str, layout: Layout) -> StateDict:
        """One persisted update, checked against the model ``layout``."""
        path = self.state_dir / ROUND_DIR / Path(name).name
        try:
            return decode(path.read_bytes(), "safetensors", expected=layout)
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None
        except WeightsError as exc:
            raise StoreError(f"{path} does not fit the model ({exc.code}: {exc.message})") from None

    def clear(self) -> None:
        """Forget the open round: ``round.json`` first, then the updates (idempotent)."""
        (self.state_dir / ROUND_FILE).unlink(missing_ok=True)
        folder = self.state_dir / ROUND_DIR
        if folder.is_dir():
            for path in folder.iterdir():
                with contextlib.suppress(OSError):
                    path.unlink()
