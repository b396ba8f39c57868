"""`modalign serve [ROOT] [--port N]`: a local, read-only web view over an outputs root.

    /                       the runs table (filter, sort, status; a running run's last step and ETA)
    /run/<path>             a run: status, config, curves drawn from metrics.jsonl, figures, card,
                            predictions where the recipe writes them
    /sweep/<path>           a sweep: its jobs done / running / failed, its report
    /files/<path>           a file under ROOT (figures, reports, cards), nothing else

Pages refresh themselves while something under them runs. The server binds to 127.0.0.1 unless told
otherwise, answers GET and HEAD only, writes nothing, and serves only files under ROOT: a path with
`..`, an absolute path, or a symlink that leads out of ROOT is refused (403), a missing one is 404.
Torn metrics lines and half-written run directories are shown as far as they can be read. Templates
are Jinja2 with autoescaping. Standard library HTTP (ThreadingHTTPServer); no torch.
"""

from __future__ import annotations

import html
import json
import logging
import math
import mimetypes
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

log = logging.getLogger("modalign")
TEMPLATES = Path(__file__).resolve().parent / "templates"
REFRESH_S = 5
STALE_S = 600  # a `running` run with no new point for this long is shown as possibly dead


class Refused(Exception):
    def __init__(self, status: HTTPStatus, why: str):
        super().__init__(why)
        self.status = status


def safe_path(root: Path, rel: str) -> Path:
    """The file or folder `rel` (URL-decoded, relative to `root`) -> its resolved path inside root.
    Refuses (403) absolute paths, `..` parts, and anything that resolves out of root (symlinks)."""
    if "\x00" in rel:
        raise Refused(HTTPStatus.BAD_REQUEST, "bad path")
    parts = Path(rel).parts
    if rel.startswith(("/", "\\")) or Path(rel).is_absolute() or ".." in parts:
        raise Refused(HTTPStatus.FORBIDDEN, "outside the served root")
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise Refused(HTTPStatus.FORBIDDEN, "outside the served root")
    if not target.exists():
        raise Refused(HTTPStatus.NOT_FOUND, "no such file")
    return target


# --- reading run directories (tolerant: a half-written one is shown as far as it goes) --------


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def _yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's complete, well-formed lines (a torn or foreign line is skipped)."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int) and isinstance(r.get("value"), (int, float)) \
                and isinstance(r.get("name"), str) and isinstance(r.get("split"), str):
            rows.append(r)
    return rows


@dataclass
class RunView:
    rel: str  # path relative to the root, with /
    info: dict
    config: dict
    rows: list[dict]
    summary: dict | None

    @property
    def status(self) -> str:
        return str(self.info.get("status", "?"))

    @property
    def recipe(self) -> str:
        return str(self.info.get("recipe") or "")

    @property
    def variant(self) -> str:
        v = self.info.get("variant") or {}
        return str(v.get("name") or "") if isinstance(v, dict) else ""

    @property
    def max_steps(self) -> int | None:
        t = self.config.get("trainer") if isinstance(self.config, dict) else None
        v = t.get("max_steps") if isinstance(t, dict) else None
        return v if isinstance(v, int) else None

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.rows if r["split"] in ("train", "val")]
        return max(steps) if steps else None

    def progress(self) -> dict:
        """{step, max, eta_s, idle_s}: for a running run, its rate over its last points."""
        train = [r for r in self.rows if r["split"] == "train" and isinstance(r.get("time"), (int, float))]
        out = {"step": self.last_step, "max": self.max_steps, "eta_s": None, "idle_s": None}
        if train:
            out["idle_s"] = max(0.0, time.time() - train[-1]["time"])
            by_step = {}
            for r in train:
                by_step.setdefault(r["step"], r["time"])
            steps = sorted(by_step)[-50:]
            if len(steps) >= 2 and self.max_steps and by_step[steps[-1]] > by_step[steps[0]]:
                rate = (steps[-1] - steps[0]) / (by_step[steps[-1]] - by_step[steps[0]])
                out["eta_s"] = max(0.0, (self.max_steps - steps[-1]) / rate)
        return out

    def headline(self) -> list[tuple[str, float]]:
        test = (self.summary or {}).get("test") or {}
        keys = [k for k in ("m2t_R@1", "zeroshot_acc", "cider_d", "bleu_4", "rec_tokens", "t2m_R@1") if k in test]
        return [(k, test[k]) for k in keys[:3] if isinstance(test[k], (int, float))]


def read_run(root: Path, path: Path) -> RunView | None:
    info = _json(path / "run.json")
    if info is None:
        return None
    config = _yaml(path / "cfg.yaml")
    return RunView(rel=path.relative_to(root).as_posix(), info=info, config=config if isinstance(config, dict) else {},
                   rows=read_metrics(path / "metrics.jsonl"), summary=_json(path / "facts" / "summary.json"))


def find_run_dirs(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("run.json")):
        d = p.parent
        try:  # a run.json reached through a symlink out of root is not ours to show
            d.resolve().relative_to(root)
        except ValueError:
            continue
        out.append(d)
    return out


def find_sweeps(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("sweep.yaml") if p.parent.resolve().is_relative_to(root))


# --- curves as inline SVG ---------------------------------------------------------------------


def svg_curve(title: str, series: dict[str, list[tuple[int, float]]], width: int = 420, height: int = 180) -> str:
    """A small line chart (one polyline per series) as SVG markup; values are numbers we drew."""
    pts = [(s, v) for values in series.values() for s, v in values if math.isfinite(v)]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    pad_l, pad_r, pad_t, pad_b = 48, 10, 22, 22
    sx = lambda s: pad_l + (s - x0) / (x1 - x0) * (width - pad_l - pad_r)  # noqa: E731
    sy = lambda v: height - pad_b - (v - y0) / (y1 - y0) * (height - pad_t - pad_b)  # noqa: E731
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    parts = [f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{pad_l}" y="14" font-size="12">{html.escape(title)}</text>',
             f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#999"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#999"/>',
             f'<text x="2" y="{pad_t + 8}" font-size="10">{y1:.3g}</text>',
             f'<text x="2" y="{height - pad_b}" font-size="10">{y0:.3g}</text>',
             f'<text x="{pad_l}" y="{height - 6}" font-size="10">{x0}</text>',
             f'<text x="{width - pad_r - 30}" y="{height - 6}" font-size="10">{x1}</text>']
    for i, (name, values) in enumerate(series.items()):
        good = [(s, v) for s, v in values if math.isfinite(v)]
        if not good:
            continue
        c = colours[i % len(colours)]
        coords = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in good)
        parts.append(f'<polyline class="series" data-name="{html.escape(name)}" fill="none" stroke="{c}" '
                     f'stroke-width="1.5" points="{coords}"/>')
        parts.append(f'<text x="{width - pad_r - 150}" y="{pad_t + 12 * (i + 1)}" font-size="10" fill="{c}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def curves(rows: list[dict]) -> list[str]:
    """The train loss terms in one chart; each validation metric in its own (up to 8)."""
    train: dict[str, list] = {}
    val: dict[str, list] = {}
    for r in rows:
        if r["split"] == "train" and (r["name"] == "loss" or r["name"] in ("xe", "clip", "siglip", "contrastive")):
            train.setdefault(r["name"], []).append((r["step"], float(r["value"])))
        elif r["split"] == "val" and not r["name"].endswith("seconds"):
            val.setdefault(r["name"], []).append((r["step"], float(r["value"])))
    charts = [svg_curve("train loss", train)] if train else []
    charts += [svg_curve(f"val/{k}", {k: v}) for k, v in list(val.items())[:8]]
    return [c for c in charts if c]


# --- the app ----------------------------------------------------------------------------------


def _environment():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2"]),
                      auto_reload=False)
    env.filters["num"] = lambda v: (f"{v:.4g}" if isinstance(v, float) else str(v)) if v is not None else "—"
    env.filters["duration"] = _duration
    env.filters["quote"] = lambda s: urllib.parse.quote(s)
    return env


def _duration(seconds) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


SORTS = {"run": lambda r: r.rel, "status": lambda r: r.status, "recipe": lambda r: r.recipe,
         "created": lambda r: str(r.info.get("created_at") or ""), "step": lambda r: r.last_step or -1}


class App:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.env = _environment()

    def page(self, name: str, **kw) -> bytes:
        return self.env.get_template(name).render(root=str(self.root), **kw).encode("utf-8")

    def index(self, query: dict) -> bytes:
        runs = [v for v in (read_run(self.root, d) for d in find_run_dirs(self.root)) if v is not None]
        text = (query.get("q") or [""])[0].strip().lower()
        status = (query.get("status") or [""])[0]
        if text:
            runs = [r for r in runs if text in " ".join((r.rel, r.recipe, r.status, r.variant)).lower()]
        if status:
            runs = [r for r in runs if r.status == status]
        sort = (query.get("sort") or ["created"])[0]
        desc = (query.get("order") or ["desc" if sort == "created" else "asc"])[0] == "desc"
        runs.sort(key=SORTS.get(sort, SORTS["created"]), reverse=desc)
        sweeps = []
        for d in find_sweeps(self.root):
            info = _yaml(d / "sweep.yaml")
            sweeps.append({"rel": d.relative_to(self.root).as_posix(),
                           "status": info.get("status", "?") if isinstance(info, dict) else "?"})
        running = any(r.status == "running" for r in runs)
        return self.page("index.html.j2", runs=runs, sweeps=sweeps, q=text, status=status, sort=sort, desc=desc,
                         refresh=REFRESH_S if running else None, statuses=sorted({r.status for r in runs}),
                         sorts=list(SORTS))

    def run(self, rel: str) -> bytes:
        path = safe_path(self.root, rel)
        view = read_run(self.root, path) if path.is_dir() else None
        if view is None:
            raise Refused(HTTPStatus.NOT_FOUND, "not a run directory (no readable run.json)")
        figures = sorted(p.relative_to(self.root).as_posix() for p in (path / "figures").glob("*.png"))
        card = (path / "card.md").read_text(encoding="utf-8", errors="replace") if (path / "card.md").exists() else None
        config = (path / "cfg.yaml").read_text(encoding="utf-8", errors="replace") if (path / "cfg.yaml").exists() else None
        predictions = []
        for f in sorted((path / "facts").glob("predictions*.jsonl")):
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines()[:20]:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict):
                    refs = r.get("references") or []
                    predictions.append({"id": r.get("id"), "prediction": r.get("prediction"),
                                        "reference": refs[0] if refs else ""})
            break
        return self.page("run.html.j2", run=view, progress=view.progress(), charts=curves(view.rows),
                         figures=figures, card=card, config=config, predictions=predictions,
                         refresh=REFRESH_S if view.status == "running" else None, stale_s=STALE_S)

    def sweep(self, rel: str) -> bytes:
        path = safe_path(self.root, rel)
        info = _yaml(path / "sweep.yaml") if path.is_dir() else None
        if not isinstance(info, dict):
            raise Refused(HTTPStatus.NOT_FOUND, "not a sweep directory (no readable sweep.yaml)")
        jobs = []
        for d in sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
            view = read_run(self.root, d)
            overrides = _yaml(d / "overrides.yaml")
            jobs.append({"num": int(d.name), "view": view, "status": view.status if view else "pending",
                         "overrides": " ".join(map(str, overrides)) if isinstance(overrides, list) else "",
                         "progress": view.progress() if view else None})
        counts = {s: sum(1 for j in jobs if j["status"] == s) for s in ("completed", "running", "failed", "interrupted")}
        n = int(info.get("n_jobs") or len(jobs))
        counts["pending"] = max(0, n - len([j for j in jobs if j["view"] is not None]))
        report = path / "report" / "index.html"
        live = info.get("status") == "running" or counts["running"] > 0
        return self.page("sweep.html.j2", rel=rel, info=info, jobs=jobs, counts=counts, n_jobs=n,
                         report=report.relative_to(self.root).as_posix() if report.exists() else None,
                         refresh=REFRESH_S if live else None)


class Handler(BaseHTTPRequestHandler):
    server_version = "modalign-serve"
    app: App  # set on the class made by make_server

    def log_message(self, fmt, *args):  # requests go to the modalign logger, not stderr
        log.debug("serve: " + fmt, *args)

    def _send(self, status: HTTPStatus, body: bytes, ctype: str = "text/html; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; img-src 'self'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, why: str) -> None:
        body = self.app.page("error.html.j2", status=int(status), phrase=status.phrase, why=why)
        self._send(status, body)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        raw = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(raw.path)
        query = urllib.parse.parse_qs(raw.query)
        try:
            if path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, self.app.index(query))
            for prefix, page in (("/run/", self.app.run), ("/sweep/", self.app.sweep)):
                if path.startswith(prefix):
                    return self._send(HTTPStatus.OK, page(path[len(prefix):].rstrip("/")))
            if path.startswith("/files/"):
                target = safe_path(self.app.root, path[len("/files/"):])
                if not target.is_file():
                    raise Refused(HTTPStatus.NOT_FOUND, "not a file")
                ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                if target.suffix in (".md", ".jsonl", ".yaml", ".log", ".json"):
                    ctype = "text/plain; charset=utf-8"
                return self._send(HTTPStatus.OK, target.read_bytes(), ctype)
            raise Refused(HTTPStatus.NOT_FOUND, "no such page")
        except Refused as e:
            return self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            return None
        except Exception as e:  # a page that cannot be drawn is one error page, never a dead server
            log.warning("serve: %s failed: %s: %s", self.path, type(e).__name__, e)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}")

    do_HEAD = do_GET

    def _read_only(self):
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "read-only: GET and HEAD only")

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    app = App(root)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_forever(server: ThreadingHTTPServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return t
