"""Read the labeled time-series classification data sets that ship inside the sktime package
(BasicMotions, JapaneseVowels, GunPoint, ...) as paired data. Needs the optional extra
`pip install 'modalign[sktime]'`; pure numpy otherwise, no torch.

    tokens_cont  [N, T, C]  float32, one token per time step, one feature per channel; zeros at padding
    lengths      [N]        int64, time steps per series (JapaneseVowels and PLAID vary)
    labels       [N]        int64, index into label_names (the classes in the file header's order)

Only the .ts files inside the installed package are read, with sktime's own .ts parser, so nothing
is ever downloaded; other UCR/UEA names raise a UserError that lists the bundled ones. train and
test are sktime's split; val is a seeded, stratified `val_fraction` of train. Captions come from
per-data-set templates (see CLASS_CAPTIONS and DOMAIN_CAPTIONS below and docs/data.md).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np

from modalign.data.paired import PairedData
from modalign.errors import UserError

MISSING_EXTRA = "data=sktime needs the optional extra: pip install 'modalign[sktime]'"

# Captions per class, for data sets whose bundled file names each class: BasicMotions by its class
# names, JapaneseVowels by its speaker numbers 1-9, PLAID by the class list in its .ts header.
CLASS_CAPTIONS: dict[str, dict[str, list[str]]] = {
    "BasicMotions": {
        "standing": ["a person is standing still", "someone standing, measured by a wrist-worn sensor",
                     "smartwatch accelerometer and gyroscope readings of a person at rest"],
        "walking": ["a person is walking", "someone walking, measured by a wrist-worn sensor",
                    "smartwatch accelerometer and gyroscope readings of a person walking"],
        "running": ["a person is running", "someone running, measured by a wrist-worn sensor",
                    "smartwatch accelerometer and gyroscope readings of a person running"],
        "badminton": ["a person is playing badminton", "someone playing badminton, measured by a wrist-worn sensor",
                      "smartwatch accelerometer and gyroscope readings of a person swinging a badminton racket"],
    },
    "JapaneseVowels": {
        str(k): [f"speaker {k} utters the japanese vowel /ae/", f"the vowel /ae/ spoken by speaker {k}",
                 f"cepstral coefficients of speaker {k} saying /ae/"]
        for k in range(1, 10)
    },
    "PLAID": {
        str(k): [f"the electric current drawn by {a}", f"a plug load measurement of {a}", f"{a} switching on"]
        for k, a in enumerate(["an air conditioner", "a compact fluorescent lamp", "a fan", "a fridge",
                               "a hairdryer", "a heater", "an incandescent light bulb", "a laptop",
                               "a microwave", "a vacuum cleaner", "a washing machine"])
    },
}

# Captions with the class code, for data sets whose bundled files name the classes but do not say
# which code is which class; the captions say the domain and the code, and do not guess names.
DOMAIN_CAPTIONS: dict[str, list[str]] = {
    "ACSF1": ["the power consumption of a home appliance of class {label}",
              "an appliance consumption signature of class {label}"],
    "ArrowHead": ["the outline of an arrowhead of class {label}",
                  "a projectile point shape of class {label}"],
    "GunPoint": ["the x-position of an actor's right hand during a motion of class {label}",
                 "a gun-draw or pointing gesture of class {label}"],
    "ItalyPowerDemand": ["a day of electrical power demand in italy of class {label}",
                         "24 hours of italian power demand of season class {label}"],
    "OSULeaf": ["the outline of a leaf of species class {label}",
                "a leaf contour of class {label}"],
}

GENERIC_CAPTIONS = ["a time series of class {label}"]
CAPTION_MODES = ("default", "generic")


def read_sktime(dataset: str = "BasicMotions", name: str | None = None, val_fraction: float = 0.2, seed: int = 0,
                captions: str = "default") -> PairedData:
    """Load a classification data set bundled with sktime, offline; the result is validated.

    captions: "default" uses the data set's templates when it has some, else the generic
    "a time series of class {label}"; "generic" always uses the generic one.
    """
    data_dir = _bundled_data_dir()
    bundled = bundled_datasets(data_dir)
    if dataset not in bundled:
        close = difflib.get_close_matches(dataset, bundled, n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"sktime: '{dataset}' is not a classification data set bundled with sktime{guess}; "
                        f"bundled: {', '.join(bundled)} (others need a download, which modalign does not do)")
    if captions not in CAPTION_MODES:
        raise UserError(f"sktime: unknown captions mode '{captions}' (expected one of {', '.join(CAPTION_MODES)})")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"sktime: val_fraction must lie strictly between 0 and 1, got {val_fraction}")

    src = f"sktime:{dataset}"
    names = _class_names(data_dir / dataset / f"{dataset}_TRAIN.ts")
    parts = {s: _read_ts(data_dir / dataset / f"{dataset}_{s.upper()}.ts") for s in ("train", "test")}

    series = parts["train"][0] + parts["test"][0]  # N arrays [T_i, C]
    raw_labels = np.concatenate([parts["train"][1], parts["test"][1]])
    ids = np.array([f"{dataset}_{s.upper()}_{i:04d}" for s in ("train", "test") for i in range(len(parts[s][0]))])
    n_train = len(parts["train"][0])

    # Spell label names as the data lines do (BasicMotions' header says "Standing", its lines "standing").
    spelled = {str(v).casefold(): str(v) for v in raw_labels}
    label_names = [spelled.get(c.casefold(), c) for c in names]
    index = {c.casefold(): k for k, c in enumerate(label_names)}
    unknown = sorted({str(v) for v in raw_labels if str(v).casefold() not in index})
    if unknown:
        raise UserError(f"{src}: class '{unknown[0]}' is not in the file's @classLabel list ({', '.join(names)})")
    labels = np.array([index[str(v).casefold()] for v in raw_labels], dtype=np.int64)

    split = np.array(["train"] * n_train + ["test"] * (len(series) - n_train), dtype=object)
    split[stratified_val(labels[:n_train], val_fraction, seed)] = "val"

    tokens_cont, lengths = _pad(src, ids, series)
    prompts = [class_captions(dataset, c, captions) for c in label_names]
    return PairedData(
        name=name or dataset, source=src, ids=ids, split=split.astype(str), lengths=lengths,
        captions=[list(prompts[k]) for k in labels], tokens_cont=tokens_cont, labels=labels,
        label_names=label_names, class_prompts=prompts, facts=[{"label": label_names[k]} for k in labels],
        meta={"dataset": dataset, "channels": int(tokens_cont.shape[2]), "val_fraction": val_fraction, "seed": seed},
    ).validate()


def class_captions(dataset: str, label: str, captions: str = "default") -> list[str]:
    """The captions (and zero-shot prompts) of one class of a bundled data set."""
    if captions == "default" and dataset in CLASS_CAPTIONS and label.casefold() in CLASS_CAPTIONS[dataset]:
        return list(CLASS_CAPTIONS[dataset][label.casefold()])
    templates = DOMAIN_CAPTIONS.get(dataset, GENERIC_CAPTIONS) if captions == "default" else GENERIC_CAPTIONS
    return [t.format(label=label) for t in templates]


def stratified_val(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """[V] indices into `labels` [N] for val: round(val_fraction * n_k) of each class k, drawn with
    `seed`, keeping at least one sample of every class in train."""
    rng = np.random.default_rng(seed)
    picked = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        take = min(int(round(val_fraction * len(members))), len(members) - 1)
        picked.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def bundled_datasets(data_dir: Path | None = None) -> list[str]:
    """Names of the classification data sets inside the installed sktime: a folder with NAME_TRAIN.ts
    and NAME_TEST.ts whose header says `@classLabel true`."""
    data_dir = data_dir or _bundled_data_dir()
    found = []
    for d in sorted(data_dir.iterdir(), key=lambda p: p.name.lower()):
        train, test = d / f"{d.name}_TRAIN.ts", d / f"{d.name}_TEST.ts"
        if train.is_file() and test.is_file() and _class_names(train):
            found.append(d.name)
    return found


def _bundled_data_dir() -> Path:
    try:
        import sktime.datasets
    except ImportError:
        raise UserError(MISSING_EXTRA) from None
    return Path(sktime.datasets.__file__).parent / "data"


def _class_names(ts_path: Path) -> list[str]:
    """The class names after `@classLabel true` in a .ts header, in file order; [] if it has none."""
    with open(ts_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            key = words[0].lower()
            if key == "@data":
                break
            if key == "@classlabel" and len(words) > 2 and words[1].lower() == "true":
                return words[2:]
    return []


def _read_ts(ts_path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """N series as [T_i, C] float arrays and [N] str labels, parsed by sktime from a local file."""
    from sktime.datasets import load_from_tsfile

    X, y = load_from_tsfile(str(ts_path), return_data_type="nested_univ")  # N rows x C columns of pd.Series
    cells = X.to_numpy()
    series = []
    for i in range(len(cells)):
        channels = [np.asarray(c, dtype=np.float64) for c in cells[i]]
        sizes = {len(c) for c in channels}
        if len(sizes) != 1:
            raise UserError(f"{ts_path}: series {i} has channels of different lengths {sorted(sizes)}")
        series.append(np.stack(channels, axis=1))  # (T_i, C)
    return series, np.asarray(y).astype(str)


def _pad(src: str, ids: np.ndarray, series: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """[N, T, C] float32 zero-padded to the longest series, and [N] int64 lengths."""
    lengths = np.array([len(s) for s in series], dtype=np.int64)
    if (lengths == 0).any():
        raise UserError(f"{src}: series '{ids[int(np.argmin(lengths))]}' is empty")
    out = np.zeros((len(series), int(lengths.max()), series[0].shape[1]), dtype=np.float32)
    for i, s in enumerate(series):
        out[i, : len(s)] = s
    return out, lengths
