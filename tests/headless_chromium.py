"""Headless Chromium driven over the DevTools protocol on a pipe (no driver, no extra package).

`--remote-debugging-pipe` makes Chromium read protocol commands from fd 3 and write replies to
fd 4, each message JSON ended by a NUL byte. Enough of the protocol to open a page, click, read
text (also inside an iframe) and take a screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


HEADLESS_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


class Chromium:
    def __init__(self, binary: str, width: int = 1400, height: int = 900, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="vitablate-chromium-")
        child_in, self._w = os.pipe()
        self._r, child_out = os.pipe()
        # Chromium's protocol pipe is fixed at fds 3 and 4; a bash trampoline moves the child's ends
        # there from numbers >= 10 (never 3 or 4 themselves), so no preexec_fn is needed.
        hi_in, hi_out = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (child_in, child_out))
        os.close(child_in)
        os.close(child_out)
        command = [binary, *HEADLESS_FLAGS, "--remote-debugging-pipe", f"--window-size={width},{height}",
                   f"--user-data-dir={self.profile}", "about:blank"]
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{hi_in} 4>&{hi_out} {hi_in}<&- {hi_out}>&-', "bash", *command],
            pass_fds=(hi_in, hi_out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(hi_in)
        os.close(hi_out)
        self._buf, self._id, self.session = b"", 0, None
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the DevTools pipe (exit {self.proc.poll()})")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # events and other replies are skipped
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def eval(self, expression: str, context_id: int | None = None):
        extra = {"contextId": context_id} if context_id is not None else {}
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True, **extra)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, context_id: int | None = None):
        """Poll until `expression` is truthy (the React app renders after load)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            value = self.eval(expression, context_id)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"still falsy after {self.timeout} s: {expression}")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def click_link(self, text: str) -> None:
        """Click the first <a> whose visible text is `text`, as a user would."""
        ok = self.wait_for(f"""(() => {{
            const a = Array.from(document.querySelectorAll('a')).find(a => a.innerText.trim() === {json.dumps(text)});
            if (a) a.click();
            return !!a; }})()""")
        assert ok

    def frame_context(self, index: int = 0) -> int:
        """An execution context inside the page's `index`-th iframe (data: iframes are cross-origin)."""
        frames = self.send("Page.getFrameTree")["frameTree"].get("childFrames", [])
        return self.send("Page.createIsolatedWorld", frameId=frames[index]["frame"]["id"])["executionContextId"]

    def wait_in_frame(self, expression: str, index: int = 0):
        """`wait_for` inside the page's `index`-th iframe. Its execution context is made anew at each poll: the
        frame may not exist yet, or may still be replacing its first document (and that document's context: once,
        under load, an evaluation in a context made a moment earlier failed with "Cannot find context")."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                value = self.eval(expression, self.frame_context(index))
            except (RuntimeError, IndexError):  # no such frame yet, or its document was replaced meanwhile
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"still falsy after {self.timeout} s in iframe {index}: {expression}")

    def screenshot(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._w)
            os.close(self._r)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
