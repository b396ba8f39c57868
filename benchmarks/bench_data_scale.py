# .venv/bin/python benchmarks/bench_data_scale.py --rounds 2 --sizes-gb 1,8      (smoke check: --quick)
"""Data larger than memory: training on HDF5 read lazily (`data=file data.lazy=true`) at two sizes
on disk, against the same small data in memory (NPZ).

Data: generated here, one HDF5 file per size (`--sizes-gb`, default 1 and 8 GB of tokens_cont:
series of 1,024 steps x 32 channels, float32, 128 KiB a sample), 8 classes of noisy sines, val and
test 512 samples each at every size; the smallest is also converted to an uncompressed NPZ with
`modalign convert` (the in-memory reference). Files live under --dir (default benchmarks/.bench-data,
removed at the end unless --keep).

Runs: `modalign train --quiet data=file data.path=DATA [data.lazy=true] trainer.max_steps=STEPS
trainer.batch_size=64` (the default transformer: patches of 32 steps -> 32 tokens) in a fresh
process each, reaped with os.wait4 for its own peak RSS (ru_maxrss, as GNU `time -v` reports it).
One untimed warm-up run per file fills the text-embedding cache and the cached streamed validation
and fingerprints; then rounds of every configuration in turn, the page cache dropped before each run
where this process may (root): the lazy runs read their batches from the disk, not from memory.
Step time = train_seconds / steps (facts/summary.json).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODALIGN = str(Path(sys.executable).parent / "modalign")
CACHE = common.HERE / ".bench-cache"
T, C = 1024, 32
CLASSES = ["hum", "buzz", "whine", "drone", "chirp", "tick", "rumble", "hiss"]
N_EVAL = 512  # val and test, each, at every size


def generate(path: Path, gigabytes: float) -> int:
    """An HDF5 data set with about `gigabytes` GB of tokens_cont, written in 256 MB chunks. -> N."""
    import h5py

    n = int(gigabytes * 1e9) // (T * C * 4)
    rng = np.random.default_rng(0)
    labels = np.arange(n) % len(CLASSES)
    split = np.array(["train"] * n, dtype=object)
    k = min(N_EVAL, n // 8)  # (smaller only in the --quick smoke check)
    split[0:2 * k:2], split[1:2 * k:2] = "val", "test"
    t = np.arange(T, dtype=np.float32) / T
    with h5py.File(path, "w") as f:
        f.create_dataset("ids", data=np.array([f"s{i:07d}" for i in range(n)], dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("split", data=split, dtype=h5py.string_dtype())
        f.create_dataset("labels", data=labels.astype(np.int64))
        f.create_dataset("label_names", data=np.array(CLASSES, dtype=object), dtype=h5py.string_dtype())
        ds = f.create_dataset("tokens_cont", shape=(n, T, C), dtype=np.float32)
        step = (256 << 20) // (T * C * 4)
        for start in range(0, n, step):
            k = min(n, start + step) - start
            freq = (labels[start:start + k] + 2).astype(np.float32)[:, None, None] * np.arange(1, C + 1, dtype=np.float32)
            x = np.sin(2 * np.pi * freq * t[None, :, None] / 4) + rng.standard_normal((k, T, C), dtype=np.float32)
            ds[start:start + k] = x.astype(np.float32)
    with open(path.with_suffix(".jsonl"), "w") as f:
        for i in range(n):
            name = CLASSES[labels[i]]
            f.write(json.dumps({"id": f"s{i:07d}", "captions": [f"a {name} signal", f"the sound of a {name}"]}) + "\n")
    path.with_suffix(".prompts.json").write_text(json.dumps({c: [f"a {c} signal"] for c in CLASSES}))
    return n


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def one_run(outputs: Path, data: Path, lazy: bool | None, steps: int, env: dict) -> dict:
    before = set((outputs / "runs").iterdir()) if (outputs / "runs").exists() else set()
    args = [MODALIGN, "train", "--quiet", f"outputs={outputs}", "data=file", f"data.path={data}",
            f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", "trainer.batch_size=64"]
    if lazy is not None:
        args.append(f"data.lazy={str(lazy).lower()}")
    m = common.run_measured(args, env=env)
    if m["rc"] != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({m['rc']}):\n{m['stderr'][-3000:]}")
    (run,) = set((outputs / "runs").iterdir()) - before
    summary = json.loads((run / "facts" / "summary.json").read_text())
    info = json.loads((run / "run.json").read_text())
    return {"wall": m["wall"], "rss": m["maxrss_mib"], "majflt": m["majflt"], "s_step": summary["train_seconds"] / summary["steps"],
            "on_disk": info["data"].get("on_disk"), "acc": summary.get("test", {}).get("zeroshot_acc")}


def main() -> int:
    p = common.bench_args(__doc__.split("\n")[0], 2)
    p.add_argument("--sizes-gb", default="1,8", help="sizes of the generated HDF5 files in GB (default 1,8)")
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    p.add_argument("--dir", default=str(common.HERE / ".bench-data"), help="where the generated files go")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    args = p.parse_args()
    sizes = [float(s) for s in args.sizes_gb.split(",")]
    steps = args.steps
    if args.quick:
        sizes, steps, args.rounds = [0.1, 0.3], 10, 1
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MODALIGN_CACHE=str(CACHE), PYTHONWARNINGS="ignore")
    outputs = root / "outputs"
    files, gen_s, ns = {}, {}, {}
    try:
        for gb in sizes:
            path = root / f"scale_{gb:g}gb.h5"
            t0 = time.perf_counter()
            ns[gb] = generate(path, gb)
            gen_s[gb] = time.perf_counter() - t0
            files[gb] = path
            print(f"# generated {path} ({path.stat().st_size / 1e9:.2f} GB, {ns[gb]} samples) in {gen_s[gb]:.0f} s",
                  file=sys.stderr, flush=True)
        small = files[sizes[0]]
        npz = small.with_suffix(".npz")
        m = common.run_measured([MODALIGN, "convert", "--quiet", str(small), str(npz)], env=env)
        if m["rc"] != 0:
            raise RuntimeError(m["stderr"])
        configs = [(f"NPZ, in memory ({sizes[0]:g} GB)", npz, None)] + \
                  [(f"HDF5, on disk ({gb:g} GB)", files[gb], True) for gb in sizes]
        first = {}
        for label, path, lazy in configs:  # warm-up: the text cache, the streamed validation + fingerprints
            print(f"# warm-up: {label}", file=sys.stderr, flush=True)
            drop_caches()
            first[label] = one_run(outputs, path, lazy, 2, env)
        dropped = drop_caches()
        rows: dict[str, list[dict]] = {c[0]: [] for c in configs}
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for label, path, lazy in order:
                print(f"# round {r + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
                drop_caches()
                rows[label].append(one_run(outputs, path, lazy, steps, env))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    common.header("Data larger than memory: HDF5 on disk at two sizes vs NPZ in memory",
                  extra=f"{steps} steps, batch 64, {args.rounds} rounds; page cache dropped before each run: "
                        f"{'yes' if dropped else 'no (not root)'}")
    ref = common.med([x["s_step"] for x in rows[configs[0][0]]])
    lazy_small = common.med([x["rss"] for x in rows[configs[1][0]]])
    table = []
    for label, path, lazy in configs:
        got = rows[label]
        gb = path.stat().st_size / 1e9 if path.exists() else float("nan")
        s = common.med([x["s_step"] for x in got])
        rss = common.med([x["rss"] for x in got])
        table.append([label, f"{ns[sizes[0]] if lazy is None else ns[next(g for g in sizes if files[g] == path)]:,}",
                      "yes" if got[0]["on_disk"] else "no", common.fmt(s, 3), f"{100 * (s / ref - 1):+.1f}%",
                      f"{rss:,.0f}", "" if lazy is None else f"{100 * (rss / lazy_small - 1):+.1f}%",
                      common.fmt(first[label]["wall"], 1), common.fmt(common.med([x["wall"] for x in got]), 1)])
    common.table(["data", "samples", "on disk", "s/step (median)", "vs NPZ in memory", "peak RSS MiB",
                  "RSS vs smallest on disk", "first run s (2 steps)", "run s"], table)
    print("Per round, s/step: " + "; ".join(f"{label}: " + ", ".join(common.fmt(x['s_step'], 3) for x in rows[label])
                                         for label, _, _ in configs))
    print("Per round, peak RSS MiB: " + "; ".join(f"{label}: " + ", ".join(f"{x['rss']:,.0f}" for x in rows[label])
                                               for label, _, _ in configs))
    print(f"\nGenerating the files: {', '.join(f'{g:g} GB {gen_s[g]:.0f} s' for g in sizes)}. The first run on a file "
          "validates it and hashes its splits in one streamed pass (cached by file size + mtime); later runs skip it.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
