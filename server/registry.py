"""The device registry: who is connected, in what state, and who may be selected.

Contract: :class:`Registry` is pure bookkeeping owned by one asyncio loop (no I/O, no
clock: every method that needs the time takes ``now``, in seconds of any monotonic-enough
clock the caller uses consistently). One :class:`DeviceRecord` per device id; a device
that registers again (a reconnect) keeps its record and gets the new Socket.IO sid.
A device is *stale* when connected but not heard from for ``stale_after`` seconds
(3 missed heartbeats). A device is *eligible* for a round when it is connected,
registered, not paused, not stale, has not refused the global weights as unusable (see
``refused_weights``) and has the task installed -- or, for a packaged task
(``package_bytes`` given), advertises ``taskPackages`` with a package cache and a
``maxBlobBytes`` the package fits. Nothing here raises for
bad input; payloads arrive already validated by :mod:`client.protocol`.

A device that refused global version ``v`` as unusable (``refused_weights``: its tensors
do not fit the device's model) keeps ``refused_version = v`` -- across reconnects --
until it holds ``v`` or a newer version (``holds_version``, or ``weightsVersion`` in a
registration or heartbeat); until then it is not eligible.

The registry is the one writer of every :class:`DeviceRecord` field: the rest of the
server reads records and changes them only through the named transitions below
(``register``, ``heartbeat``, ``progress``, ``touch``, ``disconnect``,
``training_started``, ``refused_paused``, ``refused_round``, ``refused_weights``,
``training_failed``, ``update_accepted``, ``holds_version``, ``rounds_counted``,
``hardware_reported``). A transition for an unknown device id does nothing.
``hardware_reported`` is the registration update a heartbeat may carry (the GPU found
after registering): it replaces the registered hardware, idempotently.

Counting without walking the fleet: for each query it was asked (``tally(task,
package_bytes)``, built once in O(fleet)) the registry keeps each device's reason to be
ineligible and the counts by reason (:class:`server.eligibility.Tally`), updated by every
transition in O(1) per query. Staleness changes with time alone: connected devices are
kept ordered by last-seen time (:class:`server.eligibility.Freshness`) and ``sweep(now)``
moves those that went stale (and only those) out of the counts; any message brings a
device back. ``waiting_summary`` sweeps first, so its text is exactly what a recount of
every device at ``now`` says. ``eligible`` (the list) is O(fleet): once per round start,
never per event. A tally's listeners hear of every change of a count, never of a
transition that changed no device's reason (a plain heartbeat).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from client.protocol import (
    Capabilities,
    CpuBudget,
    DeviceRegister,
    DeviceState,
    DeviceType,
    HardwareInfo,
    Heartbeat,
    PauseReason,
    PlatformInfo,
    ResourceSnapshot,
    TrainingProgress,
)
from server.eligibility import Freshness, Tally


@dataclass
class DeviceRecord:
    """Everything the server knows about one device."""

    device_id: str
    name: str
    device_type: DeviceType
    platform: PlatformInfo
    hardware: HardwareInfo
    capabilities: Capabilities
    client_version: str
    resources: ResourceSnapshot
    state: DeviceState = "idle"
    pause_reason: PauseReason | None = None
    pause_detail: str | None = None
    refusal: str | None = None
    """Why the device last refused a round for a reason other than a pause (e.g. it has
    no data of its own for the task), until it accepts one again."""
    refused_version: int | None = None
    """The global version the device refused as unusable (``refused_weights``), until it
    holds that version or a newer one."""
    last_seen: float = 0.0
    rounds_completed: int = 0
    sid: str | None = None
    weights_version: int | None = None
    progress: TrainingProgress | None = None
    budget: CpuBudget | None = None
    """The CPU budget the device's last heartbeat reported (None: none reported)."""
    first_seen: float = field(default=0.0)
    clipped_round: int | None = None
    """The last round whose update from this device was clipped (``--clip-norm``)."""
    clipped_norm: float | None = None
    """That update's L2 distance from the round's base, before clipping."""

    @property
    def connected(self) -> bool:
        return self.sid is not None


class Registry:
    """Devices by id, and the sid -> device id map of live connections."""

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self._devices: dict[str, DeviceRecord] = {}
        self._by_sid: dict[str, str] = {}
        self._freshness = Freshness(stale_after)
        self._tallies: dict[tuple[str, int | None], Tally] = {}

    # --- the counts -----------------------------------------------------------------

    def _changed(self, record: DeviceRecord) -> None:
        """A field eligibility reads may have changed: update every tally (O(tallies))."""
        stale = self._freshness.is_stale(record.device_id)
        for tally in self._tallies.values():
            tally.set(record.device_id, _why(record, tally.task, tally.package_bytes, stale))

    def _seen(self, record: DeviceRecord, now: float) -> bool:
        """The device was heard from at ``now``; True when that ended its staleness."""
        record.last_seen = now
        return record.sid is not None and self._freshness.seen(record.device_id, now)

    def _gone(self, record: DeviceRecord) -> None:
        record.sid = None
        self._freshness.gone(record.device_id)

    def tally(self, task: str, package_bytes: int | None = None) -> Tally:
        """The incremental counts for ``task`` (a package of ``package_bytes``), kept from
        now on; the first call for a query counts every device once."""
        key = (task, package_bytes)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = Tally(task, package_bytes)
            is_stale = self._freshness.is_stale
            for record in self._devices.values():
                tally.set(
                    record.device_id,
                    _why(record, task, package_bytes, is_stale(record.device_id)),
                )
        return tally

    def sweep(self, now: float) -> None:
        """Move the devices whose staleness ``now`` changed in or out of the counts;
        O(devices that changed)."""
        went, back = self._freshness.sweep(now)
        for device_id in (*went, *back):
            self._changed(self._devices[device_id])

    def next_stale_at(self) -> float | None:
        """When the next connected device turns stale if not heard from (None: no fresh
        device; ``-inf``: sweep now)."""
        return self._freshness.next_expiry()

    # --- updates --------------------------------------------------------------------

    def register(
        self, reg: DeviceRegister, sid: str, now: float
    ) -> tuple[DeviceRecord, str | None]:
        """Record a registration; return the record and the replaced sid, if another."""
        old_device = self._by_sid.pop(sid, None)
        if old_device is not None and old_device != reg.device_id:
            # The same connection now speaks for another device: the first is gone.
            first = self._devices[old_device]
            self._gone(first)
            self._changed(first)
        record = self._devices.get(reg.device_id)
        replaced: str | None = None
        if record is None:
            record = DeviceRecord(
                device_id=reg.device_id,
                name=reg.name,
                device_type=reg.device_type,
                platform=reg.platform,
                hardware=reg.hardware,
                capabilities=reg.capabilities,
                client_version=reg.client_version,
                resources=reg.resources,
                first_seen=now,
            )
            self._devices[reg.device_id] = record
        else:
            if record.sid is not None and record.sid != sid:
                replaced = record.sid
                self._by_sid.pop(record.sid, None)
            record.name = reg.name
            record.device_type = reg.device_type
            record.platform = reg.platform
            record.hardware = reg.hardware
            record.capabilities = reg.capabilities
            record.client_version = reg.client_version
            record.resources = reg.resources
        record.sid = sid
        record.weights_version = reg.weights_version
        _clear_refused_weights(record)
        # Training/uploading work belongs to the old connection; only a pause carries over.
        record.state = "paused" if reg.state == "paused" else "idle"
        record.pause_reason = reg.pause_reason if reg.state == "paused" else None
        record.pause_detail = reg.pause_detail if reg.state == "paused" else None
        record.progress = None
        self._seen(record, now)
        self._by_sid[sid] = reg.device_id
        self._changed(record)
        return record, replaced

    def heartbeat(self, device_id: str, hb: Heartbeat, now: float) -> None:
        record = self._devices[device_id]
        record.state = hb.state
        record.pause_reason = hb.pause_reason if hb.state == "paused" else None
        record.pause_detail = hb.pause_detail if hb.state == "paused" else None
        record.resources = hb.resources
        record.budget = hb.budget
        if hb.weights_version is not None:
            record.weights_version = hb.weights_version
            _clear_refused_weights(record)
        self._seen(record, now)
        self._changed(record)

    def hardware_reported(self, device_id: str, hardware: HardwareInfo) -> bool:
        """A heartbeat updated the device's hardware; True when it changed."""
        record = self._devices.get(device_id)
        if record is None or record.hardware == hardware:
            return False
        record.hardware = hardware
        return True

    def progress(self, device_id: str, progress: TrainingProgress, now: float) -> None:
        record = self._devices[device_id]
        record.progress = progress
        record.state = progress.state
        paused = progress.state == "paused"
        record.pause_reason = progress.pause_reason if paused else None
        record.pause_detail = progress.pause_detail if paused else None
        self._seen(record, now)
        self._changed(record)

    def touch(self, device_id: str, now: float) -> None:
        """Any message from a device proves it is alive."""
        record = self._devices[device_id]
        if self._seen(record, now):
            self._changed(record)

    def training_started(self, device_id: str) -> None:
        """The device accepted ``training:start``: it trains, and is no longer paused."""
        record = self._devices.get(device_id)
        if record is not None:
            record.state = "training"
            record.pause_reason = None
            record.pause_detail = None
            record.refusal = None
            self._changed(record)

    def refused_paused(self, device_id: str, reason: PauseReason, detail: str | None) -> None:
        """The device refused a round because it is paused: not eligible again until a
        heartbeat says it is back."""
        record = self._devices.get(device_id)
        if record is not None:
            record.state = "paused"
            record.pause_reason = reason
            record.pause_detail = detail
            self._changed(record)

    def refused_round(self, device_id: str, reason: str, detail: str | None) -> None:
        """The device refused a round for a reason other than a pause: say why (the
        dashboard shows it) until it accepts one."""
        record = self._devices.get(device_id)
        if record is not None:
            record.refusal = f"{reason}: {detail}" if detail else reason

    def refused_weights(self, device_id: str, version: int, code: str, message: str) -> None:
        """The device refused global version ``version`` as unusable (its tensors do not
        fit the device's model): not eligible, and not sent that version again, until it
        holds that version or a newer one; the dashboard shows why."""
        record = self._devices.get(device_id)
        if record is not None:
            record.refused_version = version
            detail = message if len(message) <= 300 else message[:297] + "..."
            record.refusal = f"global weights v{version}: {code}: {detail}"
            self._changed(record)

    def training_failed(self, device_id: str) -> None:
        """The device reported a training error: it is idle again."""
        record = self._devices.get(device_id)
        if record is not None:
            record.state = "idle"
            self._changed(record)

    def update_accepted(self, device_id: str) -> None:
        """The device's update was counted: idle, no training progress to show."""
        record = self._devices.get(device_id)
        if record is not None:
            record.state = "idle"
            record.progress = None
            self._changed(record)

    def update_clipped(self, device_id: str, round_number: int, norm: float | None) -> None:
        """The device's update in round ``round_number`` was clipped (it was ``norm`` from
        the base): flagged until a later round clips it again."""
        record = self._devices.get(device_id)
        if record is not None:
            record.clipped_round = round_number
            record.clipped_norm = norm

    def holds_version(self, device_id: str, version: int) -> None:
        """The device acknowledged global version ``version``."""
        record = self._devices.get(device_id)
        if record is not None:
            record.weights_version = version
            _clear_refused_weights(record)
            self._changed(record)

    def rounds_counted(self, device_ids: list[str]) -> None:
        """Each device's update counted in a completed round."""
        for device_id in device_ids:
            record = self._devices.get(device_id)
            if record is not None:
                record.rounds_completed += 1

    def disconnect(self, sid: str) -> DeviceRecord | None:
        """Forget a connection; return its device when the sid was its current one."""
        device_id = self._by_sid.pop(sid, None)
        if device_id is None:
            return None
        record = self._devices[device_id]
        if record.sid == sid:
            self._gone(record)
            record.progress = None
            self._changed(record)
        return record

    # --- queries --------------------------------------------------------------------

    def by_sid(self, sid: str) -> DeviceRecord | None:
        device_id = self._by_sid.get(sid)
        return None if device_id is None else self._devices[device_id]

    def get(self, device_id: str) -> DeviceRecord | None:
        return self._devices.get(device_id)

    def name_of(self, device_id: str) -> str:
        """The device's name, or its id when unknown (for log lines)."""
        record = self._devices.get(device_id)
        return record.name if record is not None else device_id

    def all(self) -> list[DeviceRecord]:
        return list(self._devices.values())

    def connected(self) -> list[DeviceRecord]:
        return [d for d in self._devices.values() if d.connected]

    def is_stale(self, record: DeviceRecord, now: float) -> bool:
        return record.connected and now - record.last_seen > self.stale_after

    def ineligibility(
        self, record: DeviceRecord, task: str, now: float, package_bytes: int | None = None
    ) -> str | None:
        """Why a device cannot be selected (a short reason key), or None when it can.

        ``package_bytes``: the task is a package of that size (installed tasks: None).
        """
        return _why(record, task, package_bytes, self.is_stale(record, now))

    def eligible(
        self, task: str, now: float, package_bytes: int | None = None
    ) -> list[DeviceRecord]:
        return [
            d
            for d in self._devices.values()
            if self.ineligibility(d, task, now, package_bytes) is None
        ]

    def waiting_summary(
        self, task: str, now: float, needed: int, package_bytes: int | None = None
    ) -> str:
        """E.g. ``1 of 2 eligible devices (1 paused: battery_low, 1 stale)``: from the
        counts, swept to ``now`` first (O(distinct reasons) once the query is kept)."""
        self.sweep(now)
        return self.tally(task, package_bytes).summary(needed)


def _why(record: DeviceRecord, task: str, package_bytes: int | None, stale: bool) -> str | None:
    """The one eligibility rule: why ``record`` cannot be selected (None: it can)."""
    if record.sid is None:
        return "disconnected"
    if record.state == "paused":
        return f"paused: {record.pause_reason or 'unknown'}"
    if stale:
        return "stale"
    if record.refused_version is not None:
        return "refused the global weights"
    caps = record.capabilities
    if package_bytes is not None:
        if not caps.task_packages:
            return "cannot take task packages"
        if min(caps.package_cache_bytes, caps.max_blob_bytes) < package_bytes:
            return "package too large for it"
        return None
    if task not in caps.tasks:
        return f"missing task {task}"
    return None


def _clear_refused_weights(record: DeviceRecord) -> None:
    """A device holding its refused version (or a newer one) is no longer refusing it."""
    refused = record.refused_version
    held = record.weights_version
    if refused is not None and held is not None and held >= refused:
        record.refused_version = None
        record.refusal = None
