"""Success criteria as data: bands on a metric -> a verdict and the next step. No torch.

An experiment config may carry

    criteria:
      metric: test/m2t_R@1
      bands:
        - {min: 0.6, verdict: verified, next: "proceed to stage 3"}
        - {min: 0.3, verdict: partial, next: "train longer, then re-run"}
        - {verdict: blocked, next: "check the logs"}          # no min: everything below

A criterion may also be relative to a baseline group of the same report (the data-only floor, the
model before a change):

    criteria:
      metric: test/cider_d
      bands: [...]
      relative:
        baseline: fusion=none       # the group label, as the report prints it
        alpha: 0.01                 # the paired bootstrap's p-value must be below this
        verdict: blocked            # what a group that does not clear the baseline gets instead
        next: "the modality adds nothing over the data-only floor: check the projector's norm ratio"

A group clears the baseline when the paired difference (per-example scores, matched seeds) has its
95% CI on the better side of 0 and p < alpha; otherwise its verdict is the relative verdict,
whatever its band. The baseline group itself gets the verdict `baseline`.

A p-value on the metric alone can pass a degenerate model (two distinct captions for 300 inputs, one
of which names a common class, beat the floor at p < 0.001). `require` lists what every completed
run of a group must also show, each with the verdict a group that misses it gets instead:

    criteria:
      ...
      require:
        - {check: modality_used, verdict: blocked, next: "the LM ignores the modality: ..."}   # a health check that passed
        - {metric: test/distinct_preds, min: 0.5, verdict: blocked, next: "..."}              # a metric's bound

A group misses a requirement when any of its completed runs does (a check that failed, was skipped
or was never evaluated; a metric outside its bound or absent). The baseline of `relative` is exempt.

A band holds values >= its `min`; the band without `min` (at most one) catches the rest. For a
metric where smaller is better, write `max` instead of `min` in every band.

The verdict is judged on the 95% CI over seeds, not on the mean alone: when the whole interval lies
in one band, that band is the verdict. When the interval straddles a threshold the verdict is the
less favourable band the interval reaches (the lower one for a larger-is-better metric), and the
verdict says so and names the threshold: moving on to the next phase on the strength of a mean
whose interval still reaches the band below is how a week of compute gets spent on a result
that does not reproduce. With one run there is no interval; the verdict says that too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modalign.errors import UserError


@dataclass(frozen=True)
class Band:
    bound: float | None  # min (or max when smaller is better); None = the catch-all band
    verdict: str
    next: str


@dataclass(frozen=True)
class Relative:
    baseline: str  # a group label
    alpha: float
    verdict: str
    next: str


@dataclass(frozen=True)
class Requirement:
    check: str | None  # a health check every run must have passed
    metric: str | None  # or a metric every run must have within `bound`
    bound: float | None
    smaller: bool  # True: the bound is a max
    verdict: str
    next: str

    def describe(self) -> str:
        if self.check is not None:
            return f"health check {self.check} passes"
        return f"{self.metric} {'<=' if self.smaller else '>='} {self.bound:g}"

    def missed(self, runs) -> str | None:
        """Why `runs` (RunRecords, completed) miss this requirement, or None when every one meets it."""
        if not runs:
            return "no completed run"
        for r in runs:
            name = r.path.name if hasattr(r.path, "name") else str(r.path)
            if self.check is not None:
                status = next((c.get("status") for c in r.info.get("checks") or [] if c.get("name") == self.check), None)
                if status != "pass":
                    return f"{self.check} {status or 'not evaluated'} in {name}"
            else:
                v = r.metric(self.metric)
                if v is None or not math.isfinite(v):
                    return f"{self.metric} missing in {name}"
                if (v > self.bound) if self.smaller else (v < self.bound):
                    return f"{self.metric} {v:.4g} in {name}"
        return None


@dataclass(frozen=True)
class Criteria:
    metric: str
    bands: tuple[Band, ...]  # most favourable first; the catch-all (if any) last
    smaller_is_better: bool = False
    relative: Relative | None = None
    require: tuple[Requirement, ...] = ()

    def unmet(self, runs) -> tuple[Requirement, str] | None:
        """The first requirement `runs` miss, with why; None when they meet every one."""
        for req in self.require:
            why = req.missed(runs)
            if why is not None:
                return req, why
        return None

    def band(self, value: float) -> Band | None:
        for b in self.bands:
            if b.bound is None:
                return b
            if (value <= b.bound) if self.smaller_is_better else (value >= b.bound):
                return b
        return None


@dataclass(frozen=True)
class Verdict:
    verdict: str
    next: str
    note: str  # "" when the CI lies in one band

    def line(self, metric: str, estimate: float, low: float, high: float) -> str:
        ci = f" [{low:.3f}, {high:.3f}]" if not math.isnan(low) else ""
        tail = f" ({self.note})" if self.note else ""
        return f"{metric} {estimate:.3f}{ci} → {self.verdict} → {self.next}{tail}"


def parse_criteria(obj, where: str) -> Criteria:
    """A `criteria:` mapping -> Criteria; UserError naming `where` and the key on bad input."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: criteria must be a mapping with 'metric' and 'bands', got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"metric", "bands", "relative", "require"})
    if unknown:
        raise UserError(f"{where}: criteria.{unknown[0]} is not a criteria key (metric, bands, relative, require)")
    metric = obj.get("metric")
    if not isinstance(metric, str) or not metric:
        raise UserError(f"{where}: criteria.metric must be a metric name such as test/m2t_R@1, got {metric!r}")
    bands = obj.get("bands")
    if not isinstance(bands, list) or not bands:
        raise UserError(f"{where}: criteria.bands must be a non-empty list of {{min, verdict, next}}")
    kinds = {k for b in bands if isinstance(b, dict) for k in ("min", "max") if k in b}
    if len(kinds) > 1:
        raise UserError(f"{where}: criteria.bands mixes 'min' and 'max'; use min (larger is better) or max throughout")
    key = kinds.pop() if kinds else "min"
    parsed, catch_all = [], None
    for i, b in enumerate(bands):
        at = f"{where}: criteria.bands[{i}]"
        if not isinstance(b, dict):
            raise UserError(f"{at} must be a mapping {{{key}, verdict, next}}, got {b!r}")
        extra = sorted(set(b) - {key, "verdict", "next"})
        if extra:
            raise UserError(f"{at}.{extra[0]} is not a band key ({key}, verdict, next)")
        for k in ("verdict", "next"):
            if not isinstance(b.get(k), str) or not b[k].strip():
                raise UserError(f"{at}.{k} must be a non-empty string, got {b.get(k)!r}")
        bound = b.get(key)
        if bound is None:
            if catch_all is not None:
                raise UserError(f"{at}: only one band may leave out '{key}' (the catch-all)")
            catch_all = Band(None, b["verdict"], b["next"])
            continue
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise UserError(f"{at}.{key} must be a finite number, got {bound!r}")
        parsed.append(Band(float(bound), b["verdict"], b["next"]))
    smaller = key == "max"
    parsed.sort(key=lambda b: b.bound, reverse=not smaller)
    bounds = [b.bound for b in parsed]
    if len(set(bounds)) != len(bounds):
        raise UserError(f"{where}: criteria.bands has two bands with {key} {bounds}")
    relative = _parse_relative(obj["relative"], where) if obj.get("relative") is not None else None
    require = _parse_require(obj.get("require"), where)
    return Criteria(metric, tuple(parsed) + ((catch_all,) if catch_all else ()), smaller, relative, require)


def _parse_require(items, where: str) -> tuple[Requirement, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise UserError(f"{where}: criteria.require must be a list of {{check|metric, verdict, next}}, got {items!r}")
    out = []
    for i, r in enumerate(items):
        at = f"{where}: criteria.require[{i}]"
        if not isinstance(r, dict):
            raise UserError(f"{at} must be a mapping {{check, verdict, next}} or {{metric, min|max, verdict, next}}, got {r!r}")
        if ("check" in r) == ("metric" in r):
            raise UserError(f"{at} needs exactly one of 'check' (a health check) and 'metric'")
        keys = {"check", "verdict", "next"} if "check" in r else {"metric", "min", "max", "verdict", "next"}
        extra = sorted(set(r) - keys)
        if extra:
            raise UserError(f"{at}.{extra[0]} is not a key here ({', '.join(sorted(keys))})")
        for k in ("verdict", "next", "check" if "check" in r else "metric"):
            if not isinstance(r.get(k), str) or not r[k].strip():
                raise UserError(f"{at}.{k} must be a non-empty string, got {r.get(k)!r}")
        bound, smaller = None, False
        if "metric" in r:
            if ("min" in r) == ("max" in r):
                raise UserError(f"{at} needs exactly one of 'min' and 'max' for {r['metric']}")
            smaller = "max" in r
            bound = r["max" if smaller else "min"]
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                raise UserError(f"{at}.{'max' if smaller else 'min'} must be a finite number, got {bound!r}")
            bound = float(bound)
        out.append(Requirement(r.get("check"), r.get("metric"), bound, smaller, r["verdict"], r["next"]))
    return tuple(out)


def _parse_relative(r, where: str) -> Relative:
    at = f"{where}: criteria.relative"
    if not isinstance(r, dict):
        raise UserError(f"{at} must be a mapping {{baseline, alpha, verdict, next}}, got {r!r}")
    extra = sorted(set(r) - {"baseline", "alpha", "verdict", "next"})
    if extra:
        raise UserError(f"{at}.{extra[0]} is not a key of relative (baseline, alpha, verdict, next)")
    for k in ("baseline", "verdict", "next"):
        if not isinstance(r.get(k), str) or not r[k].strip():
            raise UserError(f"{at}.{k} must be a non-empty string, got {r.get(k)!r}")
    alpha = r.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise UserError(f"{at}.alpha must be a number in (0, 1), got {alpha!r}")
    return Relative(r["baseline"], float(alpha), r["verdict"], r["next"])


def clears(relative: Relative, row: dict, smaller_is_better: bool) -> bool:
    """Whether a paired comparison row (modalign.analysis.compare) clears the baseline."""
    side = row["high"] < 0 if smaller_is_better else row["low"] > 0
    return bool(side and row["p_value"] < relative.alpha)


def judge(criteria: Criteria, estimate: float, low: float, high: float) -> Verdict:
    """The verdict for a metric's estimate and its CI (low, high; NaN when there is one run)."""
    at_mean = criteria.band(estimate)
    if math.isnan(low) or math.isnan(high):
        b = at_mean
        return Verdict(b.verdict if b else "none", b.next if b else "no band covers this value",
                       "one run: no CI, verdict from the single value")
    worse_end = high if criteria.smaller_is_better else low
    better_end = low if criteria.smaller_is_better else high
    b_worse, b_better = criteria.band(worse_end), criteria.band(better_end)
    if b_worse is None:
        return Verdict("none", "no band covers this value", "")
    if b_worse == b_better:
        return Verdict(b_worse.verdict, b_worse.next, "")
    crossed = [b.bound for b in criteria.bands if b.bound is not None
               and min(low, high) < b.bound <= max(low, high)]
    thresholds = ", ".join(f"{t:g}" for t in crossed)
    mean_says = f"the mean alone says {at_mean.verdict}" if at_mean and at_mean != b_worse else "more seeds narrow it"
    return Verdict(b_worse.verdict, b_worse.next, f"CI straddles {thresholds}; {mean_says}")
