"""`modalign serve`: the real server in its own process over a copy of a real sweep's outputs, with
a running run, a torn metrics line and half-written run directories added; pages rendered in
headless Chromium; traversal attempts sent byte for byte (http.client does not normalise paths)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from test_report_browser import CHROMIUM, FLAGS


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_sweep):
    """(base URL, root, the files before) of `modalign serve ROOT --port 0`, stopped afterwards."""
    base = tmp_path_factory.mktemp("serve")
    root = base / "outputs"
    shutil.copytree(demo_sweep[0].parent.parent, root)
    sweep = next((root / "experiments").iterdir())
    job = sweep / "0"
    # a run still running: status running, its last point just now, and a line torn by a kill
    running = root / "runs" / "20261129-120000_align_live"
    shutil.copytree(job, running)
    info = json.loads((running / "run.json").read_text())
    info.update(status="running", finished_at=None)
    (running / "run.json").write_text(json.dumps(info))
    rows = [json.loads(line) for line in (running / "metrics.jsonl").read_text().splitlines()]
    now = time.time()
    with open(running / "metrics.jsonl", "w") as f:
        for r in rows:
            if r["split"] in ("train", "val"):
                r["time"] = now - 60 + r["step"] * 0.1
                f.write(json.dumps(r) + "\n")
        f.write('{"step": 99, "split": "train", "na')  # torn
    (running / "facts" / "summary.json").unlink()
    # half-written run directories: a run.json cut short, and a run dir with run.json only
    (root / "runs" / "broken").mkdir()
    (root / "runs" / "broken" / "run.json").write_text('{"id": "bro')
    (root / "runs" / "bare").mkdir()
    (root / "runs" / "bare" / "run.json").write_text(json.dumps({"id": "bare", "status": "running"}))
    # a symlink inside the root that leads out of it
    outside = base / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("do not serve")
    (root / "runs" / "escape").symlink_to(outside, target_is_directory=True)
    # the sweep, caught while it runs: its last job still running, sweep.yaml not yet final
    last = max((d for d in sweep.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    info = json.loads((last / "run.json").read_text())
    info.update(status="running", finished_at=None)
    (last / "run.json").write_text(json.dumps(info))
    text = (sweep / "sweep.yaml").read_text()
    (sweep / "sweep.yaml").write_text(text.replace("status: completed", "status: running", 1))
    before = snapshot(root)
    proc = subprocess.Popen([sys.executable, "-m", "modalign", "serve", str(root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    url = line.split()[2].rstrip("/")
    yield url, root, before, running
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def get(url: str, path: str, method: str = "GET") -> tuple[int, str]:
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.putrequest(method, path, skip_accept_encoding=True)  # the path goes out exactly as written
    c.endheaders()
    r = c.getresponse()
    body = r.read().decode("utf-8", "replace")
    c.close()
    return r.status, body


def dom(url: str, screenshot: Path | None = None) -> str:
    # the report test's flags, except that the served address resolves (every other host still fails)
    flags = [f for f in FLAGS if not f.startswith("--host-resolver-rules")] + [
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
    shot = [f"--screenshot={screenshot}", "--window-size=1280,900"] if screenshot else []
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        p = subprocess.run([CHROMIUM, *flags, *shot, f"--user-data-dir={profile}", "--virtual-time-budget=3000",
                            "--dump-dom", url], capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr[-1500:]
    return p.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_the_runs_table_and_a_run_page_with_its_curves_render_in_chromium(served):
    url, root, _, running = served
    page = dom(url + "/")
    assert '<table class="runs">' in page
    n_runs = sum(1 for p in root.rglob("run.json") if p.resolve().is_relative_to(root.resolve()))
    assert page.count("/run/") >= n_runs - 1  # every readable run is a row (the cut-short run.json is not)
    assert 'class="status-running"' in page and 'class="status-completed"' in page
    live = page[page.index("20261129-120000_align_live"):]
    assert "/ " in live[:400]  # step / max_steps for the running run
    assert '<meta http-equiv="refresh"' in page  # something runs: the page refreshes itself
    rel = next((root / "experiments").iterdir()).relative_to(root).as_posix() + "/0"
    run_page = dom(f"{url}/run/{rel}")
    assert run_page.count('<svg class="curve"') >= 2 and "<polyline" in run_page
    assert 'data-name="loss"' in run_page and '<img class="figure"' in run_page and '<pre class="config">' in run_page
    assert '<meta http-equiv="refresh"' not in run_page  # a completed run does not refresh


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_a_sweep_that_runs_is_shown_live_in_a_chromium_screenshot(served, tmp_path):
    from PIL import Image

    url, root, *_ = served
    sweep = next((root / "experiments").iterdir())
    png = tmp_path / "sweep.png"
    page = dom(f"{url}/sweep/{sweep.relative_to(root).as_posix()}", screenshot=png)
    n = len([d for d in sweep.iterdir() if d.name.isdigit()])
    assert f"{n} jobs: {n - 1} done, 1 running" in page and '<meta http-equiv="refresh"' in page
    assert page.count('class="status-running"') == 2  # the running job, and the sweep's own status
    assert '<table class="jobs">' in page and page.count("<tr>") == n + 1
    shot = Image.open(png).convert("RGB")
    colours = {c for _, c in shot.getcolors(maxcolors=1 << 20)}
    assert len(colours) > 20  # text drawn, not a blank page
    assert any(sum(abs(a - b) for a, b in zip(c, (176, 109, 0))) < 60 for c in colours)  # the running job's amber


def test_pages_survive_torn_lines_and_half_written_runs_and_sweeps_show_their_jobs(served):
    url, root, _, running = served
    status, body = get(url, "/run/" + running.relative_to(root).as_posix())
    assert status == 200 and "ETA" in body and "status-running" in body
    assert get(url, "/run/runs/bare")[0] == 200
    assert get(url, "/run/runs/broken")[0] == 404  # run.json cut short: not a run page, not a crash
    sweep = next((root / "experiments").iterdir())
    status, body = get(url, "/sweep/" + sweep.relative_to(root).as_posix())
    n = len([d for d in sweep.iterdir() if d.name.isdigit()])
    assert status == 200 and f"{n - 1} done, 1 running" in body and "report</a>" in body
    assert get(url, "/?q=live&status=running")[1].count("/run/") == 1
    assert get(url, "/files/" + sweep.relative_to(root).as_posix() + "/report/index.html")[0] == 200


@pytest.mark.parametrize("path", [
    "/files/../secret/key.txt", "/files/runs/../../secret/key.txt", "/files/%2e%2e/secret/key.txt",
    "/files/runs/%2E%2E/%2E%2E/secret/key.txt", "/files//etc/passwd", "/files/%2Fetc%2Fpasswd",
    "/files/runs/escape/key.txt", "/run/../..", "/run/%2e%2e", "/sweep/runs/escape",
], ids=["dotdot", "nested-dotdot", "encoded", "encoded-upper", "absolute", "encoded-absolute", "symlink-out",
        "run-dotdot", "run-encoded", "sweep-symlink"])
def test_paths_out_of_the_root_are_refused(served, path):
    url, *_ = served
    status, body = get(url, path)
    assert status in (403, 404) and "do not serve" not in body and "root:" not in body, (status, body[:200])


def test_it_is_read_only_bound_to_localhost_and_stays_up_under_concurrent_requests(served):
    url, root, before, _ = served
    assert url.startswith("http://127.0.0.1:")
    assert get(url, "/", "POST")[0] == 405 and get(url, "/files/runs", "DELETE")[0] == 405
    paths = ["/", "/?sort=status", "/run/runs/bare", "/files/../x", "/nope"] + [
        "/run/" + d.relative_to(root).as_posix() for d in sorted((root / "experiments").rglob("run.json"))[:3]]
    paths = [p if not p.endswith("run.json") else p.rsplit("/", 1)[0] for p in paths]
    errors: list = []

    def client(k: int):
        for i in range(15):
            try:
                status, _ = get(url, paths[(k + i) % len(paths)])
                if status >= 500:
                    errors.append(status)
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and get(url, "/")[0] == 200
    assert snapshot(root) == before  # it wrote nothing


def test_another_address_is_bound_only_when_asked_and_with_a_warning(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "modalign", "serve", str(tmp_path), "--port", "0",
                             "--host", "0.0.0.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "http://0.0.0.0:" in line
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "warning: serving on 0.0.0.0" in err
    p = subprocess.run([sys.executable, "-m", "modalign", "serve", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == f"modalign: error: serve: {tmp_path / 'nope'}: no such directory " \
                                                     "(an outputs root, e.g. outputs)"
