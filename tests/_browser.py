"""Headless-Chromium helpers for tests that check HTML output in a real browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_CANDIDATES = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chrome",
    "chrome-headless-shell",
    "headless_shell",
)

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)

# Appended to a copy of the page: once everything has loaded, record how many <img>
# elements there are and how many decoded to a real bitmap.
_IMAGE_PROBE = """
<script>
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0 && imgs[i].naturalHeight > 0) ok++;
  }
  var d = document.createElement("div");
  d.id = "sknpeff-probe";
  d.setAttribute("data-total", String(imgs.length));
  d.setAttribute("data-decoded", String(ok));
  document.body.appendChild(d);
});
</script>
"""
_PROBE_RE = re.compile(r'id="sknpeff-probe" data-total="(\d+)" data-decoded="(\d+)"')


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary (``$SKNPEFF_CHROMIUM`` first), or None."""
    env = os.environ.get("SKNPEFF_CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(binary: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="sknpeff-chromium-") as profile:
        cmd = [binary, *_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


# Appended to a copy of the page: in the load event, record when the load event started
# and when the DOM was ready (milliseconds after navigation began, the page's own clock).
_TIMING_PROBE = """
<script>
window.addEventListener("load", function () {
  var nav = performance.getEntriesByType("navigation")[0];
  var d = document.createElement("div");
  d.id = "sknpeff-timing";
  d.setAttribute("data-load", String(nav.loadEventStart));
  d.setAttribute("data-dom", String(nav.domContentLoadedEventEnd));
  document.body.appendChild(d);
});
</script>
"""
_TIMING_RE = re.compile(r'id="sknpeff-timing" data-load="([0-9.]+)" data-dom="([0-9.]+)"')


def dump_dom_with(
    binary: str, html_path, script: str, *, virtual_time: bool = True, timeout: float = 60.0
) -> str:
    """The DOM of a copy of ``html_path`` with ``script`` appended to its body, once loaded.

    The copy sits beside the page (``<stem>.probe.html``), so its relative links resolve
    as the page's do. ``virtual_time`` lets timers run to completion quickly; leave it off
    when measuring real time.
    """
    html_path = Path(html_path)
    text = html_path.read_text(encoding="utf-8")
    probe_path = html_path.with_name(html_path.stem + ".probe.html")
    probe_path.write_text(text.replace("</body>", script + "</body>"), encoding="utf-8")
    try:
        args = ["--virtual-time-budget=10000"] if virtual_time else []
        proc = _run(binary, [*args, "--dump-dom", probe_path.resolve().as_uri()], timeout)
    finally:
        probe_path.unlink()
    if not proc.stdout:
        raise RuntimeError(
            f"nothing dumped (exit {proc.returncode}); stderr tail: {proc.stderr[-2000:]}"
        )
    return proc.stdout


def load_timing(binary: str, html_path, timeout: float = 60.0) -> tuple[float, float]:
    """Milliseconds from navigation start to (load event, DOMContentLoaded end) of a page,
    as the page's Navigation Timing reports them in headless Chromium."""
    dom = dump_dom_with(binary, html_path, _TIMING_PROBE, virtual_time=False, timeout=timeout)
    match = _TIMING_RE.search(dom)
    if match is None:
        raise RuntimeError("timing probe not found in the dumped DOM")
    return float(match.group(1)), float(match.group(2))


def count_decoded_images(binary: str, html_path, timeout: float = 60.0) -> tuple[int, int]:
    """Load a copy of ``html_path`` with an image probe; return (n_images, n_decoded)."""
    dom = dump_dom_with(binary, html_path, _IMAGE_PROBE, timeout=timeout)
    match = _PROBE_RE.search(dom)
    if match is None:
        raise RuntimeError("image probe not found in the dumped DOM")
    return int(match.group(1)), int(match.group(2))


def screenshot(
    binary: str,
    html_path,
    png_path,
    *,
    width: int = 1280,
    height: int = 2000,
    timeout: float = 60.0,
) -> Path:
    """Save a screenshot of ``html_path`` to ``png_path`` and return its path."""
    png_path = Path(png_path).resolve()
    proc = _run(
        binary,
        [
            f"--screenshot={png_path}",
            f"--window-size={width},{height}",
            "--virtual-time-budget=10000",
            Path(html_path).resolve().as_uri(),
        ],
        timeout,
    )
    if not png_path.exists() or png_path.stat().st_size == 0:
        raise RuntimeError(
            f"no screenshot written (exit {proc.returncode}); stderr: {proc.stderr[-2000:]}"
        )
    return png_path
