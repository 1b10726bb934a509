"""Drive headless Chromium over the DevTools protocol on a pipe (no websocket).

``chromium --remote-debugging-pipe`` reads protocol messages from its fd 3 and
writes replies and events to its fd 4, each a JSON text ended by a NUL byte.
:class:`Chromium` starts it with a fresh profile, opens one page and offers
``navigate``, ``evaluate`` and ``screenshot``; everything is torn down by
:meth:`close` (the process and its temporary profile).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

from pymooncake.testing._tools import require_tool

#: flags for a quiet, reproducible headless run (no network besides what the page loads)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--mute-audio",
    "--window-size=1280,900",
    "--remote-debugging-pipe",
)


class ChromiumError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium with one page.

    Raises (at construction):
        pytest skip/fail: chromium is not installed (``require_tool``).
        ChromiumError: it did not start or answer within ``timeout_s``.
    """

    def __init__(self, timeout_s: float = 60.0) -> None:
        binary = require_tool("chromium", package="chromium")
        self._timeout = timeout_s
        self._profile = tempfile.mkdtemp(prefix="pmc-chromium-")
        # our ends: we write commands into to_chrome, read replies from from_chrome
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        args = [binary, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"]
        # bash puts the pipe ends on fds 3 and 4, where Chromium expects them (dash only
        # redirects single-digit fds)
        script = f"exec 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-; exec {shlex.join(args)}"
        env = {**os.environ, "HOME": self._profile}
        try:
            self._proc = subprocess.Popen(
                [shutil.which("bash") or "/bin/bash", "-c", script],
                pass_fds=(cmd_r, out_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(cmd_r)
            os.close(out_w)
        self._stderr: list[bytes] = []
        self._err_reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._err_reader.start()
        self._buf = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self._session = ""
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self.send(
                "Target.attachToTarget", {"targetId": target, "flatten": True}
            )["sessionId"]
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.close()
            raise

    def _drain_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr.append(line)

    @property
    def log(self) -> str:
        """What Chromium wrote on stderr (for failure messages)."""
        return b"".join(self._stderr[-40:]).decode("utf-8", "replace")

    # --- the protocol ------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChromiumError(f"no answer from chromium in {self._timeout} s:\n{self.log}")
            ready, _, _ = select.select([self._out_r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise ChromiumError(f"chromium exited (status {self._proc.poll()}):\n{self.log}")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one protocol command on the page (the browser before a page exists)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self._session:
            msg["sessionId"] = self._session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self._timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") != self._next_id:
                if "method" in reply:
                    self._events.append(reply)
                continue
            if "error" in reply:
                raise ChromiumError(f"{method}: {reply['error']}")
            result: dict[str, Any] = reply.get("result", {})
            return result

    # --- the page ---------------------------------------------------------------

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait for its load event."""
        self._events.clear()
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise ChromiumError(f"cannot load {url}: {result['errorText']}")
        deadline = time.monotonic() + self._timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self._events):
            self._events.append(self._read_message(deadline))

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression on the page."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise ChromiumError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        """Exceptions and console errors the page reported so far."""
        out = []
        for e in self._events:
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(e["params"]["exceptionDetails"])[:500])
            elif e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error":
                out.append(json.dumps(e["params"]["args"])[:500])
        return out

    def screenshot(self, path: str) -> None:
        """Write a PNG of the page."""
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))

    def close(self) -> None:
        try:
            if self._proc.poll() is None:
                try:
                    self._session = ""
                    os.write(
                        self._cmd_w,
                        json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0",
                    )
                    self._proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self._proc.poll() is None:
                os.killpg(self._proc.pid, 9)
                self._proc.wait(timeout=10)
        finally:
            for fd in (self._cmd_w, self._out_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if self._proc.stderr is not None:
                self._err_reader.join(timeout=10)
                self._proc.stderr.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
