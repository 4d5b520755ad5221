"""What a user sees first in TensorBoard, in a real browser: Chromium driven over the DevTools protocol.

    python tests/tensorboard_browser.py LOGDIR [--url URL] [--screenshot PNG]

Starts TensorBoard on LOGDIR (127.0.0.1 only, a free port, stopped afterwards), opens URL (default: the
address `python -m experiment.report` prints, for alexnet and alexnet_ac) in headless Chromium, waits until
the page has drawn, and prints as JSON what the first screen (1600x1000) shows: the card titles in view and
the images in view that have loaded. With --screenshot it also saves the first screen as a PNG.

Chromium is driven through --remote-debugging-pipe (JSON messages on file descriptors 3 and 4), so no
websocket client is needed. Headless Chromium's `--screenshot` flag draws TensorBoard's WebGL charts empty;
a screenshot taken over the protocol after the page has drawn does not (software GL: SwiftShader).
Not collected by pytest (the name does not start with test_): test_experiment_report.py calls `first_screen`.
"""
import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from tests/: make experiment/ importable

WIDTH, HEIGHT = 1600, 1000
# TensorBoard's global settings (the Settings panel) live in this localStorage key.
SETTINGS_KEY = "_tb_global_settings"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@contextmanager
def tensorboard(logdir, timeout_s=90):
    """A TensorBoard on 127.0.0.1 and a free port; yields its base address; killed on exit."""
    process = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                                "127.0.0.1", "--port", "0", "--load_fast", "false"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, seen = time.monotonic() + timeout_s, []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("tensorboard exited: " + "".join(seen))
            seen.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if found:
                yield found.group(1)
                return
        raise RuntimeError("tensorboard did not start in time: " + "".join(seen))
    finally:
        process.kill()
        process.wait(timeout=30)


def _high_fds(*fds):
    """The fds moved to numbers above 4 (close-on-exec), so that putting them on 3 and 4 never overwrites one."""
    import fcntl

    moved = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds)
    for fd in fds:
        os.close(fd)
    return moved


class Browser:
    """Headless Chromium over --remote-debugging-pipe: commands go to its fd 3, replies come from its fd 4,
    each message JSON ending in a NUL byte."""

    def __init__(self, binary):
        self.profile = tempfile.mkdtemp(prefix="tb-browser-")
        to_chrome_r, self.to_chrome = _high_fds(*os.pipe())
        self.from_chrome, from_chrome_w = _high_fds(*os.pipe())

        def map_fds():  # in the child, before exec: the pipe ends become the fds Chromium uses, 3 and 4
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        # close_fds=False keeps the inheritable 3 and 4 that map_fds made; every other fd Python opened is
        # close-on-exec anyway
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--no-first-run",
             "--use-angle=swiftshader", "--enable-unsafe-swiftshader", f"--window-size={WIDTH},{HEIGHT}",
             f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=map_fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buffer, self.next_id, self.session = b"", 0, None

    def send(self, method, timeout_s=60, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            chunk = os.read(self.from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raise TimeoutError(method)

    def open(self, url):
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                  mobile=False)
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def evaluate(self, expression):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def screenshot(self, path):
        data = self.send("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self):
        self.process.kill()
        self.process.wait(timeout=30)
        os.close(self.to_chrome)
        os.close(self.from_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)


# What the first screen shows: card titles and loaded images whose top edge is inside the window.
FIRST_SCREEN = """(() => {
  const inView = (el) => { const r = el.getBoundingClientRect();
                           return r.width > 0 && r.height > 0 && r.top < innerHeight && r.bottom > 0; };
  const titles = [...document.querySelectorAll('.tag, .card-title, [class*="title"]')]
    .filter(inView).map((el) => el.textContent.trim()).filter((t) => t);
  const images = [...document.querySelectorAll('img')].filter(inView)
    .filter((img) => img.complete && img.naturalWidth > 0)
    .map((img) => ({src: img.src, width: img.naturalWidth, height: img.naturalHeight,
                    top: Math.round(img.getBoundingClientRect().top),
                    shownWidth: Math.round(img.getBoundingClientRect().width)}));
  return {titles: [...new Set(titles)], images, url: location.href};
})()"""


# Clicks the button of this aria-label on the first card that has one (e.g. an image card's actual-size toggle).
CLICK = """((label) => { const button = document.querySelector(`button[aria-label="${label}"]`);
  if (button) button.click(); return Boolean(button); })"""


def first_screen(url, settings=None, screenshot=None, click=None, timeout_s=90, settle_s=3.0):
    """Open ``url`` in headless Chromium and return what its first screen shows (see FIRST_SCREEN), once at
    least one image has loaded or ``timeout_s`` has passed. ``settings`` are written to TensorBoard's
    global-settings key in localStorage before the page loads, as the Settings panel would; ``click`` names
    the aria-label of a button to press before the screenshot (the first one on the page)."""
    browser = Browser(chromium())
    try:
        if settings:
            origin = re.match(r"https?://[^/]+", url).group(0)
            browser.open(origin + "/robots.txt")  # same origin, without starting the app
            time.sleep(1.0)
            browser.evaluate(f"localStorage.setItem({json.dumps(SETTINGS_KEY)}, {json.dumps(json.dumps(settings))})")
            browser.send("Page.navigate", url=url)
        else:
            browser.open(url)
        deadline = time.monotonic() + timeout_s
        shown = {}
        while time.monotonic() < deadline:
            time.sleep(1.0)
            shown = browser.evaluate(FIRST_SCREEN) or {}
            if shown.get("images"):
                break
        if click:
            shown["clicked"] = browser.evaluate(f"{CLICK}({json.dumps(click)})")
        time.sleep(settle_s)  # let the charts beside the image draw
        shown = {**shown, **(browser.evaluate(FIRST_SCREEN) or {})}
        if screenshot:
            browser.screenshot(screenshot)
        return shown
    finally:
        browser.close()


def main(argv=None):
    from experiment.tracking import tensorboard_url

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir")
    parser.add_argument("--url", default=tensorboard_url(["alexnet", "alexnet_ac"]),
                        help="the address to open; its http://127.0.0.1:6006 is replaced by the TensorBoard started here")
    parser.add_argument("--screenshot", help="save the first screen as this PNG")
    parser.add_argument("--ignore-outliers-off", action="store_true",
                        help="turn off 'Ignore outliers in chart scaling' first, as the README tells users to")
    parser.add_argument("--click", help="aria-label of a button to press before the screenshot, e.g. "
                                        "'Toggle actual image size'")
    args = parser.parse_args(argv)
    if not chromium():
        sys.exit("error: no chromium found; install it (Debian: apt-get install -y chromium)")
    with tensorboard(args.logdir) as base:
        url = args.url.replace("http://127.0.0.1:6006", base)
        shown = first_screen(url, {"ignoreOutliers": False} if args.ignore_outliers_off else None, args.screenshot,
                             args.click)
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
