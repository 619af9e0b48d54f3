"""In-memory implementations of the cluster's contracts (server/cluster/contracts.py), for
unit tests of the code above them (the coordinator, the workers' logic).

Each keeps the promises its Protocol states that the code under test relies on:
``MemoryBlobs`` verifies SHA-256 on put and get (BlobIntegrityError), ``MemoryDB`` records
an update once per (round, device) and refuses one unless the round is ``open``
or the device is not assigned (ClusterError), makes a recorded update's assignment
``reported`` (and keeps it so), never changes a completed or abandoned round, keeps one
partial per (round, worker), and completes the round when a version is published (as
server/cluster/db.py promises); ``MemoryPresence``
counts eligible devices on live workers. ``fail_next`` makes the next call of a named
method raise ClusterError (an engine hiccup). One event loop, no I/O but ``get_file``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from server.cluster.contracts import (
    Assignment,
    AssignmentState,
    BlobIntegrityError,
    ClusterError,
    DeviceSeen,
    EvalAsk,
    EvalAskState,
    PartialRow,
    RoundRow,
    RoundState,
    UpdateRow,
    VersionRow,
)


class _Failing:
    def __init__(self) -> None:
        self.failing: dict[str, int] = {}

    def fail_next(self, method: str, times: int = 1) -> None:
        self.failing[method] = self.failing.get(method, 0) + times

    def _maybe_fail(self, method: str) -> None:
        if self.failing.get(method, 0) > 0:
            self.failing[method] -= 1
            raise ClusterError(f"memory engine: {method} failed (injected)")


class MemoryBlobs(_Failing):
    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, bytes] = {}

    async def put_bytes(self, data: bytes, sha256: str) -> str:
        self._maybe_fail("put_bytes")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BlobIntegrityError("memory blobs: the bytes do not match their sha256")
        key = f"blob-{sha256}"
        self.data[key] = bytes(data)
        return key

    async def put_file(self, path: Path, sha256: str) -> str:
        return await self.put_bytes(path.read_bytes(), sha256)

    async def get_file(self, key: str, sha256: str, dest: Path) -> None:
        self._maybe_fail("get_file")
        data = self.data.get(key)
        if data is None:
            raise ClusterError(f"memory blobs: no blob {key}")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BlobIntegrityError(f"memory blobs: blob {key} does not match its sha256")
        dest.write_bytes(data)

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)


class MemoryPresence(_Failing):
    def __init__(self) -> None:
        super().__init__()
        #: device id -> (worker id, eligible)
        self.devices: dict[str, tuple[str, bool]] = {}
        self.live: set[str] = set()

    def connect(self, device_id: str, worker_id: str, eligible: bool = True) -> None:
        self.live.add(worker_id)
        self.devices[device_id] = (worker_id, eligible)

    def kill(self, worker_id: str) -> None:
        """The worker died: its liveness key and its devices' keys expire."""
        self.live.discard(worker_id)
        self.devices = {d: w for d, w in self.devices.items() if w[0] != worker_id}

    async def device_seen(self, seen: DeviceSeen) -> None:
        raise NotImplementedError  # the tests place devices with connect()

    async def device_gone(self, device_id: str) -> None:
        self.devices.pop(device_id, None)

    async def devices_changed(self, seen: Sequence[DeviceSeen], gone: Sequence[str]) -> None:
        raise NotImplementedError  # the tests place devices with connect()

    async def worker_alive(self) -> bool:
        return True

    async def live_workers(self) -> set[str]:
        self._maybe_fail("live_workers")
        return set(self.live)

    async def eligible_count(self) -> int:
        self._maybe_fail("eligible_count")
        return len(await self.eligible_devices())

    async def eligible_devices(self) -> list[tuple[str, str]]:
        return sorted((d, w) for d, (w, ok) in self.devices.items() if ok and w in self.live)

    async def worker_of(self, device_id: str) -> str | None:
        seen = self.devices.get(device_id)
        return seen[0] if seen is not None and seen[0] in self.live else None


class MemoryDB(_Failing):
    def __init__(self) -> None:
        super().__init__()
        self.versions: list[VersionRow] = []
        self.rounds: dict[str, RoundRow] = {}
        self.parts: dict[str, dict[str, Assignment]] = {}
        self.updates_of: dict[str, dict[str, UpdateRow]] = {}
        self.partials_of: dict[str, dict[str, PartialRow]] = {}
        self.events: list[str] = []
        self.finished: set[int] = set()
        self.asks: dict[tuple[int, str], EvalAsk] = {}

    async def latest_version(self) -> VersionRow | None:
        self._maybe_fail("latest_version")
        return self.versions[-1] if self.versions else None

    async def create_version_zero(self, row: VersionRow) -> VersionRow:
        if not self.versions:
            self.versions.append(row)
        return self.versions[0]

    async def open_round(self, row: RoundRow, parts: list[Assignment]) -> None:
        self._maybe_fail("open_round")
        if await self.current_round() is not None:
            raise ClusterError("memory db: a round is already open")
        self.rounds[row.round_id] = row
        self.parts[row.round_id] = {a.device_id: a for a in parts}
        self.updates_of[row.round_id] = {}
        self.partials_of[row.round_id] = {}
        self.events.append(f"round:{row.round_id}")

    async def current_round(self) -> RoundRow | None:
        self._maybe_fail("current_round")
        live = [r for r in self.rounds.values() if r.state in ("open", "closing")]
        return live[0] if live else None

    async def assignments(self, round_id: str) -> list[Assignment]:
        self._maybe_fail("assignments")
        return list(self.parts.get(round_id, {}).values())

    async def assignment_of(self, round_id: str, device_id: str) -> Assignment | None:
        return self.parts.get(round_id, {}).get(device_id)

    async def set_assignment(
        self, round_id: str, device_id: str, state: AssignmentState, detail: str | None = None
    ) -> None:
        part = self.parts[round_id][device_id]
        if part.state == "reported":
            return
        self.parts[round_id][device_id] = dataclasses.replace(part, state=state, detail=detail)

    async def record_update(self, row: UpdateRow) -> bool:
        self._maybe_fail("record_update")
        rnd = self.rounds.get(row.round_id)
        if rnd is not None and row.device_id in self.updates_of[row.round_id]:
            return False
        if rnd is None or rnd.state != "open":
            raise ClusterError(f"memory db: round {row.round_id} is not open")
        if row.device_id not in self.parts[row.round_id]:
            raise ClusterError(f"memory db: {row.device_id} is not assigned")
        self.updates_of[row.round_id][row.device_id] = row
        await self.set_assignment(row.round_id, row.device_id, "reported")
        return True

    async def updates(self, round_id: str) -> list[UpdateRow]:
        self._maybe_fail("updates")
        return list(self.updates_of.get(round_id, {}).values())

    async def count_updates(self, round_id: str) -> int:
        self._maybe_fail("count_updates")
        return len(self.updates_of.get(round_id, {}))

    async def set_round_state(self, round_id: str, state: RoundState) -> None:
        self._maybe_fail("set_round_state")
        have = self.rounds[round_id].state
        if have == state:
            return
        if have in ("completed", "abandoned") or state == "open":
            raise ClusterError(f"memory db: round {round_id} is {have}: cannot become {state}")
        self.rounds[round_id] = dataclasses.replace(self.rounds[round_id], state=state)
        self.events.append(f"round:{round_id}:{state}")

    async def record_partial(self, row: PartialRow) -> None:
        self.partials_of[row.round_id].setdefault(row.worker_id, row)

    async def partials(self, round_id: str) -> list[PartialRow]:
        return list(self.partials_of.get(round_id, {}).values())

    async def publish_version(self, row: VersionRow) -> None:
        self._maybe_fail("publish_version")
        assert row.round_id is not None
        assert row.version == len(self.versions), "versions are published in order"
        self.versions.append(row)
        await self.set_round_state(row.round_id, "completed")
        self.events.append(f"version:{row.version}")

    async def recent_versions(self, limit: int) -> list[VersionRow]:
        self._maybe_fail("recent_versions")
        return list(reversed(self.versions))[:limit]

    async def record_evaluation(self, version: int, metrics: dict[str, float]) -> bool:
        self._maybe_fail("record_evaluation")
        if not 0 <= version < len(self.versions):
            return False
        row = self.versions[version]
        self.versions[version] = dataclasses.replace(row, metrics={**row.metrics, **metrics})
        return True

    async def mark_finished(self, version: int) -> None:
        self.finished.add(version)
        self.events.append(f"finished:{version}")

    async def finished_version(self) -> int | None:
        return max(self.finished, default=None)

    async def ask_evaluation(self, asks: Sequence[EvalAsk]) -> None:
        self._maybe_fail("ask_evaluation")
        for ask in asks:
            self.asks.setdefault((ask.version, ask.device_id), ask)
        if asks:
            self.events.append(f"fedeval:{asks[0].version}")

    async def evaluation_asks(self, version: int) -> list[EvalAsk]:
        self._maybe_fail("evaluation_asks")
        found = [a for (v, _), a in self.asks.items() if v == version]
        return sorted(found, key=lambda a: (a.index, a.device_id))

    async def set_ask_state(self, version: int, device_id: str, state: EvalAskState) -> None:
        self._maybe_fail("set_ask_state")
        ask = self.asks.get((version, device_id))
        before = ("asked",) if state == "accepted" else ("asked", "accepted")
        if ask is not None and ask.state in before:
            self.asks[(version, device_id)] = dataclasses.replace(ask, state=state)

    async def record_federated_result(
        self, version: int, device_id: str, loss: float, accuracy: float, num_samples: int
    ) -> bool:
        self._maybe_fail("record_federated_result")
        ask = self.asks.get((version, device_id))
        if ask is None or ask.state not in ("asked", "accepted"):
            return False
        self.asks[(version, device_id)] = dataclasses.replace(
            ask, state="reported", loss=loss, accuracy=accuracy, num_samples=num_samples
        )
        done = [a for (v, _), a in self.asks.items() if v == version and a.state == "reported"]
        total = sum(a.num_samples or 0 for a in done)
        if total:
            await self.record_evaluation(
                version,
                {
                    "federatedEvalLoss": sum((a.loss or 0) * (a.num_samples or 0) for a in done)
                    / total,
                    "federatedEvalAccuracy": sum(
                        (a.accuracy or 0) * (a.num_samples or 0) for a in done
                    )
                    / total,
                    "federatedEvalSamples": float(total),
                    "federatedEvalDevices": float(len(done)),
                },
            )
        return True

    async def notifications(self) -> AsyncIterator[str]:  # pragma: no cover - unused
        for event in list(self.events):
            yield event
