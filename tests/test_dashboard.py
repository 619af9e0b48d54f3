"""The server's web dashboard (``GET /``) in headless Chromium, against a real server.

Chromium is driven over the DevTools protocol (CDP) with aiohttp's websocket client, so
no browser-automation dependency is needed. Needs Debian's ``chromium`` package (or
``FEDTRAY_CHROMIUM=/path/to/chrome``); without it the tests FAIL with the install line.
Chromium runs with its background networking off (this machine has no outside network)
and is killed at the end of every test. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from server_harness import (
    REPO_ROOT,
    ScriptedDevice,
    ServerHandle,
    resources,
    run_devices,
    running_server,
)

from tests.waiting import scaled

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

ARTIFACTS = REPO_ROOT / "test-artifacts"
WIDTH, HEIGHT = 1200, 900
PAUSE_DETAIL = "On battery at 42 % — training resumes at 55 % or when plugged in"
# Would set window.pwned if the page ever parsed a device name as HTML.
EVIL_NAME = '<img src=x onerror="pwned=2"><script>pwned=1</script>'
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-proxy-server",
    "--hide-scrollbars",
    "--force-color-profile=srgb",
    "--force-device-scale-factor=1",
    f"--window-size={WIDTH},{HEIGHT}",
    "--remote-debugging-port=0",
]


def chromium_path() -> str:
    """The browser to drive; fails the test (never skips) when there is none."""
    configured = os.environ.get("FEDTRAY_CHROMIUM")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "headless Chromium is needed for the dashboard tests but was not found on PATH: "
        "install it (Debian/Ubuntu: `apt-get install -y chromium`) or set FEDTRAY_CHROMIUM",
        pytrace=False,
    )


class Page:
    """A minimal CDP session on one page target: commands, events, and waits."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.errors: list[str] = []  # uncaught exceptions and console errors
        self.exceptions: list[str] = []  # uncaught exceptions only
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            else:
                self._on_event(data.get("method", ""), data.get("params", {}))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the DevTools connection closed"))

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.exceptions.append(text)
            self.errors.append(f"exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.errors.append(f"console.error: {args}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(
            json.dumps({"id": msg_id, "method": method, "params": params or {}})
        )
        reply = await asyncio.wait_for(fut, 20)
        if "error" in reply:
            raise RuntimeError(f"CDP {method} failed: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def js(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page and return its JSON value."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluating {expression!r} failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_js(self, expression: str, timeout: float = 15.0, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; return its value (``timeout`` scaled)."""
        deadline = time.monotonic() + scaled(timeout)
        value: Any = None
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise TimeoutError(
            f"timed out after {timeout} s waiting for {what or expression}; last value {value!r}"
        )

    async def screenshot(self, path: Path) -> bytes:
        """A full-page PNG of the page at WIDTH css pixels, written to ``path``."""
        metrics = await self.send("Page.getLayoutMetrics")
        height = max(HEIGHT, int(metrics["cssContentSize"]["height"]) + 1)
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        data = base64.b64decode(shot["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def browser(tmp_path: Path) -> AsyncIterator[Page]:
    """Headless Chromium on about:blank with a CDP session; killed on exit."""
    exe = chromium_path()
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    log_path = tmp_path / "chromium.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + scaled(30)
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Chromium did not open its DevTools port (exit {proc.poll()}):\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            target = next(t for t in targets if t["type"] == "page")
            ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
            page = Page(ws)
            try:
                for domain in ("Runtime", "Log", "Page"):
                    await page.send(f"{domain}.enable")
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
                )
                yield page
            finally:
                await page.close()
    finally:
        proc.kill()
        proc.wait(scaled(30))


async def open_dashboard(page: Page, url: str) -> None:
    await page.send("Page.navigate", {"url": url + "/"})
    await page.wait_js("document.readyState === 'complete'", what="the page to load")


async def heartbeat_loop(dev: ScriptedDevice, state: dict[str, Any], period: float = 0.2) -> None:
    """Heartbeat with whatever ``state`` holds now, until cancelled."""
    while True:
        with contextlib.suppress(Exception):
            await dev.heartbeat(**state)
        await asyncio.sleep(period)


def started(dev: ScriptedDevice, count: int) -> Callable[[], bool]:
    return lambda: len(dev.starts) >= count


def at_version(version: int) -> Callable[[dict[str, Any]], bool]:
    return lambda status: bool(status["globalVersion"] == version)


async def run_rounds(srv: ServerHandle, devices: list[ScriptedDevice], count: int) -> None:
    """Let ``count`` rounds complete: every device submits its base weights, nudged."""
    for number in range(1, count + 1):
        for dev in devices:
            await dev.until(started(dev, number), 15, f"start #{number}")
        for i, dev in enumerate(devices):
            start = dev.starts[number - 1]
            base = dev.weights[start["baseVersion"]]
            update = {k: (v * (0.9 + 0.05 * i)).astype(v.dtype) for k, v in base.items()}
            ack = await dev.submit(
                start["roundId"],
                start["baseVersion"],
                update,
                num_samples=10 + i,
                metrics={"trainLoss": 1.2 / number + 0.1 * i},
            )
            assert ack["ok"] is True, ack
        await srv.await_status(at_version(number), 15, f"version {number}")


CANVAS_INK = """(() => {
  // Pixels of each series' colour on the chart: proves lines were drawn, not just a frame.
  const c = document.getElementById('chart');
  const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const css = getComputedStyle(document.documentElement);
  const probe = document.createElement('canvas').getContext('2d');
  const rgb = (name) => { probe.fillStyle = css.getPropertyValue(name).trim();
    const h = probe.fillStyle; return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)); };
  const out = {};
  for (const name of ['--acc', '--train', '--eval', '--fed', '--fedloss']) {
    const [r, g, b] = rgb(name); let n = 0;
    for (let i = 0; i < data.length; i += 4)
      if (data[i + 3] > 200 && Math.abs(data[i] - r) + Math.abs(data[i + 1] - g)
          + Math.abs(data[i + 2] - b) < 40) n++;
    out[name] = n;
  }
  return out;
})()"""

ROW = "document.querySelector('tr[data-device-id=\"{id}\"]')"


def answer_evaluations(dev: ScriptedDevice, accuracy: float, samples: int) -> list[Any]:
    """Make ``dev`` accept every ``evaluation:start`` and then report ``accuracy`` (the
    federated curve's data); the returned list keeps its report tasks alive."""
    reports: list[Any] = []

    async def on_start(payload: dict[str, Any]) -> dict[str, Any]:
        result = {
            "version": payload["version"],
            "task": payload["task"],
            "loss": 1.0 - accuracy,
            "accuracy": accuracy,
            "numSamples": samples,
        }
        reports.append(asyncio.create_task(dev.sio.emit("evaluation:result", result)))
        return {"accepted": True}

    dev.sio.on("evaluation:start", on_start)
    return reports


def test_dashboard_shows_rounds_devices_and_escapes_names(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        async with browser(tmp_path) as page:
            # A device paused on battery first, so it is never selected.
            gamma = ScriptedDevice(srv.url, name="gamma-laptop")
            await gamma.connect()
            battery = {"percent": 42.0, "pluggedIn": False}
            assert (await gamma.register(resources=resources(battery=battery)))["ok"]
            paused: dict[str, Any] = {
                "state": "paused",
                "pauseReason": "battery_low",
                "pauseDetail": PAUSE_DETAIL,
                "resources": resources(battery=battery),
            }
            assert (await gamma.heartbeat(**paused))["ok"]
            beats = [asyncio.create_task(heartbeat_loop(gamma, paused))]

            await open_dashboard(page, srv.url)
            # No completed round yet: an empty chart that says so.
            await page.wait_js(
                "document.getElementById('task').textContent === 'synthetic'", what="first data"
            )
            assert await page.js("document.getElementById('chart').dataset.points") == "0"
            assert "No rounds completed yet" in await page.js(
                "document.getElementById('chart').getAttribute('aria-label')"
            )

            alpha = ScriptedDevice(srv.url, name="alpha-desktop")
            evil = ScriptedDevice(srv.url, name=EVIL_NAME)
            kept = [answer_evaluations(alpha, 0.9, 30), answer_evaluations(evil, 0.6, 10)]
            for dev in (alpha, evil):
                assert (await dev.join())["ok"]
                beats.append(asyncio.create_task(heartbeat_loop(dev, {"state": "idle"})))
            await run_rounds(srv, [alpha, evil], 3)
            # A device that registers and then goes silent turns stale.
            silent = ScriptedDevice(srv.url, name="silent-server")
            assert (await silent.join())["ok"]

            # The page refreshes itself: no reload from here on.
            await page.wait_js(
                "document.getElementById('chart').dataset.points === '3'",
                what="3 rounds plotted",
            )
            # Both devices evaluated each version: the federated curve is drawn too.
            await page.wait_js(
                "document.getElementById('chart').dataset.federatedPoints === '3'",
                what="3 federated evaluations plotted",
            )
            ink = await page.js(CANVAS_INK)
            assert all(n > 30 for n in ink.values()), f"chart series not drawn: {ink}"
            # The history's sample-weighted mean: (0.9 * 30 + 0.6 * 10) / 40.
            assert "82.5" in await page.js("document.querySelector('#history td.fed').textContent")
            assert all(len(reports) >= 3 for reports in kept)  # every version, both devices
            assert await page.js("document.getElementById('version').textContent") == "3"

            ids = {d.device_id for d in (alpha, evil, gamma, silent)}
            await page.wait_js(
                f"!!{ROW.format(id=silent.device_id)}?.querySelector('[data-stale]')",
                timeout=scaled(20),
                what="the silent device marked stale",
            )
            shown = await page.js(
                "[...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.deviceId)"
            )
            assert set(shown) == ids

            gamma_text = await page.js(f"{ROW.format(id=gamma.device_id)}.textContent")
            assert "Paused: low battery" in gamma_text
            assert PAUSE_DETAIL in gamma_text
            assert "42 % · on battery" in gamma_text
            alpha_text = await page.js(f"{ROW.format(id=alpha.device_id)}.textContent")
            assert "—" in alpha_text  # no battery
            assert "Paused" not in alpha_text

            # The hostile name is text: shown verbatim, nothing parsed or run.
            evil_name = await page.js(
                f"{ROW.format(id=evil.device_id)}.querySelector('.name').textContent"
            )
            assert evil_name == EVIL_NAME
            assert await page.js("typeof window.pwned") == "undefined"
            assert await page.js("document.querySelectorAll('main script, main img').length") == 0

            assert await page.js("document.getElementById('banner').hidden") is True
            assert await page.js("document.getElementById('errors').textContent") == ""
            assert page.errors == [], page.errors

            shot = await page.screenshot(ARTIFACTS / "dashboard.png")
            assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 10_000
            for task in beats:
                task.cancel()

    with running_server(
        tmp_path, min_clients=2, clients_per_round=2, round_timeout=60.0, evaluate_every=1
    ) as srv:
        run_devices(scenario(srv))


def test_dashboard_banner_when_server_is_down_then_recovers(tmp_path: Path) -> None:
    banner_shown = "!document.getElementById('banner').hidden"

    async def in_browser(body: Callable[[Page], Awaitable[None]]) -> None:
        async with browser(tmp_path) as page:
            await body(page)

    async def scenario(page: Page) -> None:
        with running_server(tmp_path) as srv:
            port = srv.port
            await open_dashboard(page, srv.url)
            await page.wait_js(
                "document.getElementById('updated').textContent.startsWith('updated')",
                what="first data",
            )
            assert await page.js(banner_shown) is False
        # Server gone: a banner says so while the last data stays on screen.
        text = await page.wait_js(
            f"{banner_shown} && document.getElementById('banner').textContent",
            what="the offline banner",
        )
        assert "Cannot reach the server" in text and f":{port}" in text
        assert await page.js("document.getElementById('task').textContent") == "synthetic"
        # Back on the same port: the page recovers by itself.
        with running_server(tmp_path, port=port) as srv:
            await page.wait_js(f"!({banner_shown})", what="the banner to go away")
            assert await page.js("document.body.classList.contains('offline')") is False
            assert srv.port == port
        assert page.exceptions == [], page.exceptions
        assert await page.js("document.getElementById('errors').textContent") == ""

    asyncio.run(asyncio.wait_for(in_browser(scenario), scaled(100)))


#: Each politeness pause: its reason, the words a device sends, the dashboard's label.
POLITENESS = [
    ("in_use", "Paused while you use the computer", "Paused: computer in use"),
    ("step_aside", "Other programs are using 73 % of the CPU", "Paused: other programs busy"),
    ("too_hot", "The CPU is at 88 °C (limit 85 °C)", "Paused: CPU too hot"),
    ("fullscreen", "Paused while a full-screen app is in front", "Paused: full-screen app"),
    ("schedule", "Outside your schedule (22:00–07:00)", "Paused: outside schedule"),
]


def test_dashboard_shows_politeness_pauses_and_budgets(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        async with browser(tmp_path) as page:
            beats = []
            rows: dict[str, tuple[str, str]] = {}
            for reason, detail, label in POLITENESS:
                dev = ScriptedDevice(srv.url, name=f"dev-{reason}")
                assert (await dev.join())["ok"]
                state = {"state": "paused", "pauseReason": reason, "pauseDetail": detail}
                beats.append(asyncio.create_task(heartbeat_loop(dev, state)))
                rows[dev.device_id] = (label, detail)
            light = ScriptedDevice(srv.url, name="in-use-desk")
            assert (await light.join())["ok"]
            budget = {"cores": 1, "cpuPercent": 50, "why": "you are using the computer"}
            beats.append(
                asyncio.create_task(heartbeat_loop(light, {"state": "idle", "budget": budget}))
            )
            await open_dashboard(page, srv.url)
            for device_id, (label, detail) in rows.items():
                text = await page.wait_js(
                    f"{ROW.format(id=device_id)}?.textContent",
                    what=f"the row of {device_id}",
                )
                assert label in text and detail in text, text
            text = await page.wait_js(
                f"({ROW.format(id=light.device_id)}?.textContent || '').includes('Budget')"
                f" && {ROW.format(id=light.device_id)}.textContent",
                what="the budget shown",
            )
            assert "Budget: 1 core at 50 % (you are using the computer, requested)" in text
            assert "Paused" not in text
            assert page.errors == [], page.errors
            for task in beats:
                task.cancel()

    with running_server(tmp_path, min_clients=9, clients_per_round=9) as srv:
        run_devices(scenario(srv))
