"""The demo generator: determinism, shapes, splits, captions that state exactly the facts, and
one-line UserErrors for bad arguments.

Run: .venv/bin/python -m pytest -q tests/test_demo_data.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from modalign.data import demo
from modalign.data.demo import make_demo_data
from modalign.errors import UserError

SIZES = dict(n_train=240, n_val=30, n_test=30)


@pytest.fixture(scope="module")
def data():
    return make_demo_data(**SIZES, seed=3)


def test_same_arguments_give_identical_data(data):
    again = make_demo_data(**SIZES, seed=3)
    assert again.fingerprint() == data.fingerprint()
    assert again.facts == data.facts
    np.testing.assert_array_equal(again.tokens_cont, data.tokens_cont)
    np.testing.assert_array_equal(again.globals, data.globals)


def test_different_seeds_differ(data):
    other = make_demo_data(**SIZES, seed=4)
    assert other.fingerprint() != data.fingerprint()
    assert other.captions != data.captions


def test_sizes_splits_ids_and_validate(data):
    n = sum(SIZES.values())
    assert len(data) == n
    assert [int((data.split == s).sum()) for s in ("train", "val", "test")] == [240, 30, 30]
    assert data.split[:240].tolist() == ["train"] * 240
    assert data.ids[0] == "w000000" and data.ids[-1] == f"w{n - 1:06d}"
    assert data.name == "demo" and data.source == "demo(seed=3, difficulty=medium)"
    assert data.meta["seed"] == 3 and data.meta["difficulty"] == "medium"
    data.validate()


def test_shapes_and_dtypes(data):
    n, T = len(data), 64
    assert data.tokens_id.shape == (n, T) and data.tokens_id.dtype == np.int64
    assert data.tokens_cont.shape[:2] == (n, T) and data.tokens_cont.shape[2] >= 2
    assert data.tokens_cont.dtype == np.float32
    assert data.globals.shape == (n, 3) and data.globals.dtype == np.float32
    assert data.lengths.dtype == np.int64 and data.labels.dtype == np.int64
    assert data.vocab[0] == "<pad>" and len(set(data.vocab)) == len(data.vocab)
    assert data.tokens_id.max() < len(data.vocab)
    assert "M001 ON" in data.vocab and "D001 OPEN" in data.vocab


def test_padding_is_zero_beyond_lengths(data):
    valid = np.arange(data.seq_len)[None, :] < data.lengths[:, None]
    assert (data.tokens_id[~valid] == 0).all()
    assert (data.tokens_cont[~valid] == 0).all()
    assert (data.tokens_id[valid] > 0).all()
    assert (data.tokens_cont[valid][:, 0] >= 0).all()
    frac = data.tokens_cont[valid][:, 1]
    assert (frac >= 0).all() and (frac <= 1).all()


def test_truncation_to_max_events():
    small = make_demo_data(n_train=100, n_val=10, n_test=10, max_events=8)
    assert small.tokens_id.shape[1] == 8
    assert small.lengths.max() == 8 and small.lengths.min() >= 1


def test_captions_are_distinct_nonempty_strings(data):
    for caps in data.captions:
        assert len(caps) == 3 and len(set(caps)) == 3
        assert all(isinstance(c, str) and c.strip() for c in caps)
    one = make_demo_data(n_train=5, n_val=1, n_test=1, captions_per_sample=1)
    assert all(len(c) == 1 for c in one.captions)


def _says(caption: str, phrases) -> bool:
    return any(p in caption for p in phrases)


def test_every_caption_states_every_fact(data):
    for facts, caps in zip(data.facts, data.captions):
        json.dumps(facts)
        assert set(facts) == {"activities", "rooms", "time_of_day", "duration"}
        acts, rooms = facts["activities"], facts["rooms"]
        assert 1 <= len(acts) <= 2 and len(rooms) == len(acts)
        for cap in caps:
            for tod, phrases in demo.TIME_PHRASES.items():
                assert _says(cap, phrases) == (tod == facts["time_of_day"]), (cap, facts)
            for dur, phrases in demo.DURATION_PHRASES.items():
                assert _says(cap, phrases) == (dur == facts["duration"]), (cap, facts)
            for act in acts:
                vp, ger = demo.VERB_PHRASES[act]
                assert _says(cap, vp + ger), (cap, act)
            for room in rooms:
                assert _says(cap, demo.ROOM_PHRASES[room]), (cap, room)
            connectors = [c.strip(" ,") for c in demo.CONNECTORS_VERB + demo.CONNECTORS_GERUND]
            assert _says(cap, connectors) == (len(acts) == 2), cap


def test_labels_are_the_first_activity(data):
    assert data.label_names == list(demo.ACTIVITIES) and len(data.label_names) >= 10
    assert [data.label_names[k] for k in data.labels] == [f["activities"][0] for f in data.facts]
    assert len(data.class_prompts) == len(data.label_names)
    assert all(len(p) >= 2 and all(s.strip() for s in p) for p in data.class_prompts)


def test_globals_carry_time_of_day_and_duration(data):
    hour = np.degrees(np.arctan2(data.globals[:, 0], data.globals[:, 1])) / 15 % 24
    for h, facts in zip(hour, data.facts):
        lo, hi = demo._HOURS[facts["time_of_day"]]
        assert lo - 1e-3 <= (h if h >= 6 else h + 24) <= hi + 1e-3
    long_ = np.array([f["duration"] == "long" for f in data.facts])
    single = np.array([f["activities"] == ["cook"] for f in data.facts])
    assert data.globals[long_ & single, 2].mean() > data.globals[~long_ & single, 2].mean()


def test_difficulty_changes_the_data():
    kw = dict(n_train=300, n_val=10, n_test=10)
    easy, hard = make_demo_data(**kw, difficulty="easy"), make_demo_data(**kw, difficulty="hard")
    pairs = [np.mean([len(f["activities"]) == 2 for f in d.facts]) for d in (easy, hard)]
    assert pairs[0] < pairs[1]
    assert hard.source == "demo(seed=0, difficulty=hard)"


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_train=-1), "n_train"),
    (dict(n_val=0), "n_val"),
    (dict(n_test=2.5), "n_test"),
    (dict(seed=-3), "seed"),
    (dict(difficulty="extreme"), "difficulty"),
    (dict(captions_per_sample=0), "captions_per_sample"),
    (dict(max_events=0), "max_events"),
])
def test_bad_arguments_raise_one_line_user_error(kwargs, words):
    with pytest.raises(UserError, match=words) as err:
        make_demo_data(**{**dict(n_train=5, n_val=1, n_test=1), **kwargs})
    assert "\n" not in str(err.value)


def test_sweep_jobs_in_one_process_reuse_generated_data_only_for_equal_arguments(tmp_path):
    # Hydra's basic launcher runs a sweep's jobs in one process: the demo data, a pure function of
    # its arguments, is generated once per distinct argument set; files are always read again.
    from omegaconf import OmegaConf

    from modalign.data.npz import write_npz
    from modalign.recipes.align import load_data

    def cfg(**data):
        return OmegaConf.create({"data": {"_target_": "modalign.data.demo.make_demo_data", "name": "demo",
                                          **SIZES, **data}})

    first = load_data(cfg(seed=3))
    assert load_data(cfg(seed=3)) is first
    assert not first.tokens_id.flags.writeable  # shared: an in-place change would fail loudly
    other = load_data(cfg(seed=4))
    assert other is not first and other.fingerprint() != first.fingerprint()
    assert load_data(cfg(seed=3)).fingerprint() == first.fingerprint()  # regenerated, equal

    path = tmp_path / "d.npz"
    write_npz(first, str(path))
    npz = OmegaConf.create({"data": {"_target_": "modalign.data.npz.read_npz", "name": "npz", "path": str(path)}})
    assert load_data(npz) is not load_data(npz)
