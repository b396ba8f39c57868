"""index.html in a real browser: headless Chromium (Debian's `chromium`, which `make test` installs)
renders the report of a real sweep, with no network: the page must hold its tables and images
itself, and the browser's own net log must show no request made by the page."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
CHROMIUM = shutil.which("chromium") or ("/usr/lib/chromium/chromium" if Path("/usr/lib/chromium/chromium").exists() else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio",
         "--hide-scrollbars", "--force-device-scale-factor=1", "--disable-features=NetworkTimeServiceQuerying",
         "--host-resolver-rules=MAP * ~NOTFOUND"]  # any host name or IP fails to resolve: nothing can leave

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")


def page_requests(netlog: Path) -> list[str]:
    """URLs the page asked for, from Chromium's net log. Chromium's own background requests carry
    the initiator 'not an origin'; a page's requests carry its origin ('null' for file://)."""
    text = netlog.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut short lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    return [e["params"]["url"] for e in log["events"]
            if names.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in e.get("params", {})
            and e["params"].get("initiator") != "not an origin"]


def render(html: Path, out: Path, size=(1280, 3000), timeout: int = 90) -> tuple[Path, str, list[str]]:
    """-> (screenshot, the rendered DOM, URLs the page requested). Runs in a fresh network
    namespace when the machine allows it (root), so even a leak could not reach anything."""
    png, netlog = out / "shot.png", out / "netlog.json"
    isolate = shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--screenshot={png}", "--virtual-time-budget=5000", f"--log-net-log={netlog}", "--dump-dom",
               html.resolve().as_uri()]
        if isolate:
            cmd = ["unshare", "-n", *cmd]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            dom, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    assert p.returncode == 0 and png.exists(), f"chromium exit {p.returncode}: {err[-1500:]}"
    return png, dom, page_requests(netlog)


def test_index_html_renders_offline_with_its_tables_and_images(demo_sweep, tmp_path):
    from PIL import Image

    sweep, _ = demo_sweep
    png, dom, requests = render(sweep / "report" / "index.html", tmp_path)
    assert requests == []  # nothing fetched: styles and images are inline
    # the tables, as the browser parsed them
    for cls in ("verdicts", "groups", "comparisons", "config-diff", "runs"):
        assert f'<table class="{cls}">' in dom, cls
    assert dom.count("<tr>") >= 2 + 2 + 1 + 2 + 4
    assert "head=mlp" in dom and any(v in dom for v in ("verified", "partial", "blocked"))
    imgs = dom.count('<img alt="')
    assert imgs >= 3 and dom.count('src="data:image/png;base64,') == imgs
    # the screenshot shows the plots: matplotlib's first two colours are on the page, not just text
    shot = Image.open(png).convert("RGB")
    colours = {c for _, c in shot.getcolors(maxcolors=1 << 20)}
    assert len(colours) > 200
    near = lambda target: any(sum(abs(a - b) for a, b in zip(c, target)) < 40 for c in colours)  # noqa: E731
    assert near((31, 119, 180)) and near((255, 127, 14))  # C0 blue, C1 orange


def test_the_net_log_check_sees_a_request(tmp_path):
    """The offline check above can fail: a page that asks for a remote image shows in the log."""
    page = tmp_path / "leak.html"
    page.write_text('<!doctype html><html><body><table><tr><td>x</td></tr></table>'
                    '<img src="https://example.org/pixel.png"></body></html>')
    _, dom, requests = render(page, tmp_path, size=(400, 300))
    assert "<table>" in dom
    assert requests == ["https://example.org/pixel.png"]
