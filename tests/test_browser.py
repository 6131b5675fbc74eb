"""The demo page in a real browser: headless Chromium (Debian's), driven over the DevTools protocol.

The browser is a WebSocket client nobody here wrote: its handshake, masking,
permessage-deflate and close handling all meet fastws's.  CDP itself is
spoken with the ``websockets`` client (no browser download, no playwright).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    explicit = os.environ.get("FASTWS_CHROMIUM")
    if explicit:
        return explicit
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


BROWSER = find_browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="Chromium is not installed (scripts/test installs it: apt-get install chromium)")

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-proxy-server", "--no-default-browser-check",
    "--window-size=1000,900",
]


@pytest.fixture(scope="module")
def chromium() -> Iterator[tuple[int, str]]:
    """One headless Chromium for the module; yields its DevTools port and browser endpoint path."""
    profile = tempfile.mkdtemp(prefix="fastws-chromium-")
    log = tempfile.TemporaryFile()  # noqa: SIM115  (the browser's output, shown if it fails to start)
    proc = subprocess.Popen(
        [BROWSER, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],  # type: ignore[list-item]
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        port_file = Path(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"Chromium did not start (exit {proc.poll()}):\n"
                            f"{log.read().decode(errors='replace')[-4000:]}")
            time.sleep(0.05)
        port, path = port_file.read_text().split()[:2]
        yield int(port), path
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the browser and its helpers (own session)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


class CDPError(Exception):
    pass


class CDP:
    """A minimal DevTools-protocol connection: commands by id, events collected."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, url: str) -> CDP:
        return cls(await websockets.connect(url, max_size=None, ping_interval=None))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                future = self._pending.pop(msg.get("id", -1), None)
                if future is None:
                    self.events.append(msg)
                elif not future.done():
                    future.set_result(msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CDPError("DevTools connection closed"))

    async def send(self, method: str, *, reply_timeout: float = 30, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, reply_timeout)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply["result"]

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


class Page:
    """One browser tab."""

    def __init__(self, cdp: CDP, target_id: str) -> None:
        self.cdp = cdp
        self.target_id = target_id

    async def js(self, expression: str, timeout: float = 20) -> Any:
        """Evaluate ``expression`` (a promise is awaited) and return its JSON value."""
        result = await self.cdp.send("Runtime.evaluate", reply_timeout=timeout, expression=expression,
                                     awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise AssertionError(f"JavaScript error: {text}\nconsole: {self.console()}")
        return result["result"].get("value")

    def console(self) -> list[str]:
        out = []
        for event in self.cdp.events:
            if event.get("method") == "Runtime.consoleAPICalled":
                args = event["params"]["args"]
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in args))
            elif event.get("method") == "Runtime.exceptionThrown":
                out.append(str(event["params"]["exceptionDetails"]))
        return out


# Helpers defined in every page before a test's own script.
HELPERS = """
window.t = window.t || {
  timeout(promise, ms, what) {
    return Promise.race([promise, new Promise((_, reject) =>
      setTimeout(() => reject(new Error("timed out: " + what)), ms))]);
  },
  async until(check, ms, what) {
    const end = Date.now() + ms;
    while (!check()) {
      if (Date.now() > end) throw new Error("timed out waiting for " + what);
      await new Promise((r) => setTimeout(r, 25));
    }
  },
  text(id) { return document.getElementById(id).textContent; },
};
"""

READY = """(async () => {
  await t.until(() => document.readyState === "complete" && window.fastwsDemo
      && fastwsDemo.echo.readyState === WebSocket.OPEN && fastwsDemo.chat.readyState === WebSocket.OPEN,
      10000, "the demo page's sockets to open");
  return true;
})()"""


@pytest.fixture
async def browser(chromium: tuple[int, str]) -> AsyncIterator[Any]:
    """``page = await browser(url)``: a new tab with the demo page loaded and its sockets open."""
    devtools_port, browser_path = chromium
    cdp = await CDP.connect(f"ws://127.0.0.1:{devtools_port}{browser_path}")
    pages: list[Page] = []

    async def open_page(url: str) -> Page:
        target = (await cdp.send("Target.createTarget", url="about:blank"))["targetId"]
        page = Page(await CDP.connect(f"ws://127.0.0.1:{devtools_port}/devtools/page/{target}"), target)
        pages.append(page)
        await page.cdp.send("Runtime.enable")
        await page.cdp.send("Page.enable")
        await page.cdp.send("Page.addScriptToEvaluateOnNewDocument", source=HELPERS)
        await page.cdp.send("Page.navigate", url=url)
        deadline = time.monotonic() + 15
        while True:  # navigation may still be replacing the document: retry until the helpers exist
            try:
                await page.js(HELPERS)
                await page.js(READY, timeout=10)
                return page
            except (AssertionError, CDPError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    yield open_page
    for page in pages:
        try:
            await page.cdp.close()
            await cdp.send("Target.closeTarget", targetId=page.target_id)
        except Exception:
            pass
    await cdp.close()


async def test_echo_from_the_demo_page_with_deflate(start_server, demo_app, browser) -> None:
    _, port = await start_server(demo_app, compression=True)
    page = await browser(f"http://127.0.0.1:{port}/")
    result = await page.js("""(async () => {
      const echo = fastwsDemo.echo;
      const text = "héllo from Chromium ✓ " + "x".repeat(300);  // long enough to be compressed
      const reply = new Promise((resolve) =>
          echo.addEventListener("message", (e) => resolve(e.data), {once: true}));
      document.getElementById("echo-input").value = text;
      document.getElementById("echo-form").requestSubmit();   // through the page's own form
      const data = await t.timeout(reply, 5000, "the echo");
      return {same: data === text, extensions: echo.extensions, log: t.text("echo-log"),
              state: t.text("echo-state")};
    })()""")
    assert result["same"], result
    assert "permessage-deflate" in result["extensions"], result
    assert "← héllo from Chromium ✓" in result["log"]
    assert result["state"].startswith("open (permessage-deflate"), result["state"]


BINARY_ECHO = """(async (size, compressible) => {
  const ws = new WebSocket("ws://" + location.host + "/echo");
  ws.binaryType = "arraybuffer";
  await t.timeout(new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("ws error"));
  }), 5000, "open");
  const data = new Uint8Array(size);
  if (compressible) {
    for (let i = 0; i < size; i++) data[i] = (i * 7 + (i >> 10)) & 0x3f;
  } else {
    for (let i = 0; i < size; i += 65536) crypto.getRandomValues(data.subarray(i, i + 65536));
  }
  const reply = new Promise((resolve, reject) => {
    ws.onmessage = (e) => resolve(e.data);
    ws.onclose = (e) => reject(new Error("closed " + e.code + " " + e.reason));
  });
  const started = performance.now();
  ws.send(data);
  const got = new Uint8Array(await t.timeout(reply, 15000, "the binary echo"));
  const ms = performance.now() - started;
  let same = got.length === data.length;
  for (let i = 0; same && i < data.length; i++) if (got[i] !== data[i]) same = false;
  ws.onclose = null;
  ws.close(1000);
  return {length: got.length, same, ms, extensions: ws.extensions};
})"""


@pytest.mark.parametrize(("compression", "compressible"), [
    pytest.param(True, True, id="deflate-compressible"),
    pytest.param(False, False, id="plain-random"),
    pytest.param(True, False, id="deflate-random"),
])
async def test_one_mebibyte_binary_echo(start_server, demo_app, browser, compression: bool,
                                        compressible: bool) -> None:
    """Exactly max_message_size (1 MiB) both ways."""
    _, port = await start_server(demo_app, compression=compression)
    page = await browser(f"http://127.0.0.1:{port}/")
    result = await page.js(f"{BINARY_ECHO}({1 << 20}, {json.dumps(compressible)})", timeout=30)
    assert result["length"] == 1 << 20
    assert result["same"], "the 1 MiB echo came back different"
    assert ("permessage-deflate" in result["extensions"]) == compression


async def test_client_initiated_close_is_clean(start_server, demo_app, browser) -> None:
    _, port = await start_server(demo_app, compression=True)
    page = await browser(f"http://127.0.0.1:{port}/")
    result = await page.js("""(async () => {
      const ws = new WebSocket("ws://" + location.host + "/echo");
      await t.timeout(new Promise((resolve) => { ws.onopen = resolve; }), 5000, "open");
      const closed = new Promise((resolve) => {
        ws.onclose = (e) => resolve({code: e.code, clean: e.wasClean});
      });
      ws.close(1000, "bye");
      return await t.timeout(closed, 5000, "close");
    })()""")
    assert result == {"code": 1000, "clean": True}


async def test_server_initiated_close_reaches_the_page(start_server, demo_app, browser) -> None:
    """A binary message on /chat is refused with 1003 and its reason."""
    _, port = await start_server(demo_app, compression=True)
    page = await browser(f"http://127.0.0.1:{port}/")
    result = await page.js("""(async () => {
      const chat = fastwsDemo.chat;
      const closed = new Promise((resolve) => chat.addEventListener("close",
          (e) => resolve({code: e.code, clean: e.wasClean, reason: e.reason}), {once: true}));
      chat.send(new Uint8Array([1, 2, 3]));
      return await t.timeout(closed, 5000, "close");
    })()""")
    assert result == {"code": 1003, "clean": True, "reason": "the chat takes text messages only"}


async def test_two_pages_chat(start_server, demo_app, browser) -> None:
    _, port = await start_server(demo_app, compression=True)
    alice = await browser(f"http://127.0.0.1:{port}/")
    bob = await browser(f"http://127.0.0.1:{port}/")
    # alice sees bob arrive
    await alice.js("t.until(() => (t.text('chat-log').match(/joined/g) || []).length >= 2, 5000, "
                   "'bob joining')")
    said = await alice.js("""(() => {
      const input = document.getElementById("chat-input");
      input.value = "hello bob, from alice";
      document.getElementById("chat-form").requestSubmit();
      return input.value;   // the page clears the input after sending
    })()""")
    assert said == ""
    bob_log = await bob.js("t.until(() => t.text('chat-log').includes(': hello bob, from alice'), 5000, "
                           "'alice\\'s message').then(() => t.text('chat-log'))")
    assert re.search(r"#\d+: hello bob, from alice", bob_log), bob_log
    alice_log = await alice.js("t.until(() => t.text('chat-log').includes(': hello bob'), 5000, "
                               "'own message').then(() => t.text('chat-log'))")
    assert "hello bob, from alice" in alice_log
    # and back
    await bob.js("fastwsDemo.chat.send('hi alice')")
    await alice.js("t.until(() => t.text('chat-log').includes(': hi alice'), 5000, 'bob\\'s reply')")


async def test_pushes_arrive(start_server, demo_app, browser) -> None:
    _, port = await start_server(demo_app, compression=True)
    page = await browser(f"http://127.0.0.1:{port}/")
    result = await page.js("""(async () => {
      const count = () => Number(t.text("push-count"));
      await t.until(() => count() >= 1, 5000, "the first push");
      const first = count();
      await t.until(() => count() >= first + 2, 5000, "two more pushes");
      return {first, now: count(), time: t.text("push-time"), state: t.text("push-state")};
    })()""")
    assert result["now"] >= result["first"] + 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", result["time"]), result
    assert result["state"].startswith("open"), result


async def test_screenshot_of_the_demo_page(start_server, demo_app, browser, tmp_path: Path) -> None:
    _, port = await start_server(demo_app, compression=True)
    page = await browser(f"http://127.0.0.1:{port}/")
    await page.js("t.until(() => Number(t.text('push-count')) >= 1, 5000, 'a push')")
    shot = await page.cdp.send("Page.captureScreenshot", format="png")
    png = base64.b64decode(shot["data"])
    path = tmp_path / "demo.png"
    path.write_bytes(png)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100, (width, height)



OVERSIZED = """(async (rounds, size) => {
  const results = [];
  for (let i = 0; i < rounds; i++) {
    const ws = new WebSocket("ws://" + location.host + "/echo");
    await t.timeout(new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error("ws error"));
    }), 5000, "open");
    const closed = new Promise((resolve) => {
      ws.onclose = (e) => resolve({code: e.code, reason: e.reason, clean: e.wasClean});
    });
    ws.send(new Uint8Array(size));   // four times the limit: the server fails the connection
    results.push(await t.timeout(closed, 10000, "the close"));
  }
  return results;
})"""


async def test_an_oversized_message_gets_1009_every_time(start_server, demo_app, browser) -> None:
    """The browser is still sending its 4 MiB message when the server refuses it: it must see the
    server's 1009 and reason every time (a reset would make it report 1006)."""
    _, port = await start_server(demo_app)
    page = await browser(f"http://127.0.0.1:{port}/")
    rounds = 12
    results = await page.js(f"{OVERSIZED}({rounds}, {4 << 20})", timeout=120)
    assert len(results) == rounds
    for result in results:
        assert result["code"] == 1009, results
        assert "exceeds the limit" in result["reason"], results
