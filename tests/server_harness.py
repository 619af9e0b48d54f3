"""Test harness for the reference server: run it in-process or as a subprocess, and script
devices with raw python-socketio clients.

Stable API (other test modules rely on it):

* ``running_server(tmp_path, **config_overrides)`` -- context manager; starts a
  :class:`server.app.FedServer` on a free loopback port (bound with port 0, the real port
  read back: no race) in a background thread with its own event loop and yields a
  :class:`ServerHandle` (``.url``, ``.port``, ``.config``, ``.server``, ``.status()``,
  ``.wait_for(predicate, timeout)``, ``await .await_status(predicate, timeout)``,
  ``.stop()``). Defaults suit fast tests: the tiny ``synthetic`` task (:data:`TINY_PARAMS`),
  0.5 s heartbeats, 10 s round timeout, state in ``tmp_path / "server-state"``.
* ``server_process(tmp_path, *args)`` -- context manager; runs ``python -m server --port 0``
  as a subprocess (same test defaults unless ``args`` override them; XDG dirs under
  ``tmp_path``), parses the ``fedtray-server listening on http://HOST:PORT`` line and yields
  a :class:`ProcessHandle` (``.url``, ``.port``, ``.proc``, ``.output()``, ``.status()``,
  ``.wait_for()``, ``.terminate()``, ``.kill()``). It is killed on exit if still running.
* :class:`ScriptedDevice` -- an ``AsyncClient`` that registers, heartbeats, records
  ``training:start``/``training:cancel``/``device:registered``/``federation:finished``
  (with the global version it held when that came), receives and decodes
  ``weights:global`` (inline or chunked) and submits updates, all driven by the test.
  Its chunk limit defaults to the protocol's ``DEFAULT_CHUNK_BYTES``; it can advertise
  ``maxBlobBytes``/``maxInflightChunks`` (and enforces the former), records the size of
  every chunk it gets and the most chunks it held unacknowledged at once, and with
  ``hold_chunk_acks`` keeps the server's window full (see the field).
* :class:`LoopThread` -- an asyncio loop in a thread for driving devices from synchronous
  tests; ``close()`` cancels what is left on it before closing it.
* :class:`HolderDevice` -- a ScriptedDevice on its own LoopThread that accepts rounds and
  never reports, keeping a round open until ``close()``.

Nothing here sleeps blindly: every wait polls a condition with a timeout and raises
``TimeoutError`` with the last state seen. Durations are reference seconds (see
tests/waiting.py): every wait here is scaled by the suite's time scale, and so are the server
durations in :data:`SCALED_SETTINGS` / :data:`SCALED_FLAGS`, whether defaults or given by a
test (``srv.config`` holds the scaled values: derive expectations from it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import socketio

from client.protocol import (
    DEFAULT_CHUNK_BYTES,
    EV_BLOB_CHUNK,
    EV_BLOB_STATUS,
    EV_FEDERATION_FINISHED,
    EV_HEARTBEAT,
    EV_REGISTER,
    EV_REGISTERED,
    EV_TRAINING_CANCEL,
    EV_TRAINING_START,
    EV_WEIGHTS_GLOBAL,
    EV_WEIGHTS_SUBMIT,
    BlobChunk,
    BlobProgress,
    BlobStatus,
    WeightsGlobal,
    error_ack,
    parse,
)
from client.transfer import BlobStore, send_blob, weights_ref_for
from client.weights import StateDict, decode, encode
from server.app import FedServer
from server.config import ServerConfig
from tests.waiting import poll, poll_async, scaled, wait_until_async

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_PARAMS: dict[str, Any] = {"features": 8, "classes": 3, "hidden": 8, "samples": 300}
LISTENING_RE = re.compile(r"fedtray-server listening on (https?://[^\s:]+:(\d+))")

TEST_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "task": "synthetic",
    "model_params": TINY_PARAMS,
    "min_clients": 2,
    "clients_per_round": 10,
    "round_timeout": 10.0,
    "epochs": 1,
    "heartbeat_interval": 0.5,
    "retry_delay": 0.2,
    "ack_timeout": 30.0,
}
#: Server durations in reference seconds: running_server multiplies them by the time scale.
SCALED_SETTINGS = ("round_timeout", "heartbeat_interval", "retry_delay", "ack_timeout")
#: The same for ``python -m server`` flags (server_args scales the value after each).
SCALED_FLAGS = ("--round-timeout", "--heartbeat-interval")


def scale_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the durations in :data:`SCALED_SETTINGS` scaled for this run."""
    return {k: scaled(v) if k in SCALED_SETTINGS and v else v for k, v in settings.items()}


def scale_flags(args: list[str]) -> list[str]:
    """``args`` with the value after each flag in :data:`SCALED_FLAGS` scaled for this run."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg in SCALED_FLAGS:
            out[i + 1] = f"{scaled(float(out[i + 1])):g}"
    return out


def _get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=scaled(timeout)) as resp:
        data: dict[str, Any] = json.loads(resp.read().decode("utf-8"))
    return data


@dataclass
class ServerHandle:
    """A server running in a background thread (see :func:`running_server`)."""

    server: FedServer
    config: ServerConfig
    port: int
    loop: asyncio.AbstractEventLoop
    _stop: Callable[[], None]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        return _get_json(f"{self.url}/api/status")

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 10.0,
        what: str = "a status condition",
    ) -> dict[str, Any]:
        """Poll the status until ``predicate(status)``; return it (blocking)."""
        return poll(self.status, predicate, timeout, what)

    async def await_status(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 10.0,
        what: str = "a status condition",
    ) -> dict[str, Any]:
        """Like :meth:`wait_for` but without blocking the caller's event loop."""
        return await poll_async(self.status, predicate, timeout, what)

    def run(self, coro: Awaitable[Any], timeout: float = 10.0) -> Any:
        """Run a coroutine on the server's loop (for introspection in tests)."""

        async def _wrap() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(_wrap(), self.loop).result(scaled(timeout))

    def stop(self) -> None:
        self._stop()


@contextlib.contextmanager
def running_server(tmp_path: Path, **config_overrides: Any) -> Iterator[ServerHandle]:
    """Start a server in a thread on a free port; stop it on exit."""
    given = scale_settings({**TEST_DEFAULTS, **config_overrides})
    settings = {"state_dir": tmp_path / "server-state", **given}
    config = ServerConfig(**settings)
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        server = FedServer(config)
        stop_event = asyncio.Event()
        box.update(server=server, stop_event=stop_event, loop=asyncio.get_running_loop())
        try:
            box["port"] = await server.start()
        except BaseException as exc:
            box["error"] = exc
        ready.set()
        try:
            if "error" not in box:
                await stop_event.wait()
        finally:
            await server.stop()

    def run() -> None:
        # asyncio.run cancels and awaits what the libraries leave behind (engine.io's
        # ping timers) before it closes the loop: no task is destroyed while pending.
        try:
            asyncio.run(serve())
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="fedtray-test-server", daemon=True)
    thread.start()
    if not ready.wait(scaled(60)):
        raise TimeoutError(f"the test server did not start within {scaled(60):g} s")
    if "port" not in box:
        thread.join(scaled(10))
        raise box.get("error") or RuntimeError("the test server thread ended before starting")
    loop: asyncio.AbstractEventLoop = box["loop"]
    stopped = threading.Event()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        loop.call_soon_threadsafe(box["stop_event"].set)
        thread.join(scaled(30))
        if thread.is_alive():
            raise TimeoutError(f"the test server did not stop within {scaled(30):g} s")

    handle = ServerHandle(
        server=box["server"], config=config, port=box["port"], loop=loop, _stop=stop
    )
    try:
        yield handle
    finally:
        stop()


@dataclass
class ProcessHandle:
    """A ``python -m server`` subprocess (see :func:`server_process`)."""

    proc: subprocess.Popen[str]
    url: str
    port: int
    _lines: list[str]

    def output(self) -> str:
        return "".join(self._lines)

    def status(self) -> dict[str, Any]:
        return _get_json(f"{self.url}/api/status")

    def get_json(self, path: str) -> dict[str, Any]:
        """``GET path`` (``/api/cluster``, ...) as JSON."""
        return _get_json(f"{self.url}{path}")

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 10.0,
        what: str = "a status condition",
    ) -> dict[str, Any]:
        return poll(self.status, predicate, timeout, what)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; the exit status."""
        self.proc.terminate()
        return self.proc.wait(scaled(timeout))

    def kill(self) -> int:
        self.proc.kill()
        return self.proc.wait(scaled(30))

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(scaled(timeout))


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """The environment for subprocesses: XDG dirs under ``tmp_path``, repo on the path."""
    env = dict(os.environ)
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        env[var] = str(tmp_path / "xdg" / var.lower())
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ClientProcess:
    """A running ``python -m client`` and what it printed so far (:func:`client_process`)."""

    proc: subprocess.Popen[str]
    lines: list[str]

    def text(self) -> str:
        return "".join(self.lines)


@contextlib.contextmanager
def client_process(url: str, name: str, env: dict[str, str]) -> Iterator[ClientProcess]:
    """``python -m client --server url --name name`` with ``env``, its output (stdout and
    stderr) collected line by line by a reader thread; on exit terminated if still
    running, reaped, and its output read to the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "client", "--server", url, "--name", name],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    out = proc.stdout
    reader = threading.Thread(target=lambda: lines.extend(out), daemon=True)
    reader.start()
    try:
        yield ClientProcess(proc, lines)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(scaled(30))
        reader.join(scaled(10))


def server_args(tmp_path: Path, *args: str) -> list[str]:
    """Test-default flags for ``python -m server`` (later flags in ``args`` win; the
    durations in :data:`SCALED_FLAGS` are scaled)."""
    return scale_flags(
        [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--task",
            "synthetic",
            "--state-dir",
            str(tmp_path / "server-state"),
            "--heartbeat-interval",
            "0.5",
            "--round-timeout",
            "10",
            "--epochs",
            "1",
            *args,
        ]
    )


@contextlib.contextmanager
def server_process(
    tmp_path: Path, *args: str, start_timeout: float = 90.0, code: str | None = None
) -> Iterator[ProcessHandle]:
    """Run the server as a subprocess on a free port; kill it on exit if still running.

    The tiny synthetic model params cannot be passed by flag, so the subprocess trains the
    synthetic task's defaults (still small). ``code``, when given, is run with
    ``python -c`` instead of ``-m server`` (to patch a setting no flag reaches, then call
    ``server.cli.main(sys.argv[1:])``).
    """
    launcher = ["-c", code] if code is not None else ["-m", "server"]
    proc = subprocess.Popen(
        [sys.executable, *launcher, *server_args(tmp_path, *args)],
        cwd=REPO_ROOT,
        env=subprocess_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    found = threading.Event()
    assert proc.stdout is not None
    stdout = proc.stdout

    def drain() -> None:
        for line in stdout:
            lines.append(line)
            if LISTENING_RE.search(line):
                found.set()
        found.set()  # EOF: stop waiting

    threading.Thread(target=drain, daemon=True).start()
    try:
        found.wait(scaled(start_timeout))
        match = next((m for m in map(LISTENING_RE.search, list(lines)) if m), None)
        if match is None:
            proc.kill()
            proc.wait(scaled(30))
            raise RuntimeError("the server process did not start:\n" + "".join(lines))
        yield ProcessHandle(proc=proc, url=match.group(1), port=int(match.group(2)), _lines=lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(scaled(30))


# --------------------------------------------------------------------------- devices


def register_payload(
    device_id: str,
    name: str = "test-device",
    *,
    tasks: tuple[str, ...] = ("synthetic",),
    weights_version: int | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_blob_bytes: int | None = None,
    max_inflight_chunks: int | None = None,
    battery: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A valid ``device:register`` payload (camelCase, as on the wire); the optional
    transfer limits are advertised only when given."""
    optional = {"maxBlobBytes": max_blob_bytes, "maxInflightChunks": max_inflight_chunks}
    return {
        "protocol": 1,
        "deviceId": device_id,
        "name": name,
        "deviceType": "laptop",
        "platform": {"os": "Linux", "release": "6.1", "arch": "x86_64", "python": "3.11.9"},
        "hardware": {"cpuCores": 4, "ramTotalMb": 8192, "gpu": None, "batteryPresent": True},
        "resources": resources(battery=battery),
        "capabilities": {
            "torchVersion": None,
            "simulation": True,
            "tasks": list(tasks),
            "weightFormats": ["safetensors", "json"],
            "maxChunkBytes": max_chunk_bytes,
            **{key: value for key, value in optional.items() if value is not None},
        },
        "clientVersion": "test",
        "weightsVersion": weights_version,
    }


def resources(cpu: float = 12.5, battery: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "cpuPercent": cpu,
        "ramUsedPercent": 40.0,
        "ramAvailableMb": 4096,
        "battery": battery,
    }


@dataclass
class ScriptedDevice:
    """A raw Socket.IO device driven step by step by a test (no training logic)."""

    url: str
    name: str = "dev"
    device_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    tasks: tuple[str, ...] = ("synthetic",)
    token: str | None = None
    #: What ``training:start`` is answered with.
    start_reply: dict[str, Any] = field(default_factory=lambda: {"accepted": True})
    #: Chunk limit announced at registration (server -> device blobs use it).
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: Blob size limit announced at registration and enforced; None: not announced.
    max_blob_bytes: int | None = None
    #: In-flight chunk limit announced at registration; None: not announced.
    max_inflight_chunks: int | None = None
    #: Hold each blob:chunk ack until ``max_inflight_chunks`` chunks wait unacknowledged
    #: (or the blob's last chunk came), then, after a heartbeat round trip, release the
    #: oldest: a sender that keeps to the window has it full at every step, and one that
    #: does not exceeds it.
    hold_chunk_acks: bool = False
    #: The byte size of every blob:chunk received.
    chunk_sizes: list[int] = field(default_factory=list)
    #: The most blob:chunk messages received and not yet answered at one time.
    most_chunks_unacked: int = 0
    starts: list[dict[str, Any]] = field(default_factory=list)
    cancels: list[dict[str, Any]] = field(default_factory=list)
    registered_events: list[dict[str, Any]] = field(default_factory=list)
    connect_errors: list[Any] = field(default_factory=list)
    weights: dict[int, StateDict] = field(default_factory=dict)
    globals_meta: list[dict[str, Any]] = field(default_factory=list)
    #: ``federation:finished`` payloads, each with ``heldVersion``: the newest version held.
    finished: list[dict[str, Any]] = field(default_factory=list)
    sio: socketio.AsyncClient = field(init=False)
    _blobs: BlobStore = field(init=False)
    _unacked: int = field(init=False, default=0)
    _held: list[asyncio.Future[None]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._blobs = BlobStore(
            max_chunk_bytes=self.max_chunk_bytes, max_blob_bytes=self.max_blob_bytes or 1 << 30
        )
        self._new_client()

    def _new_client(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.sio.on(EV_REGISTERED, self._on_registered)
        self.sio.on("connect_error", self._on_connect_error)
        self.sio.on(EV_TRAINING_START, self._on_start)
        self.sio.on(EV_TRAINING_CANCEL, self._on_cancel)
        self.sio.on(EV_WEIGHTS_GLOBAL, self._on_global)
        self.sio.on(EV_BLOB_CHUNK, self._on_chunk)
        self.sio.on(EV_BLOB_STATUS, self._on_blob_status)
        self.sio.on(EV_FEDERATION_FINISHED, self._on_finished)

    async def _on_registered(self, payload: dict[str, Any]) -> None:
        self.registered_events.append(payload)

    async def _on_connect_error(self, data: Any = None) -> None:
        self.connect_errors.append(data)

    async def _on_start(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.starts.append(payload)
        base = payload.get("baseWeights")
        if base is not None:  # a small global inline: taken as a weights:global first
            taken = await self._on_global(base)
            if taken.get("ok") is False:
                return taken
        return dict(self.start_reply)

    async def _on_cancel(self, payload: dict[str, Any]) -> None:
        self.cancels.append(payload)

    async def _on_finished(self, payload: dict[str, Any]) -> None:
        self.finished.append({**payload, "heldVersion": max(self.weights, default=None)})

    async def _on_chunk(self, payload: Any) -> dict[str, Any]:
        self._unacked += 1
        self.most_chunks_unacked = max(self.most_chunks_unacked, self._unacked)
        try:
            # Accepted on arrival, in order; only the answer may be held back.
            ack = self._accept_chunk(payload)
            if self.hold_chunk_acks and isinstance(ack, BlobProgress):
                await self._hold(last=ack.complete)
            return ack.to_wire() if isinstance(ack, BlobProgress) else ack
        finally:
            self._unacked -= 1  # before the answer leaves: the sender may then send more

    def _accept_chunk(self, payload: Any) -> BlobProgress | dict[str, Any]:
        try:
            chunk = parse(BlobChunk, payload)
            self.chunk_sizes.append(len(chunk.data))
            return self._blobs.accept_chunk("server", chunk, time.monotonic())
        except Exception as exc:
            return error_ack("bad_request", str(exc))

    async def _hold(self, *, last: bool) -> None:
        """Wait until this chunk's ack may go (see :attr:`hold_chunk_acks`)."""
        mine = asyncio.get_running_loop().create_future()
        self._held.append(mine)
        window = self.max_inflight_chunks or 1
        if not last and len(self._held) >= window:
            # A round trip through the server first: one connection keeps the order of
            # messages, so every chunk it sent before answering has arrived by then, and
            # a sender over the window shows in most_chunks_unacked.
            await self.heartbeat()
        while self._held and (last or len(self._held) >= window):
            self._held.pop(0).set_result(None)
        await mine

    async def _on_blob_status(self, payload: Any) -> dict[str, Any]:
        query = parse(BlobStatus, payload)
        return self._blobs.status("server", query.blob_id, time.monotonic()).to_wire()

    async def _on_global(self, payload: Any) -> dict[str, Any]:
        msg = parse(WeightsGlobal, payload)
        data = self._blobs.take("server", msg.weights)
        self.weights[msg.version] = decode(data, msg.weights.format)
        self.globals_meta.append(
            {
                "version": msg.version,
                "roundId": msg.round_id,
                "metrics": dict(msg.metrics),
                "inline": msg.weights.data is not None,
            }
        )
        return {"ok": True}

    # --- driving --------------------------------------------------------------------

    async def connect(self, *, auth: dict[str, Any] | None = None) -> None:
        given = auth if auth is not None else ({"token": self.token} if self.token else None)
        await self.sio.connect(
            self.url, auth=given, transports=["websocket"], wait_timeout=round(scaled(10))
        )
        _LIVE.add(self)

    async def register(
        self, weights_version: int | None = None, **overrides: Any
    ) -> dict[str, Any]:
        payload = register_payload(
            self.device_id,
            self.name,
            tasks=self.tasks,
            weights_version=weights_version,
            max_chunk_bytes=self.max_chunk_bytes,
            max_blob_bytes=self.max_blob_bytes,
            max_inflight_chunks=self.max_inflight_chunks,
        )
        payload.update(overrides)
        ack: dict[str, Any] = await self.call(EV_REGISTER, payload)
        return ack

    async def join(self, weights_version: int | None = None) -> dict[str, Any]:
        await self.connect()
        return await self.register(weights_version)

    async def heartbeat(self, state: str = "idle", **extra: Any) -> dict[str, Any]:
        payload = {"state": state, "resources": resources(), **extra}
        ack: dict[str, Any] = await self.call(EV_HEARTBEAT, payload)
        return ack

    async def call(self, event: str, *payload: Any, timeout: float = 10.0) -> Any:
        data: Any = payload[0] if len(payload) == 1 else (tuple(payload) if payload else None)
        return await self.sio.call(event, data, timeout=scaled(timeout))

    async def submit(
        self,
        round_id: str,
        base_version: int,
        state: StateDict,
        *,
        num_samples: int,
        metrics: dict[str, float] | None = None,
        inline_limit: int = DEFAULT_CHUNK_BYTES,
        fmt: str = "safetensors",
    ) -> dict[str, Any]:
        """Encode ``state`` and submit it (sending a blob first when over ``inline_limit``)."""
        data = encode(state, fmt)  # type: ignore[arg-type]
        ref = weights_ref_for(data, fmt, inline_limit=inline_limit)  # type: ignore[arg-type]
        if ref.blob_id is not None:
            await send_blob(
                self.call,
                data,
                blob_id=ref.blob_id,
                chunk_bytes=min(inline_limit, DEFAULT_CHUNK_BYTES),
            )
        payload = {
            "roundId": round_id,
            "baseVersion": base_version,
            "numSamples": num_samples,
            "metrics": metrics or {},
            "weights": ref.to_wire(),
        }
        ack: dict[str, Any] = await self.call(EV_WEIGHTS_SUBMIT, payload)
        return ack

    async def disconnect(self) -> None:
        _LIVE.discard(self)
        await self.sio.disconnect()
        self._new_client()

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    async def until(
        self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "a device condition"
    ) -> None:
        await wait_until_async(predicate, timeout, f"{self.name}: {what}")

    async def heartbeat_forever(
        self, state: str = "idle", period: float = 0.2, **extra: Any
    ) -> None:
        """Heartbeat until cancelled (run it as a task)."""
        while True:
            with contextlib.suppress(Exception):
                await self.heartbeat(state, **extra)
            await asyncio.sleep(period)


_LIVE: set[ScriptedDevice] = set()


class LoopThread:
    """An asyncio loop in its own thread, to drive async peers from synchronous tests.

    It is the one owner of its loop: :meth:`close` cancels and awaits every task still on
    it (library timers included) before it closes the loop, so none is destroyed pending.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the loop and return its result (blocking)."""
        return self.start(coro).result(scaled(timeout))

    def start(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop; its future (cancel it to stop the coroutine)."""

        async def wrap() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop)

    def close(self) -> None:
        if not self.thread.is_alive():
            return

        async def cancel_the_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.run(cancel_the_rest(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(scaled(10))
        self.loop.close()


class HolderDevice:
    """A scripted device that accepts rounds and never reports: it keeps a round open.

    It heartbeats "training" on its own :class:`LoopThread` until :meth:`close`.
    """

    def __init__(self, url: str) -> None:
        self.loop = LoopThread()
        self.device = ScriptedDevice(url, name="holder")
        self.loop.run(self.device.join(), 20)
        self.beats = self.loop.start(self.device.heartbeat_forever("training"))

    def close(self) -> None:
        if not self.loop.thread.is_alive():
            return
        self.beats.cancel()
        self.loop.run(self.device.disconnect(), 10)
        self.loop.close()


def run_devices(coro: Awaitable[Any]) -> Any:
    """``asyncio.run`` a device scenario, disconnecting every ScriptedDevice afterwards."""

    async def wrapper() -> Any:
        try:
            return await coro
        finally:
            live = list(_LIVE)
            _LIVE.clear()
            await asyncio.gather(*(d.sio.disconnect() for d in live), return_exceptions=True)

    return asyncio.run(wrapper())
