"""A FastAPI app on uvicorn with fastws's protocol, driven by headless Chromium.

The browser's WebSocket (its handshake, masking, permessage-deflate, close
handling) against fastws.asgi.FastWSProtocol.  The DevTools driver and the
browser fixture come from tests/test_browser.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import test_browser
from test_asgi_apps import MiB, ServerProcess, uvicorn
from test_browser import BROWSER, CDP, HELPERS, CDPError, Page

chromium = test_browser.chromium  # its module-scoped browser fixture, used here too

pytestmark = [pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed"), pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = uvicorn("test_asgi_apps:fastapi_app", "--ws-max-size", str(MiB))
    yield proc
    proc.stop()


@pytest.fixture
async def page(chromium: tuple[int, str]) -> AsyncIterator[Any]:
    """``tab = await page(url)``: a new tab with ``url`` loaded and the test helpers defined."""
    devtools_port, browser_path = chromium
    cdp = await CDP.connect(f"ws://127.0.0.1:{devtools_port}{browser_path}")
    pages: list[Page] = []

    async def open_page(url: str) -> Page:
        target = (await cdp.send("Target.createTarget", url="about:blank"))["targetId"]
        tab = Page(await CDP.connect(f"ws://127.0.0.1:{devtools_port}/devtools/page/{target}"), target)
        pages.append(tab)
        await tab.cdp.send("Runtime.enable")
        await tab.cdp.send("Page.addScriptToEvaluateOnNewDocument", source=HELPERS)
        await tab.cdp.send("Page.navigate", url=url)
        deadline = time.monotonic() + 15
        while True:  # navigation may still be replacing the document: retry until it is loaded
            try:
                await tab.js(HELPERS)
                if await tab.js("document.readyState === 'complete' && document.title.startsWith('fastws')"):
                    return tab
            except (AssertionError, CDPError):
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)

    yield open_page
    for tab in pages:
        try:
            await tab.cdp.close()
            await cdp.send("Target.closeTarget", targetId=tab.target_id)
        except Exception:
            pass
    await cdp.close()


OPEN = """
window.openSocket = async (path) => {
  const ws = new WebSocket("ws://" + location.host + path);
  ws.binaryType = "arraybuffer";
  ws.messages = [];
  ws.closed = new Promise((resolve) => {
    ws.onclose = (e) => resolve({code: e.code, reason: e.reason, clean: e.wasClean});
  });
  ws.onmessage = (e) => ws.messages.push(e.data);
  ws.next = () => t.until(() => ws.messages.length > 0, 10000, "a message").then(() => ws.messages.shift());
  await t.timeout(new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("could not open " + path));
  }), 10000, "open " + path);
  return ws;
};
"""


async def test_echo_text_and_binary_with_deflate(server: ServerProcess, page: Any) -> None:
    tab = await page(server.url("/", "http"))
    result = await tab.js(OPEN + """(async () => {
      const ws = await openSocket("/echo");
      const text = "héllo from Chromium ✓ " + "x".repeat(300);
      ws.send(text);
      const textBack = await ws.next();
      const data = new Uint8Array(1 << 20);
      for (let i = 0; i < data.length; i += 65536) crypto.getRandomValues(data.subarray(i, i + 65536));
      ws.send(data);
      const got = new Uint8Array(await ws.next());
      let same = got.length === data.length;
      for (let i = 0; same && i < data.length; i++) if (got[i] !== data[i]) same = false;
      ws.close(1000, "done");
      return {textSame: textBack === text, binarySame: same, extensions: ws.extensions, close: await ws.closed};
    })()""", timeout=60)
    assert result["textSame"] and result["binarySame"], result
    assert "permessage-deflate" in result["extensions"], result
    assert result["close"] == {"code": 1000, "reason": "", "clean": True}


async def test_app_close_code_and_reason_reach_the_browser(server: ServerProcess, page: Any) -> None:
    tab = await page(server.url("/", "http"))
    result = await tab.js(OPEN + """(async () => {
      const ws = await openSocket("/close");
      ws.send("4321 closed by the FastAPI app ✓");
      return await t.timeout(ws.closed, 10000, "close");
    })()""")
    assert result == {"code": 4321, "reason": "closed by the FastAPI app ✓", "clean": True}


async def test_oversized_message_is_1009_in_the_browser(server: ServerProcess, page: Any) -> None:
    """The server keeps reading after its close frame, so the browser's unread 2 MiB cannot make
    the kernel reset the connection (which would show the page 1006 instead)."""
    tab = await page(server.url("/", "http"))
    result = await tab.js(OPEN + """(async () => {
      const ws = await openSocket("/echo");
      ws.send(new Uint8Array(2 << 20));
      return await t.timeout(ws.closed, 10000, "close");
    })()""")
    assert result["code"] == 1009, result


async def test_denied_and_forbidden_handshakes_fail_in_the_browser(server: ServerProcess, page: Any) -> None:
    tab = await page(server.url("/", "http"))
    result = await tab.js("""(async () => {
      const attempt = (path) => new Promise((resolve) => {
        const ws = new WebSocket("ws://" + location.host + path);
        ws.onopen = () => resolve("opened");
        ws.onclose = (e) => resolve(e.code);
      });
      return [await attempt("/deny"), await attempt("/forbid")];
    })()""")
    assert result == [1006, 1006]


async def test_two_pages_in_a_room(server: ServerProcess, page: Any) -> None:
    alice = await page(server.url("/", "http"))
    bob = await page(server.url("/", "http"))
    join = OPEN + """(async () => {
      window.room = await openSocket("/rooms");
      room.send(JSON.stringify({op: "join", room: "browsers"}));
      return await room.next();
    })()"""
    assert json.loads(await alice.js(join)) == {"ok": True}
    assert json.loads(await bob.js(join)) == {"ok": True}
    await alice.js("""room.send(JSON.stringify({op: "publish", room: "browsers", message: "hi bob ✓",
                                                exclude_self: true}))""")
    assert await bob.js("room.next()") == "hi bob ✓"
    assert json.loads(await alice.js("room.next()")) == {"ok": 1}


async def test_graceful_shutdown_is_1012_in_the_browser(page: Any) -> None:
    proc = uvicorn()
    try:
        tab = await page(proc.url("/", "http"))
        await tab.js(OPEN + """(async () => { window.ws = await openSocket("/echo"); return true; })()""")
        exit_code = asyncio.get_running_loop().run_in_executor(None, proc.stop, signal.SIGTERM, 30.0)
        result = await tab.js("t.timeout(ws.closed, 10000, 'the close')")
        assert result == {"code": 1012, "reason": "server shutting down", "clean": True}
        assert await exit_code in (0, -signal.SIGTERM)
    finally:
        if proc.proc.poll() is None:
            proc.kill()
