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
One untimed warm-up run per configuration fills the text-embedding cache and the cached streamed
validation and fingerprints; then rounds of every configuration in turn, the page cache dropped
before each run where this process may (root): the cold runs read their batches from the disk. The
smallest file also runs warm (read once into the page cache before the run, as the OS leaves a
file that fits in memory after its first use).
Step time: steady state, from the train log times of step 10 and of the last step in
metrics.jsonl (the first batches' cold reads and the final validation left out), and whole:
train_seconds / steps (facts/summary.json: every step, the validation and the checkpoint).
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
STEADY_FROM = 10  # steady-state step time: from this step to the last


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


def steps_worker(npz: str, h5: str, rounds: int, block: int) -> dict:
    """Step time side by side in one process: two recipes on the same data (NPZ in memory, HDF5 on
    disk), blocks of `block` steps alternating; the HDF5 blocks cold (page cache dropped) and warm."""
    import time

    from bench_step import build_recipe

    common_args = ["trainer.batch_size=64", "trainer.max_steps=100000", "trainer.eval_every=100000"]
    root = str(Path(npz).parent / "outputs-steps")
    memory = build_recipe(["data=file", f"data.path={npz}", *common_args], root)
    disk = build_recipe(["data=file", f"data.path={h5}", "data.lazy=true", *common_args], root)
    assert not memory.data.lazy and disk.data.lazy
    for r in (memory, disk):
        for _ in range(3):
            r.trainer._train_step()
    out: dict[str, list[float]] = {"memory": [], "disk, warm": [], "disk, cold": []}
    for i in range(rounds):
        order = list(out) if i % 2 == 0 else list(out)[::-1]
        for name in order:
            drop_caches()
            if name == "disk, warm":
                with open(h5, "rb") as f:
                    while f.read(64 << 20):
                        pass
            r = memory if name == "memory" else disk
            t0 = time.perf_counter()
            for _ in range(block):
                r.trainer._train_step()
            out[name].append((time.perf_counter() - t0) / block)
    disk.sampler.close()
    return out


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
            f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", "trainer.batch_size=64",
            f"trainer.log_every={STEADY_FROM if steps > STEADY_FROM else 1}"]
    if lazy is not None:
        args.append(f"data.lazy={str(lazy).lower()}")
    m = common.run_measured(args, env=env)
    if m["rc"] != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({m['rc']}):\n{m['stderr'][-3000:]}")
    (run,) = set((outputs / "runs").iterdir()) - before
    summary = json.loads((run / "facts" / "summary.json").read_text())
    info = json.loads((run / "run.json").read_text())
    # steady state: the train log times of step STEADY_FROM and of the last step (logged before the
    # final validation), so neither the first batches' cold reads nor the evaluation count
    times = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train":
            times.setdefault(row["step"], row["time"])
    lo = STEADY_FROM if steps > STEADY_FROM else 1
    steady = (times[steps] - times[lo]) / (steps - lo)
    return {"wall": m["wall"], "rss": m["maxrss_mib"], "majflt": m["majflt"], "steady": steady,
            "s_step": summary["train_seconds"] / summary["steps"],
            "on_disk": info["data"].get("on_disk"), "acc": summary.get("test", {}).get("zeroshot_acc")}


def main() -> int:
    p = common.bench_args(__doc__.split("\n")[0], 2)
    p.add_argument("--sizes-gb", default="1,8", help="sizes of the generated HDF5 files in GB (default 1,8)")
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    p.add_argument("--dir", default=str(common.HERE / ".bench-data"), help="where the generated files go")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--block", type=int, default=20, help="steps per timed block of the side-by-side step time")
    p.add_argument("--steps-worker", nargs=2, metavar=("NPZ", "H5"), help="(internal) the side-by-side step time")
    args = p.parse_args()
    if args.steps_worker:
        print(json.dumps(steps_worker(*args.steps_worker, rounds=2 * args.rounds, block=args.block)))
        return 0
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
        # (label, file, data.lazy, page cache: cold = dropped before the run, warm = the file read first)
        configs = [(f"NPZ, in memory ({sizes[0]:g} GB)", npz, None, "cold"),
                   (f"HDF5, on disk ({sizes[0]:g} GB), warm page cache", small, True, "warm")] + \
                  [(f"HDF5, on disk ({gb:g} GB)", files[gb], True, "cold") for gb in sizes]
        first = {}
        for label, path, lazy, _ in configs:  # warm-up: the text cache, the streamed validation + fingerprints
            print(f"# warm-up: {label}", file=sys.stderr, flush=True)
            drop_caches()
            first[label] = one_run(outputs, path, lazy, 2, env)
        dropped = drop_caches()
        print("# step time side by side in one process", file=sys.stderr, flush=True)
        side = common.run_worker([__file__, "--steps-worker", str(npz), str(small), "--rounds", str(args.rounds),
                                  "--block", str(5 if args.quick else args.block)], env_extra={"MODALIGN_CACHE": str(CACHE)})
        rows: dict[str, list[dict]] = {c[0]: [] for c in configs}
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for label, path, lazy, cache in order:
                print(f"# round {r + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
                drop_caches()
                if cache == "warm":
                    with open(path, "rb") as f:
                        while f.read(64 << 20):
                            pass
                rows[label].append(one_run(outputs, path, lazy, steps, env))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    common.header("Data larger than memory: HDF5 on disk at two sizes vs NPZ in memory",
                  extra=f"{steps} steps, batch 64, {args.rounds} rounds; page cache dropped before each run: "
                        f"{'yes' if dropped else 'no (not root)'}")
    blocks = {k: v for k, v in side.items() if isinstance(v, list)}
    ref_side = common.med(blocks["memory"])
    print(f"Step time side by side, in one process (the same {sizes[0]:g} GB of data, two recipes, blocks of "
          f"{5 if args.quick else args.block} steps alternating, {2 * args.rounds} blocks each; cold = page cache dropped "
          "before the block):\n")
    common.table(["data", "s/step min", "s/step median", "vs NPZ in memory (median)", "blocks"],
                  [[{"memory": "NPZ, in memory", "disk, warm": "HDF5, on disk, warm page cache",
                     "disk, cold": "HDF5, on disk, cold page cache"}[k], common.fmt(min(v), 4), common.fmt(common.med(v), 4),
                    f"{100 * (common.med(v) / ref_side - 1):+.1f}%", ", ".join(common.fmt(x, 3) for x in v)]
                   for k, v in blocks.items()])
    print("Each configuration in a run of its own (`modalign train`, a fresh process; peak RSS is the process's):\n")
    ref = common.med([x["steady"] for x in rows[configs[0][0]]])
    ref_all = common.med([x["s_step"] for x in rows[configs[0][0]]])
    lazy_small = common.med([x["rss"] for x in rows[configs[2][0]]])
    table = []
    for label, path, lazy, _ in configs:
        got = rows[label]
        s = common.med([x["steady"] for x in got])
        s_all = common.med([x["s_step"] for x in got])
        rss = common.med([x["rss"] for x in got])
        table.append([label, f"{ns[sizes[0]] if lazy is None else ns[next(g for g in sizes if files[g] == path)]:,}",
                      "yes" if got[0]["on_disk"] else "no", common.fmt(s, 3), f"{100 * (s / ref - 1):+.1f}%",
                      common.fmt(s_all, 3), f"{100 * (s_all / ref_all - 1):+.1f}%",
                      f"{rss:,.0f}", "" if lazy is None else f"{100 * (rss / lazy_small - 1):+.1f}%",
                      common.fmt(first[label]["wall"], 1), common.fmt(common.med([x["wall"] for x in got]), 1)])
    common.table(["data", "samples", "on disk", f"s/step, steps {STEADY_FROM if steps > STEADY_FROM else 1}-{steps}", "vs NPZ in memory",
                  "train_seconds / steps", "vs NPZ", "peak RSS MiB",
                  "RSS vs smallest on disk (cold)", "first run s (2 steps)", "run s"], table)
    print("Per round, s/step (steady): " + "; ".join(f"{label}: " + ", ".join(common.fmt(x['steady'], 3) for x in rows[label])
                                         for label, *_ in configs))
    print("Per round, peak RSS MiB: " + "; ".join(f"{label}: " + ", ".join(f"{x['rss']:,.0f}" for x in rows[label])
                                               for label, *_ in configs))
    print(f"\nGenerating the files: {', '.join(f'{g:g} GB {gen_s[g]:.0f} s' for g in sizes)}. The first run on a file "
          "validates it and hashes its splits in one streamed pass (cached by file size + mtime); later runs skip it.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
