"""The sktime reader: bundled data sets load offline into valid paired data (they train end to end
in tests/test_patching.py).

Run: .venv/bin/python -m pytest -q tests/test_sktime_reader.py
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sktime", reason="the optional extra is not installed: pip install 'modalign[sktime]'")

from modalign.data.sktime_reader import bundled_datasets, class_captions, read_sktime  # noqa: E402
from modalign.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def motions():
    return read_sktime("BasicMotions")


def test_basic_motions_loads_and_validates(motions):
    motions.validate()
    assert motions.tokens_cont.shape == (80, 100, 6)  # 40 train + 40 test series, 100 steps, 3D acc + 3D gyro
    assert motions.tokens_cont.dtype == np.float32
    assert motions.tokens_id is None and motions.globals is None
    assert (motions.lengths == 100).all()
    sizes = {s: int((motions.split == s).sum()) for s in ("train", "val", "test")}
    assert sizes == {"train": 32, "val": 8, "test": 40}


def test_val_is_stratified_and_seeded(motions):
    val = motions.subset("val")
    assert np.bincount(val.labels).tolist() == [2, 2, 2, 2]  # 10 train series per class, 20 %
    again = read_sktime("BasicMotions", seed=0)
    other = read_sktime("BasicMotions", seed=1)
    assert (again.split == motions.split).all()
    assert (other.split != motions.split).any()


def test_captions_are_strings_that_match_the_labels(motions):
    assert motions.label_names == ["standing", "running", "walking", "badminton"]
    for caps, k, facts in zip(motions.captions, motions.labels, motions.facts):
        name = motions.label_names[k]
        assert caps and all(isinstance(c, str) and c.strip() for c in caps)
        assert caps == motions.class_prompts[k]
        assert facts == {"label": name}
        assert caps == class_captions("BasicMotions", name)
    walking = motions.label_names.index("walking")
    assert "a person is walking" in motions.class_prompts[walking]


def test_generic_captions_and_fallback():
    assert class_captions("BasicMotions", "walking", "generic") == ["a time series of class walking"]
    assert class_captions("UnitTest", "2") == ["a time series of class 2"]
    with pytest.raises(UserError, match="captions mode 'fancy'"):
        read_sktime("BasicMotions", captions="fancy")


def test_japanese_vowels_has_variable_lengths():
    data = read_sktime("JapaneseVowels")
    assert data.tokens_cont.shape[2] == 12
    assert data.lengths.min() < data.lengths.max() == data.seq_len
    short = int(np.argmin(data.lengths))
    assert (data.tokens_cont[short, data.lengths[short]:] == 0).all()
    assert data.captions[0][0] == "speaker 1 utters the japanese vowel /ae/"


def test_unknown_data_set_is_a_one_line_user_error():
    with pytest.raises(UserError) as err:
        read_sktime("BasicMotion")
    msg = str(err.value)
    assert "\n" not in msg
    assert "did you mean 'BasicMotions'" in msg
    assert all(d in msg for d in bundled_datasets())



# `modalign train data=sktime` end to end (and `modalign eval` of that run): in tests/test_patching.py,
# where the transformer's default patches the 100-step series.
