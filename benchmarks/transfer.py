"""Weights transfer between the client and the reference server, against raw TCP ``sendall``.

Run ``python -m benchmarks.transfer`` (``--size-mb``, ``--repeats``; ``--help``). Everything
stays on loopback, in temporary directories, and stops by itself.

Setup: a :class:`server.app.FedServer` runs in a spawned child process (so the client's CPU
can be read from this process alone) with the ``synthetic`` task sized so that its global
weights are about ``--size-mb`` MB (``features=1024``, ``hidden`` scaled, 4 classes) and
``--min-clients`` above 1, so no round ever starts. Measured, side by side in one run:

* upload: a device's pending update file sent over a python-socketio ``AsyncClient``
  (websocket) to the server's real ``blob:chunk`` handler, with the limits the server
  announced at registration (its chunk size and in-flight window), two ways, alternating:
  as the uploader did up to issue 15 (the file read whole and hashed, then
  :func:`client.transfer.send_blob`) and as it does now
  (:func:`client.transfer.send_file_blob`: read and hashed a piece at a time while
  sending). Timed from the read to the ack of the last chunk (the server then holds the
  whole blob, hashed as it arrived). The server's CPU over each upload is read from
  ``/proc`` (Linux). Each repeat sends a new blob id.
* download: a real :class:`client.session.DistributedClient` (fresh data dir and device
  id each repeat) registers holding no weights; the server answers with ``weights:global``
  sent as a blob. Two times are taken from ``start()``: "wire" until the session's
  :class:`client.transfer.BlobStore` holds the last chunk (observed by wrapping the
  session's store instance, read-only), and "end to end" until the snapshot's
  ``weights_version`` is set, which adds the client's full decode validation and the
  atomic, fsynced write of the global weights to disk.
* raw TCP, each way: a plain socket, ``sendall`` of the same bytes by one thread,
  ``recv_into`` a preallocated buffer by another, both in this process.

Client CPU: ``time.process_time()`` of this process over the transfer for the client paths
(the server is another process, and this process does nothing else meanwhile); for raw
TCP, ``time.thread_time()`` of the client-side thread (sender for upload, receiver for
download). Reported as CPU seconds per GB moved. Figures are medians over ``--repeats``.
Target: client / raw TCP >= 0.2 each way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.transfer import REFERENCE_CHUNK_BYTES
from tests.server_harness import register_payload

MB = 1_000_000
GB = 1_000_000_000
RATIO_TARGET = 0.2
FEATURES = 1024
CLASSES = 4
SERVER_START_TIMEOUT_S = 180.0
TRANSFER_TIMEOUT_S = 300.0


def model_params(size_mb: float) -> dict[str, int]:
    """Synthetic-task parameters whose float32 weights total about ``size_mb`` MB."""
    # Parameters: hidden * (features + 1 + classes) + classes.
    hidden = max(1, round(size_mb * MB / 4 / (FEATURES + 1 + CLASSES)))
    return {"features": FEATURES, "classes": CLASSES, "hidden": hidden, "samples": 200}


# -- the server, in a child process ------------------------------------------------------


def _serve(conn: Connection, params: dict[str, int], state_dir: str) -> None:
    """Child process: run a FedServer until the parent closes the pipe."""
    import logging

    from server.app import FedServer
    from server.config import ServerConfig

    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        config = ServerConfig(
            host="127.0.0.1",
            port=0,
            task="synthetic",
            model_params=dict(params),
            min_clients=1000,
            clients_per_round=1000,
            state_dir=Path(state_dir),
            log_level="WARNING",
        )
        server = FedServer(config)
        port = await server.start()
        conn.send(port)
        try:
            # Wait for the parent's "stop" (or its death) without blocking the loop.
            await asyncio.to_thread(conn.recv)
        except EOFError:
            pass
        finally:
            await server.stop()

    asyncio.run(main())


class ServerChild:
    """A spawned FedServer process; a context manager that always ends it."""

    def __init__(self, params: dict[str, int], state_dir: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve, args=(child_conn, params, str(state_dir)), daemon=True
        )
        self.proc.start()
        child_conn.close()
        try:
            if not self._conn.poll(SERVER_START_TIMEOUT_S):
                raise RuntimeError("the benchmark server did not start in time")
            self.port: int = self._conn.recv()
        except (EOFError, RuntimeError) as exc:
            self.close()
            raise RuntimeError(f"the benchmark server failed to start: {exc}") from None
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send("stop")
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()

    def __enter__(self) -> ServerChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- raw TCP baseline --------------------------------------------------------------------


def raw_tcp(data: bytes, client_sends: bool) -> tuple[float, float]:
    """Move ``data`` over a loopback socket; (wall seconds, client-side thread CPU seconds).

    One thread ``sendall``s, the other ``recv_into``s a preallocated buffer. The client is
    the sender when ``client_sends`` (upload), else the receiver (download).
    """
    total = len(data)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    buffer = bytearray(total)
    cpu: dict[str, float] = {}
    done: dict[str, float] = {}

    def send(sock: socket.socket, role: str) -> None:
        t0 = time.thread_time()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        cpu[role] = time.thread_time() - t0

    def receive(sock: socket.socket, role: str) -> None:
        t0 = time.thread_time()
        view = memoryview(buffer)
        got = 0
        while got < total:
            n = sock.recv_into(view[got:])
            if n == 0:
                raise RuntimeError("raw TCP peer closed early")
            got += n
        done["at"] = time.perf_counter()
        cpu[role] = time.thread_time() - t0

    def server_side() -> None:
        conn, _ = listener.accept()
        with conn:
            if client_sends:
                receive(conn, "server")
            else:
                send(conn, "server")

    thread = threading.Thread(target=server_side, daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.perf_counter()
        if client_sends:
            send(sock, "client")
        else:
            receive(sock, "client")
        thread.join(TRANSFER_TIMEOUT_S)
    listener.close()
    if thread.is_alive() or "at" not in done:
        raise RuntimeError("the raw TCP transfer did not finish")
    if buffer != data:
        raise RuntimeError("raw TCP delivered different bytes")
    return done["at"] - start, cpu["client"]


# -- client upload (send_blob over python-socketio) --------------------------------------


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


UPLOAD_MODES = ("read", "stream")


async def _upload(
    url: str, path: Path, repeats: int, server_pid: int
) -> dict[str, list[tuple[float, float, float]]]:
    """Per mode, ``(wall s, client CPU s, server CPU s)`` of each upload of the file ``path``.

    ``read``: the uploader's path up to issue 15 -- the pending file read whole and hashed
    (``PendingStore.read``), then :func:`client.transfer.send_blob`; ``stream``: the
    uploader's path now, :func:`client.transfer.send_file_blob` (read and hashed a piece at
    a time while sending). The modes alternate; each upload is a new device and blob id.
    """
    import socketio

    from client.protocol import EV_REGISTER, DeviceRegistered, parse
    from client.transfer import send_blob, send_file_blob

    size = path.stat().st_size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def read_and_hash() -> bytes:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise RuntimeError("the file changed")
        return data

    async def once(mode: str, blob_id: str) -> tuple[float, float, float]:
        # A fresh device each time: the server keeps a complete blob open until it is
        # submitted, and a device may have only a few open.
        sio = socketio.AsyncClient(reconnection=False)
        await sio.connect(url, transports=["websocket"], wait_timeout=30)
        try:
            ack = await sio.call(
                EV_REGISTER,
                register_payload(str(uuid.uuid4()), "bench-upload", weights_version=0),
                timeout=60,
            )
            limits = parse(DeviceRegistered, ack).limits

            async def call(event: str, payload: dict[str, Any]) -> Any:
                return await sio.call(event, payload, timeout=60)

            server0 = _process_cpu(server_pid)
            cpu0, t0 = time.process_time(), time.perf_counter()
            if mode == "read":
                data = await asyncio.to_thread(read_and_hash)
                sending = send_blob(
                    call,
                    data,
                    blob_id=blob_id,
                    chunk_bytes=limits.max_chunk_bytes,
                    window=limits.max_inflight_chunks,
                    sha256=digest,
                )
            else:
                sending = send_file_blob(
                    call,
                    path,
                    size=size,
                    sha256=digest,
                    blob_id=blob_id,
                    chunk_bytes=limits.max_chunk_bytes,
                    window=limits.max_inflight_chunks,
                )
            await asyncio.wait_for(sending, TRANSFER_TIMEOUT_S)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            return wall, cpu, _process_cpu(server_pid) - server0
        finally:
            await sio.disconnect()

    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in UPLOAD_MODES}
    for i in range(repeats):
        for mode in UPLOAD_MODES:
            results[mode].append(await once(mode, f"bench-{mode}-{i}-{uuid.uuid4().hex[:8]}"))
    return results


# -- client download (a real DistributedClient) ------------------------------------------


def _download_once(url: str, work: Path, device_info: Any) -> tuple[float, float, float, int]:
    """(wire seconds, end-to-end seconds, client CPU seconds, bytes) of one registration."""
    from client.config import Settings
    from client.session import DistributedClient
    from client.transfer import BlobStore

    settings = Settings(server_url=url, device_id=str(uuid.uuid4()), device_name="bench-dl")
    client = DistributedClient(
        settings,
        no_reconnect=True,
        device_info=device_info,
        data_dir=work,
        settings_file=None,
    )
    store: BlobStore = client._session.blobs
    complete: dict[str, float] = {}
    inner: Callable[..., Any] = store.accept_chunk

    def watched(peer: str, chunk: Any, now: float) -> Any:
        progress = inner(peer, chunk, now)
        if progress.complete:
            complete["at"] = time.perf_counter()
            complete["bytes"] = progress.received
        return progress

    store.accept_chunk = watched  # type: ignore[method-assign]
    cpu0, t0 = time.process_time(), time.perf_counter()
    client.start()
    try:
        client.wait_for(lambda s: s.weights_version is not None, TRANSFER_TIMEOUT_S)
        t_end, cpu = time.perf_counter(), time.process_time() - cpu0
    finally:
        client.stop()
    if "at" not in complete:
        raise RuntimeError("the global weights did not arrive as a blob")
    return complete["at"] - t0, t_end - t0, cpu, int(complete["bytes"])


# -- the run -----------------------------------------------------------------------------


def run(size_mb: float, repeats: int) -> dict[str, float]:
    from client.device import detect_device
    from client.transfer_memory import keep_transfer_buffers

    keep_transfer_buffers()  # as a device's session does when it starts

    params = model_params(size_mb)
    device_info = detect_device()
    with tempfile.TemporaryDirectory(prefix="fedtray-bench-") as tmp:
        root = Path(tmp)
        with ServerChild(params, root / "server-state") as server:
            # The same bytes the server sends: its version-0 weights, as the codec wrote them.
            blob = _weights_file(root / "server-state").read_bytes()
            pending_file = root / "pending.update"
            pending_file.write_bytes(blob)
            up = asyncio.run(_upload(server.url, pending_file, repeats, server.proc.pid or 0))
            down = [
                _download_once(server.url, root / f"client-{i}", device_info)
                for i in range(repeats)
            ]
        raw_up = [raw_tcp(blob, client_sends=True) for _ in range(repeats)]
        raw_down = [raw_tcp(blob, client_sends=False) for _ in range(repeats)]
    n = len(blob)
    dl_bytes = down[0][3]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    return {
        "bytes": n,
        "dl_bytes": dl_bytes,
        "up_read_s": med([u[0] for u in up["read"]]),
        "up_read_cpu": med([u[1] for u in up["read"]]),
        "up_read_server_cpu": med([u[2] for u in up["read"]]),
        "up_s": med([u[0] for u in up["stream"]]),
        "up_cpu": med([u[1] for u in up["stream"]]),
        "up_server_cpu": med([u[2] for u in up["stream"]]),
        "down_wire_s": med([d[0] for d in down]),
        "down_e2e_s": med([d[1] for d in down]),
        "down_cpu": med([d[2] for d in down]),
        "raw_up_s": med([r[0] for r in raw_up]),
        "raw_up_cpu": med([r[1] for r in raw_up]),
        "raw_down_s": med([r[0] for r in raw_down]),
        "raw_down_cpu": med([r[1] for r in raw_down]),
    }


def _weights_file(state_dir: Path) -> Path:
    found = sorted(state_dir.rglob("*.safetensors"))
    if not found:
        raise RuntimeError(f"the server saved no weights under {state_dir}")
    return found[0]


def report(r: dict[str, float], repeats: int) -> str:
    n, dl = r["bytes"], r["dl_bytes"]

    def mbps(nbytes: float, seconds: float) -> float:
        return nbytes / seconds / MB

    rows = [
        ("raw TCP sendall, upload", n, r["raw_up_s"], r["raw_up_cpu"], None),
        ("upload, read+hash, send_blob", n, r["up_read_s"], r["up_read_cpu"], r["raw_up_s"]),
        ("upload, send_file_blob", n, r["up_s"], r["up_cpu"], r["raw_up_s"]),
        ("raw TCP sendall, download", dl, r["raw_down_s"], r["raw_down_cpu"], None),
        ("client download, wire", dl, r["down_wire_s"], None, r["raw_down_s"]),
        ("client download, end to end", dl, r["down_e2e_s"], r["down_cpu"], r["raw_down_s"]),
    ]
    lines = [
        f"weights transfer on loopback, {n / MB:.1f} MB, median of {repeats}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "",
        f"{'path':<32}{'seconds':>9}{'MB/s':>9}{'CPU s/GB':>10}{'x raw':>8}",
    ]
    for label, nbytes, seconds, cpu, raw in rows:
        cpu_txt = f"{cpu / nbytes * GB:>10.2f}" if cpu is not None else f"{'-':>10}"
        ratio_txt = f"{raw / seconds:>8.3f}" if raw is not None else f"{'1.000':>8}"
        lines.append(f"{label:<32}{seconds:>9.3f}{mbps(nbytes, seconds):>9.0f}{cpu_txt}{ratio_txt}")
    for label, key in (("read+hash, send_blob", "up_read"), ("send_file_blob", "up")):
        lines.append(
            f"server CPU s/GB received, {label:<21}{r[key + '_server_cpu'] / n * GB:>10.2f}"
        )
    up_ratio = r["raw_up_s"] / r["up_s"]
    down_ratio = r["raw_down_s"] / r["down_e2e_s"]
    lines += [
        "",
        _verdict("upload / raw TCP", up_ratio),
        _verdict("download / raw TCP", down_ratio),
    ]
    return "\n".join(lines)


def _verdict(label: str, ratio: float) -> str:
    status = "meets" if ratio >= RATIO_TARGET else "MISSES"
    return f"ratio {label:<20}{ratio:>8.3f}x   {status} target >= {RATIO_TARGET:g}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=float, default=100.0, help="model size (MB)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement")
    args = parser.parse_args(argv)
    if args.size_mb * MB <= REFERENCE_CHUNK_BYTES or args.repeats < 1:
        parser.error(
            f"--size-mb must be over {REFERENCE_CHUNK_BYTES / MB:g} (one chunk: a smaller "
            "model travels inline, not as a blob), --repeats at least 1"
        )
    print(report(run(args.size_mb, args.repeats), args.repeats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
