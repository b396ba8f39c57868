"""The embedded demo data: seeded smart-home activity windows in the style of the CASAS data sets.

A one-resident home with seven rooms and 39 binary sensors (motion, doors, appliances, lights).
Each window holds one or two activities in sequence (cook -> eat, come home -> watch TV, ...)
rendered as a stream of sensor events, with noise events and sensor dropouts by difficulty, and
described by paraphrased captions that state exactly the window's structured facts: its
activities, their rooms, the time of day and the duration (short/long).

    tokens_id    [N, T]     int64, "<sensor> <state>" ids (vocab), 0 = padding
    tokens_cont  [N, T, 2]  float32, log1p(seconds since the previous event), time fraction 0..1
    globals      [N, 3]     float32, sin and cos of the start hour, log1p(window minutes)

Where the text can be checked against the sensors: activities and rooms by which sensors fire and
in what order, time of day by `globals` (and lights), duration by `globals`, event count and gaps.
The paraphrase chosen leaves no trace in the sensor data.

    from modalign.data.demo import make_demo_data
    data = make_demo_data(seed=0)  # 8000/1000/1000 windows, ~1 s

Pure numpy; no torch here.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from itertools import accumulate
from typing import Any

import numpy as np

from modalign.data.paired import PairedData
from modalign.errors import UserError

# --- the home --------------------------------------------------------------------------------

ROOMS = ("entrance", "living room", "dining area", "kitchen", "bedroom", "bathroom", "office")

# (name, kind, room, what it watches); names follow the CASAS scheme (M = motion, D = door).
SENSORS = (
    ("M001", "motion", "entrance", "front hall"),
    ("M002", "motion", "entrance", "coat rack"),
    ("M003", "motion", "living room", "sofa"),
    ("M004", "motion", "living room", "armchair"),
    ("M005", "motion", "living room", "living room area"),
    ("M006", "motion", "dining area", "dining table"),
    ("M007", "motion", "dining area", "dining area"),
    ("M008", "motion", "kitchen", "kitchen entry"),
    ("M009", "motion", "kitchen", "stove"),
    ("M010", "motion", "kitchen", "sink"),
    ("M011", "motion", "hall", "corridor to bedroom, bathroom and office"),
    ("M012", "motion", "bedroom", "bedroom entry"),
    ("M013", "motion", "bedroom", "wardrobe"),
    ("M014", "motion", "bedroom", "bed"),
    ("M015", "motion", "bathroom", "bathroom sink"),
    ("M016", "motion", "bathroom", "shower"),
    ("M017", "motion", "office", "office entry"),
    ("M018", "motion", "office", "desk"),
    ("D001", "door", "entrance", "front door"),
    ("D002", "door", "kitchen", "fridge"),
    ("D003", "door", "kitchen", "dish cabinet"),
    ("D004", "door", "bathroom", "bathroom door"),
    ("D005", "door", "bedroom", "bedroom door"),
    ("D006", "door", "bathroom", "medicine cabinet"),
    ("D007", "door", "bedroom", "wardrobe door"),
    ("E001", "appliance", "kitchen", "stove burner"),
    ("E002", "appliance", "living room", "TV"),
    ("E003", "appliance", "bathroom", "shower water"),
    ("E004", "appliance", "office", "computer"),
    ("E005", "appliance", "kitchen", "kitchen sink water"),
    ("E006", "appliance", "bathroom", "bathroom sink water"),
    ("E007", "appliance", "living room", "reading lamp"),
    ("L001", "light", "entrance", "entrance light"),
    ("L002", "light", "living room", "living room light"),
    ("L003", "light", "dining area", "dining area light"),
    ("L004", "light", "kitchen", "kitchen light"),
    ("L005", "light", "bedroom", "bedroom light"),
    ("L006", "light", "bathroom", "bathroom light"),
    ("L007", "light", "office", "office light"),
)
_STATES = {"motion": ("ON", "OFF"), "door": ("OPEN", "CLOSE"), "appliance": ("ON", "OFF"), "light": ("ON", "OFF")}
VOCAB = ["<pad>"] + [f"{name} {state}" for name, kind, _, _ in SENSORS for state in _STATES[kind]]
_ID = {tok: i for i, tok in enumerate(VOCAB)}
_SENSOR_OF_ID = np.array([-1] + [k for k in range(len(SENSORS)) for _ in range(2)], dtype=np.int64)
_MOTION = {room: [name for name, kind, r, _ in SENSORS if kind == "motion" and r == room]
           for room in ROOMS + ("hall",)}
_MOTION_ON_IDS = np.array([_ID[f"{n} ON"] for n, kind, _, _ in SENSORS if kind == "motion"])
_LIGHT = {room: name for name, kind, room, _ in SENSORS if kind == "light"}

# --- the activities ----------------------------------------------------------------------------

ACTIVITIES = ("cook", "eat", "wash_dishes", "sleep", "bathe", "groom", "watch_tv", "relax", "work",
              "leave_home", "come_home")
TIMES_OF_DAY = ("morning", "afternoon", "evening", "night")
_HOURS = {"morning": (6, 12), "afternoon": (12, 17), "evening": (17, 22), "night": (22, 30)}  # night wraps
DURATIONS = ("short", "long")

# Per activity: rooms it happens in (with weights), how often it opens a window, time-of-day
# plausibility (morning, afternoon, evening, night), duration ranges in minutes (short, long),
# motion activations = a + b * log2(minutes), the chance that the key appliance is used and sensed
# at all (a microwave instead of the stove, a laptop on the sofa), and the event template. Steps:
#   ("move", share[, sensors])  a share of the motion activations, in the room or on given sensors
#   ("tok", p, [tokens])        these tokens, together, with probability p
_SPEC: dict[str, dict[str, Any]] = {
    "cook": dict(rooms={"kitchen": 1.0}, prior=1.2, tod=(0.4, 0.1, 0.5, 0.0),
                 minutes=((6, 18), (15, 60)), motion=(0.5, 1.5), signature=(0.85, "E001"),
                 steps=[("move", 0.3), ("tok", 0.8, ["D002 OPEN", "D002 CLOSE"]), ("tok", 1.0, ["E001 ON"]),
                        ("move", 0.4), ("tok", 0.6, ["D003 OPEN", "D003 CLOSE"]),
                        ("tok", 0.25, ["E005 ON", "E005 OFF"]), ("move", 0.3), ("tok", 1.0, ["E001 OFF"])]),
    "eat": dict(rooms={"dining area": 0.8, "living room": 0.2}, prior=1.0, tod=(0.35, 0.15, 0.5, 0.0),
                minutes=((8, 20), (18, 60)), motion=(0.0, 1.2),
                steps=[("tok", 0.6, ["M008 ON", "M008 OFF", "D003 OPEN", "D003 CLOSE"]),
                       ("tok", 0.4, ["D002 OPEN", "D002 CLOSE"]), ("move", 1.0)]),
    "wash_dishes": dict(rooms={"kitchen": 1.0}, prior=0.8, tod=(0.35, 0.15, 0.5, 0.0),
                        minutes=((4, 12), (10, 35)), motion=(0.5, 1.3), signature=(0.9, "E005"),
                        steps=[("move", 0.3), ("tok", 1.0, ["E005 ON"]), ("move", 0.4), ("tok", 1.0, ["E005 OFF"]),
                               ("tok", 0.8, ["D003 OPEN", "D003 CLOSE"]), ("move", 0.3),
                               ("tok", 0.3, ["E005 ON", "E005 OFF"])]),
    "sleep": dict(rooms={"bedroom": 1.0}, prior=1.0, tod=(0.0, 0.1, 0.0, 0.9),
                  minutes=((20, 70), (240, 540)), motion=(0.5, 0.6),
                  steps=[("tok", 0.5, ["D007 OPEN", "D007 CLOSE"]), ("move", 0.3, ["M012", "M013"]),
                         ("tok", 0.7, ["D005 CLOSE"]), ("move", 0.7, ["M014"])]),
    "bathe": dict(rooms={"bathroom": 1.0}, prior=0.8, tod=(0.6, 0.0, 0.3, 0.1),
                  minutes=((6, 18), (15, 45)), motion=(0.5, 1.2), signature=(0.9, "E003"),
                  steps=[("tok", 0.9, ["D004 OPEN", "D004 CLOSE"]), ("move", 0.3), ("tok", 1.0, ["E003 ON"]),
                         ("move", 0.4, ["M016"]), ("tok", 1.0, ["E003 OFF"]), ("move", 0.3),
                         ("tok", 0.9, ["D004 OPEN", "D004 CLOSE"])]),
    "groom": dict(rooms={"bathroom": 1.0}, prior=0.8, tod=(0.6, 0.0, 0.2, 0.2),
                  minutes=((2, 6), (5, 20)), motion=(1.0, 1.3), signature=(0.85, "E006"),
                  steps=[("tok", 0.9, ["D004 OPEN", "D004 CLOSE"]), ("move", 0.3, ["M015"]),
                         ("tok", 1.0, ["E006 ON", "E006 OFF"]), ("tok", 0.5, ["D006 OPEN", "D006 CLOSE"]),
                         ("move", 0.7), ("tok", 0.4, ["E006 ON", "E006 OFF"]),
                         ("tok", 0.9, ["D004 OPEN", "D004 CLOSE"])]),
    "watch_tv": dict(rooms={"living room": 1.0}, prior=1.2, tod=(0.0, 0.25, 0.6, 0.15),
                     minutes=((12, 35), (30, 180)), motion=(0.0, 1.2), signature=(0.85, "E002"),
                     steps=[("move", 0.3), ("tok", 1.0, ["E002 ON"]), ("move", 0.7, ["M003", "M004"]),
                            ("tok", 1.0, ["E002 OFF"])]),
    "relax": dict(rooms={"living room": 0.7, "bedroom": 0.3}, prior=1.0, tod=(0.1, 0.5, 0.4, 0.0),
                  minutes=((10, 30), (25, 120)), motion=(0.0, 1.2),
                  steps=[("move", 0.4), ("tok", 0.7, ["E007 ON"]), ("move", 0.6), ("tok", 0.5, ["E007 OFF"])]),
    "work": dict(rooms={"office": 1.0}, prior=1.0, tod=(0.45, 0.5, 0.05, 0.0),
                 minutes=((15, 45), (40, 240)), motion=(0.0, 1.3), signature=(0.85, "E004"),
                 steps=[("move", 0.3), ("tok", 1.0, ["E004 ON"]), ("move", 0.7, ["M018"]), ("tok", 1.0, ["E004 OFF"])]),
    "leave_home": dict(rooms={"entrance": 1.0}, prior=0.9, tod=(0.6, 0.3, 0.1, 0.0),
                       minutes=((1, 4), (3, 12)), motion=(1.5, 1.0),
                       steps=[("move", 0.4, ["M005", "M011"]), ("move", 0.6), ("tok", 0.4, ["D001 OPEN", "D001 CLOSE"]),
                              ("tok", 1.0, ["D001 OPEN", "D001 CLOSE"])]),
    "come_home": dict(rooms={"entrance": 1.0}, prior=0.9, tod=(0.0, 0.4, 0.6, 0.0),
                      minutes=((1, 4), (3, 12)), motion=(1.5, 1.0),
                      steps=[("tok", 1.0, ["D001 OPEN", "D001 CLOSE"]), ("move", 0.6),
                             ("tok", 0.3, ["D001 OPEN", "D001 CLOSE"]), ("move", 0.4, ["M005", "M003"])]),
}

# What plausibly comes next, given the first activity.
_NEXT: dict[str, dict[str, float]] = {
    "cook": {"eat": 0.75, "wash_dishes": 0.15, "watch_tv": 0.1},
    "eat": {"wash_dishes": 0.6, "watch_tv": 0.25, "leave_home": 0.15},
    "wash_dishes": {"relax": 0.4, "watch_tv": 0.4, "sleep": 0.2},
    "sleep": {"groom": 0.6, "bathe": 0.4},
    "bathe": {"sleep": 0.5, "cook": 0.3, "leave_home": 0.2},
    "groom": {"sleep": 0.5, "leave_home": 0.5},
    "watch_tv": {"sleep": 0.5, "eat": 0.3, "cook": 0.2},
    "relax": {"sleep": 0.5, "cook": 0.3, "watch_tv": 0.2},
    "work": {"cook": 0.4, "relax": 0.3, "leave_home": 0.3},
    "leave_home": {"come_home": 1.0},
    "come_home": {"cook": 0.4, "watch_tv": 0.4, "relax": 0.2},
}


# noise: extra motion activations per event; dropout: share of events lost; sensor_failure: chance
# that one sensor of the window is silent throughout; second_activity: share of two-activity windows.
DIFFICULTIES = {
    "easy": dict(noise=0.03, dropout=0.02, sensor_failure=0.05, second_activity=0.3),
    "medium": dict(noise=0.08, dropout=0.05, sensor_failure=0.15, second_activity=0.5),
    "hard": dict(noise=0.15, dropout=0.10, sensor_failure=0.30, second_activity=0.65),
}

# --- the captions ------------------------------------------------------------------------------

SUBJECTS = ("someone", "the resident", "a person", "the occupant", "a resident")
# third-person verb phrases and gerunds per activity
VERB_PHRASES = {
    "cook": (("cooks", "prepares a meal", "makes food"), ("cooking", "preparing a meal", "making food")),
    "eat": (("eats", "has a meal", "eats a meal"), ("eating", "having a meal")),
    "wash_dishes": (("washes the dishes", "does the dishes", "cleans the dishes"),
                    ("washing the dishes", "doing the dishes")),
    "sleep": (("sleeps", "is asleep", "sleeps in bed"), ("sleeping", "sleeping in bed")),
    "bathe": (("takes a shower", "showers", "bathes"), ("taking a shower", "showering", "bathing")),
    "groom": (("freshens up", "brushes their teeth", "washes up at the sink"),
              ("freshening up", "brushing their teeth", "grooming")),
    "watch_tv": (("watches TV", "watches television", "watches a show on TV"),
                 ("watching TV", "watching television")),
    "relax": (("reads a book", "relaxes with a book", "sits and reads"), ("reading a book", "relaxing with a book")),
    "work": (("works at the computer", "uses the computer", "works on the computer"),
             ("working at the computer", "using the computer")),
    "leave_home": (("leaves home", "goes out", "leaves the house"), ("leaving home", "going out")),
    "come_home": (("comes home", "returns home", "arrives home"), ("coming home", "returning home")),
}
ROOM_PHRASES = {
    "entrance": ("through the front door", "by the front door"),
    "living room": ("in the living room", "in the lounge"),
    "dining area": ("at the dining table", "in the dining area"),
    "kitchen": ("in the kitchen",),
    "bedroom": ("in the bedroom",),
    "bathroom": ("in the bathroom",),
    "office": ("in the office", "in the study"),
}
TIME_PHRASES = {
    "morning": ("in the morning", "during the morning", "one morning"),
    "afternoon": ("in the afternoon", "during the afternoon", "one afternoon"),
    "evening": ("in the evening", "during the evening", "one evening"),
    "night": ("at night", "during the night", "late at night"),
}
# adverbial form ("cooks ... for a long time") and object form ("spends a long time cooking")
_DURATION_ADVERB = {"short": ("briefly", "for a short while", "for a short time"),
                    "long": ("for a long time", "for a long while", "at length")}
_DURATION_OBJECT = {"short": ("a short time", "only a short while"), "long": ("a long time", "a long while")}
# a substring of every way each duration is said (what the tests look for)
DURATION_PHRASES = {"short": ("briefly", "a short while", "a short time"),
                    "long": ("a long time", "a long while", "at length")}
CONNECTORS_VERB = (", then", " and then", ", and afterwards")
CONNECTORS_GERUND = (", followed by", ", before")

CLASS_PROMPTS = {
    "cook": ["someone cooks", "a person is cooking in the kitchen", "the resident prepares a meal"],
    "eat": ["someone eats", "a person is eating a meal", "the resident has a meal"],
    "wash_dishes": ["someone washes the dishes", "a person is doing the dishes in the kitchen",
                    "the resident cleans the dishes"],
    "sleep": ["someone sleeps", "a person is asleep in the bedroom", "the resident sleeps in bed"],
    "bathe": ["someone takes a shower", "a person is showering in the bathroom", "the resident bathes"],
    "groom": ["someone freshens up", "a person is brushing their teeth in the bathroom",
              "the resident washes up at the sink"],
    "watch_tv": ["someone watches TV", "a person is watching television in the living room",
                 "the resident watches a show on TV"],
    "relax": ["someone reads a book", "a person is relaxing with a book", "the resident sits and reads"],
    "work": ["someone works at the computer", "a person is using the computer in the office",
             "the resident works on the computer"],
    "leave_home": ["someone leaves home", "a person is going out through the front door",
                   "the resident leaves the house"],
    "come_home": ["someone comes home", "a person is arriving home through the front door",
                  "the resident returns home"],
}

_MAX_CAPTIONS = 10


def make_demo_data(n_train: int = 8000, n_val: int = 1000, n_test: int = 1000, seed: int = 0,
                   difficulty: str = "medium", captions_per_sample: int = 3,
                   max_events: int = 64) -> PairedData:
    """Generate n_train + n_val + n_test smart-home activity windows with paraphrased captions.

    Args:
        n_train, n_val, n_test: windows per split (each >= 1); ids w000000.. in that order.
        seed: numpy seed; equal arguments give identical arrays and captions.
        difficulty: "easy", "medium" or "hard" -- the noise-event, dropout and sensor-failure rates
            and the share of two-activity windows (DIFFICULTIES).
        captions_per_sample: distinct paraphrases per window (1..10); the first is evaluated.
        max_events: T, events kept per window; longer windows are truncated, shorter ones padded.

    Returns:
        A validated PairedData named "demo": tokens_id [N, T], tokens_cont [N, T, 2],
        globals [N, 3], labels = first activity, facts, class prompts and the sensor vocabulary.
    """
    _check_args(n_train, n_val, n_test, seed, difficulty, captions_per_sample, max_events)
    n_train, n_val, n_test, seed, captions_per_sample, T = (
        int(x) for x in (n_train, n_val, n_test, seed, captions_per_sample, max_events))
    rates = DIFFICULTIES[difficulty]
    n = n_train + n_val + n_test
    rng = np.random.default_rng(seed)

    # window-level draws, vectorised
    prior = np.array([_SPEC[a]["prior"] for a in ACTIVITIES])
    first = rng.choice(len(ACTIVITIES), size=n, p=prior / prior.sum())
    tod_p = np.array([_SPEC[a]["tod"] for a in ACTIVITIES])  # (K, 4)
    tod = _choice_rows(rng, tod_p[first])  # (N,)
    lo, hi = np.array([_HOURS[t] for t in TIMES_OF_DAY]).T
    hour = (lo[tod] + rng.random(n) * (hi[tod] - lo[tod])) % 24  # (N,)
    long_ = rng.random(n) < 0.5
    two = rng.random(n) < rates["second_activity"]

    tokens_id = np.zeros((n, T), dtype=np.int64)
    tokens_cont = np.zeros((n, T, 2), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int64)
    minutes = np.zeros(n, dtype=np.float64)
    facts: list[dict[str, Any]] = []
    for i in range(n):
        acts = [ACTIVITIES[first[i]]]
        if two[i]:
            nxt = _NEXT[acts[0]]
            acts.append(list(nxt)[_pick(rng.random(), list(nxt.values()))])
        rooms = [_pick_key(rng, _SPEC[a]["rooms"]) for a in acts]
        duration = "long" if long_[i] else "short"
        facts.append({"activities": acts, "rooms": rooms, "time_of_day": TIMES_OF_DAY[tod[i]],
                      "duration": duration})
        ids, times, total = _render_window(rng, acts, rooms, TIMES_OF_DAY[tod[i]], int(long_[i]), rates)
        k = min(len(ids), T)
        gaps = np.diff(times[:k], prepend=times[0])
        tokens_id[i, :k] = ids[:k]
        tokens_cont[i, :k, 0] = np.log1p(gaps)
        tokens_cont[i, :k, 1] = times[:k] / total
        lengths[i] = k
        minutes[i] = total / 60.0

    angle = 2 * np.pi * hour / 24
    globals_ = np.stack([np.sin(angle), np.cos(angle), np.log1p(minutes)], axis=1).astype(np.float32)
    captions = _write_captions(rng, facts, captions_per_sample)
    labels = first.astype(np.int64)
    width = max(6, len(str(n - 1)))
    split = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test)
    meta = {
        "generator": "modalign.data.demo.make_demo_data",
        "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed, "difficulty": difficulty,
        "captions_per_sample": captions_per_sample, "max_events": T, **rates,
        "tokens_cont": ["log1p_seconds_since_previous_event", "time_fraction_of_window"],
        "globals": ["sin_hour", "cos_hour", "log1p_window_minutes"],
        "sensors": {name: f"{kind}, {room}: {what}" for name, kind, room, what in SENSORS},
    }
    return PairedData(
        name="demo", source=f"demo(seed={seed}, difficulty={difficulty})",
        ids=np.array([f"w{i:0{width}d}" for i in range(n)]), split=split, lengths=lengths,
        captions=captions, tokens_id=tokens_id, tokens_cont=tokens_cont, globals=globals_,
        labels=labels, label_names=list(ACTIVITIES), class_prompts=[list(CLASS_PROMPTS[a]) for a in ACTIVITIES],
        facts=facts, vocab=list(VOCAB), meta=meta,
    ).validate()


def _check_args(n_train, n_val, n_test, seed, difficulty, captions_per_sample, max_events) -> None:
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    for key, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not is_int(value) or value < 1:
            raise UserError(f"demo data: {key} must be a positive integer (every split needs a sample), got {value!r}")
    if not is_int(seed) or seed < 0:
        raise UserError(f"demo data: seed must be a non-negative integer, got {seed!r}")
    if not isinstance(difficulty, str) or difficulty not in DIFFICULTIES:
        raise UserError(f"demo data: unknown difficulty {difficulty!r} (expected one of {', '.join(DIFFICULTIES)})")
    if not is_int(captions_per_sample) or not 1 <= captions_per_sample <= _MAX_CAPTIONS:
        raise UserError(f"demo data: captions_per_sample must be an integer in 1..{_MAX_CAPTIONS}, "
                        f"got {captions_per_sample!r}")
    if not is_int(max_events) or max_events < 1:
        raise UserError(f"demo data: max_events must be a positive integer, got {max_events!r}")


def _choice_rows(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """One index per row of p [N, K] (rows sum to 1): [N] int."""
    cum = np.cumsum(p, axis=1)
    u = rng.random(len(p))[:, None] * cum[:, -1:]
    return np.minimum((u >= cum).sum(axis=1), p.shape[1] - 1)


def _pick(u: float, weights: list[float]) -> int:
    """The index that u in [0, 1) falls on, for weights summing to anything positive."""
    cum = list(accumulate(weights))
    return min(bisect_right(cum, u * cum[-1]), len(weights) - 1)


def _pick_key(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    return keys[0] if len(keys) == 1 else keys[_pick(rng.random(), list(weights.values()))]


def _render_activity(rng: np.random.Generator, act: str, room: str, tod: str, long_: int,
                     prev_room: str | None) -> tuple[list[int], list[float], float]:
    """One activity's events: token ids, gap weights (motion OFF and paired tokens follow fast),
    and its duration in seconds."""
    spec = _SPEC[act]
    lo, hi = spec["minutes"][long_]
    minutes = math.exp(math.log(lo) + rng.random() * (math.log(hi) - math.log(lo)))
    a, b = spec["motion"]
    n_act = max(1, round(a + b * math.log2(minutes) + rng.normal(0.0, 0.8)))
    toks: list[str] = []
    if prev_room != room and room in ("bedroom", "bathroom", "office"):
        toks += ["M011 ON", "M011 OFF"]
    dark = tod in ("evening", "night")
    light = _LIGHT[room]
    if act == "sleep":
        if dark and rng.random() < 0.8:
            toks.append(f"{light} OFF")
    elif act != "leave_home" and rng.random() < (0.85 if dark else 0.1):
        toks.append(f"{light} ON")
    for step in spec["steps"]:
        if step[0] == "tok":
            if step[1] >= 1.0 or rng.random() < step[1]:
                toks += step[2]
        else:
            sensors = step[2] if len(step) > 2 else _MOTION[room]
            k = max(1, round(step[1] * n_act)) if step[1] >= 0.5 else round(step[1] * n_act)
            for s in rng.integers(0, len(sensors), size=k):
                toks += [f"{sensors[s]} ON", f"{sensors[s]} OFF"]
    if "signature" in spec and rng.random() >= spec["signature"][0]:
        toks = [t for t in toks if not t.startswith(spec["signature"][1])]
    if not toks:
        s = _MOTION[room][rng.integers(0, len(_MOTION[room]))]
        toks = [f"{s} ON", f"{s} OFF"]
    if act == "leave_home" and dark and rng.random() < 0.7:
        toks.insert(max(0, len(toks) - 2), "L001 OFF")
    ids = [_ID[t] for t in toks]
    weights = [0.15 if (t.endswith(" OFF") and t[0] == "M") or t.endswith(" CLOSE") else 1.0 for t in toks]
    return ids, weights, minutes * 60.0


def _render_window(rng: np.random.Generator, acts: list[str], rooms: list[str], tod: str, long_: int,
                   rates: dict[str, float]) -> tuple[np.ndarray, np.ndarray, float]:
    """A window's events after noise and dropout, in time order: ids [L], seconds from the start
    [L], and the window's length in seconds."""
    ids: list[int] = []
    times: list[np.ndarray] = []
    t = 0.0
    prev_room = None
    for j, (act, room) in enumerate(zip(acts, rooms)):
        if j:
            if acts[0] == "leave_home":  # away from home in between
                t += 60.0 * (rng.uniform(120, 360) if long_ else rng.uniform(20, 60))
            else:
                t += rng.exponential(180.0) + 10.0
        a_ids, weights, seconds = _render_activity(rng, act, room, tod, long_, prev_room)
        gaps = rng.exponential(size=len(a_ids)) * np.array(weights)
        gaps[0] = 0.0
        cum = np.cumsum(gaps)
        times.append(t + cum * (seconds / cum[-1] if cum[-1] > 0 else 0.0))
        ids += a_ids
        t += seconds
        prev_room = room
    total = t
    ids_arr = np.array(ids, dtype=np.int64)
    times_arr = np.concatenate(times)

    # noise: stray motion activations anywhere in the home (a visitor, a pet, a flaky sensor)
    n_noise = rng.poisson(rates["noise"] * len(ids_arr))
    if n_noise:
        on = _MOTION_ON_IDS[rng.integers(0, len(_MOTION_ON_IDS), size=n_noise)]
        t_on = rng.random(n_noise) * total
        t_off = np.minimum(t_on + rng.exponential(20.0, size=n_noise), total)
        ids_arr = np.concatenate([ids_arr, on, on + 1])
        times_arr = np.concatenate([times_arr, t_on, t_off])

    # dropout: lost events, and now and then a sensor silent for the whole window
    keep = rng.random(len(ids_arr)) >= rates["dropout"]
    if rng.random() < rates["sensor_failure"]:
        sensors = np.unique(_SENSOR_OF_ID[ids_arr])
        dead = sensors[rng.integers(0, len(sensors))]
        keep &= _SENSOR_OF_ID[ids_arr] != dead
    if not keep.any():
        keep[0] = True
    ids_arr, times_arr = ids_arr[keep], times_arr[keep]
    order = np.argsort(times_arr, kind="stable")
    return ids_arr[order], times_arr[order], total


def _slot(u: float, options: tuple[str, ...]) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def _caption(u: np.ndarray, f: dict[str, Any]) -> str:
    """One paraphrase of facts f, its wording chosen by the uniforms u [12]."""
    acts, rooms = f["activities"], f["rooms"]
    subj = _slot(u[0], SUBJECTS)
    when = _slot(u[1], TIME_PHRASES[f["time_of_day"]])
    room1 = _slot(u[2], ROOM_PHRASES[rooms[0]])
    form = _pick(u[3], [0.45, 0.35, 0.2])
    if form == 2:  # "someone spends a long time cooking in the kitchen in the evening"
        text = (f"{subj} spends {_slot(u[4], _DURATION_OBJECT[f['duration']])} "
                f"{_slot(u[5], VERB_PHRASES[acts[0]][1])} {room1} {when}")
    else:
        clause = (f"{_slot(u[5], VERB_PHRASES[acts[0]][0])} {room1} "
                  f"{_slot(u[4], _DURATION_ADVERB[f['duration']])}")
        text = f"{when}, {subj} {clause}" if form == 1 else f"{subj} {clause} {when}"
    if len(acts) > 1:
        room2 = _slot(u[6], ROOM_PHRASES[rooms[1]])
        if u[7] < 0.75:
            text += f"{_slot(u[8], CONNECTORS_VERB)} {_slot(u[9], VERB_PHRASES[acts[1]][0])} {room2}"
        else:
            text += f"{_slot(u[8], CONNECTORS_GERUND)} {_slot(u[9], VERB_PHRASES[acts[1]][1])} {room2}"
    return text


def _write_captions(rng: np.random.Generator, facts: list[dict[str, Any]], per_sample: int) -> list[list[str]]:
    """per_sample distinct paraphrases of each window's facts."""
    u = rng.random((len(facts), per_sample, 12))
    captions = []
    for i, f in enumerate(facts):
        caps: list[str] = []
        for j in range(per_sample):
            text = _caption(u[i, j], f)
            while text in caps:  # the wording space has hundreds of members; this ends fast
                text = _caption(rng.random(12), f)
            caps.append(text)
        captions.append(caps)
    return captions
