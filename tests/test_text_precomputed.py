"""The user's own text side: `text=precomputed text.path=EMB.npz` (vectors from any model) and
`text.model=PATH` (a local sentence-transformers folder): validated, recorded, and compared only
with runs that share it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, run_cli
from modalign.data.text_embeddings import lookup, read_precomputed
from modalign.errors import UserError


def demo_texts() -> list[str]:
    """Every caption and class prompt of the TINY demo data, in first-seen order."""
    from modalign.data.demo import make_demo_data

    data = make_demo_data(n_train=256, n_val=64, n_test=64)
    texts = {}
    for caps in data.captions:
        for c in caps:
            texts.setdefault(c, None)
    for ps in data.class_prompts:
        for p in ps:
            texts.setdefault(p, None)
    return list(texts)


@pytest.fixture(scope="module")
def minilm_vectors(tmp_path_factory, cache_dir) -> tuple[list[str], np.ndarray]:
    """The demo's texts and their MiniLM vectors, as a user would export them from their model."""
    from modalign.models.text_encoder import TextEmbedder

    texts = demo_texts()
    return texts, TextEmbedder(precision="fp32", progress=False).embed(texts)


def write(path: Path, texts, emb) -> Path:
    np.savez(path, texts=np.array(texts, dtype=str), embeddings=np.asarray(emb))
    return path


def only_run(cwd: Path) -> Path:
    (run,) = (cwd / "outputs" / "runs").iterdir()
    return run


def test_precomputed_vectors_train_like_the_model_that_made_them_and_compare_refuses_another_file(
        tmp_path, cache_dir, minilm_vectors):
    """Vectors exported from MiniLM (shuffled, with extra texts) train the same run as text=minilm,
    bit for bit; run.json records the file's sha256; a run on other vectors is not comparable."""
    texts, emb = minilm_vectors
    order = np.random.default_rng(0).permutation(len(texts))
    extra = ["a text the data does not use"]
    f = write(tmp_path / "emb.npz", [texts[i] for i in order] + extra,
              np.vstack([emb[order], np.ones((1, emb.shape[1]), np.float32)]))
    args = ["train", "--quiet", *TINY]
    for name, extra_args in (("ours", ["text=precomputed", f"text.path={f}"]), ("minilm", ["text.precision=fp32"])):
        (tmp_path / name).mkdir()
        p = run_cli([*args, *extra_args], tmp_path / name, cache_dir)
        assert p.returncode == 0, p.stderr
    ours, minilm = only_run(tmp_path / "ours"), only_run(tmp_path / "minilm")
    info = json.loads((ours / "run.json").read_text())
    sha = info["text"]["sha256"]
    assert len(sha) == 64 and info["text"]["model"] == f"precomputed:{sha[:16]}" and info["text"]["dim"] == 384
    a = json.loads((ours / "facts" / "summary.json").read_text())["test"]
    b = json.loads((minilm / "facts" / "summary.json").read_text())["test"]
    assert a["m2t_R@1"] == pytest.approx(b["m2t_R@1"], abs=1e-6) and a["zeroshot_acc"] == pytest.approx(b["zeroshot_acc"])
    # the same training on vectors from another model (here: a rotation of these) is another text side
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(emb.shape[1], emb.shape[1])))
    g = write(tmp_path / "rotated.npz", texts, emb @ q.astype(np.float32))
    (tmp_path / "rot").mkdir()
    p = run_cli([*args, "text=precomputed", f"text.path={g}", "seed=1"], tmp_path / "rot", cache_dir)
    assert p.returncode == 0, p.stderr
    p = run_cli(["compare", str(ours), str(only_run(tmp_path / "rot"))], tmp_path, cache_dir)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "text side differs" in lines[0], p.stderr


@pytest.mark.parametrize("case,needle", [
    ("missing-text", "have no vector there, e.g. "),
    ("nan", "is not finite"),
    ("zero", "is all zeros"),
    ("one-dim", "'embeddings' must be a 2-D array"),
    ("duplicate", "appears twice (rows 0 and 2)"),
    ("rows", "'embeddings' has 2 rows but 'texts' has 3"),
    ("objects", "holds Python objects"),
    ("no-texts", "'embeddings' without 'texts'; give both"),
])
def test_bad_vector_files_are_one_line_errors_naming_the_file(tmp_path, case, needle):
    f = tmp_path / "emb.npz"
    texts = ["a", "b", "c"]
    emb = np.eye(3, dtype=np.float32)
    if case == "nan":
        emb[1, 0] = np.nan
    elif case == "zero":
        emb[2] = 0
    elif case == "one-dim":
        emb = emb[0]
    elif case == "duplicate":
        texts = ["a", "b", "a"]
    elif case == "rows":
        emb = emb[:2]
    if case == "objects":
        np.savez(f, texts=np.array(texts, dtype=object), embeddings=emb)
    elif case == "no-texts":
        np.savez(f, embeddings=emb)
    else:
        write(f, texts, emb)
    with pytest.raises(UserError) as err:
        lookup(f, ["a", "b", "c", "d"] if case == "missing-text" else ["a", "b"])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"text.path={f}") and needle in msg, msg


def test_a_bad_vector_file_stops_the_cli_with_one_line_and_no_run(tmp_path, cache_dir):
    f = write(tmp_path / "emb.npz", ["only this"], np.ones((1, 4), np.float32))
    p = run_cli(["train", "--quiet", *TINY, "text=precomputed", f"text.path={f}"], tmp_path, cache_dir)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "have no vector there" in lines[0], p.stderr
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())
    p = run_cli(["train", "--quiet", *TINY, "text=precomputed"], tmp_path, cache_dir)
    assert p.returncode == 2 and "text.path" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_reading_a_good_file_keeps_its_rows_and_hash(tmp_path):
    f = write(tmp_path / "e.npz", ["x", "y"], np.array([[1, 2], [3, 4]], np.float32))
    pre = read_precomputed(f)
    index, emb, sha = pre.by_text, pre.text_vectors, pre.sha256
    assert index == {"x": 0, "y": 1} and emb.dtype == np.float32 and emb.tolist() == [[1, 2], [3, 4]]
    import hashlib

    assert sha == hashlib.sha256(f.read_bytes()).hexdigest()


def test_a_local_sentence_transformers_folder_is_a_text_model(tmp_path, cache_dir):
    """text.model=PATH: a folder made from the packaged MiniLM embeds as the packaged model does, under
    an id of its own (the folder's name and a hash of its content)."""
    from modalign.models.text_encoder import TextEmbedder, resolve_model

    _, packaged = resolve_model("all-MiniLM-L6-v2")
    folder = tmp_path / "my-minilm"
    shutil.copytree(packaged, folder)
    mine = TextEmbedder(str(folder), precision="fp32", cache_dir=tmp_path / "cache", progress=False)
    ref = TextEmbedder(precision="fp32", cache_dir=tmp_path / "cache", progress=False)
    texts = ["someone cooks dinner in the kitchen", "the resident sleeps"]
    np.testing.assert_allclose(mine.embed(texts), ref.embed(texts), atol=1e-6)
    assert mine.model_id.startswith("my-minilm@") and mine.model_id != ref.model_id
    assert mine.stats["misses"] == 2  # its own cache entries, not the packaged model's


def test_vectors_by_sample_id_stand_for_that_samples_captions(tmp_path, cache_dir, minilm_vectors):
    """EMB.npz with `ids` + `id_embeddings`: those samples' captions take their id's vector (all
    captions of the sample share it), the others and the class prompts are looked up by text; a
    run on it completes and records how many samples were keyed by id."""
    from modalign.data.demo import make_demo_data
    from modalign.recipes.align import TextTable
    from modalign.recipes.settings import TextSettings

    texts, emb = minilm_vectors
    data = make_demo_data(n_train=256, n_val=64, n_test=64)
    keyed = data.ids[::3].tolist()
    rng = np.random.default_rng(0)
    id_vectors = rng.normal(size=(len(keyed), emb.shape[1])).astype(np.float32)
    f = tmp_path / "emb.npz"
    np.savez(f, texts=np.array(texts, dtype=str), embeddings=emb, ids=np.array(keyed, dtype=str), id_embeddings=id_vectors)
    table = TextTable(data, TextSettings(kind="precomputed", path=str(f)), progress=False)
    rows = table.rows(data)
    for i, sid in enumerate(data.ids.tolist()):
        if sid in keyed:
            assert rows[i, 0] >= 0 and (rows[i, 1:] == -1).all()
            assert np.array_equal(table.embeddings[rows[i, 0]], id_vectors[keyed.index(sid)])
        else:
            got = table.embeddings[rows[i, : len(data.captions[i])]]
            assert np.array_equal(got, emb[[texts.index(c) for c in data.captions[i]]])
    assert table.stats == {"precomputed": len(table.embeddings), "by_sample_id": len(keyed)}

    p = run_cli(["train", "--quiet", *TINY, "text=precomputed", f"text.path={f}"], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    info = json.loads((only_run(tmp_path) / "run.json").read_text())
    assert info["status"] == "completed" and info["text"]["cache"]["by_sample_id"] == len(keyed)

    # ids alone, without a vector for a caption of another sample: one line naming what is missing
    np.savez(tmp_path / "ids_only.npz", ids=np.array(keyed, dtype=str), id_embeddings=id_vectors)
    with pytest.raises(UserError, match="without a vector by sample id have no vector there"):
        TextTable(data, TextSettings(kind="precomputed", path=str(tmp_path / "ids_only.npz")), progress=False)
    np.savez(tmp_path / "half.npz", ids=np.array(keyed, dtype=str))
    with pytest.raises(UserError, match="'ids' without 'id_embeddings'; give both"):
        read_precomputed(tmp_path / "half.npz")
    np.savez(tmp_path / "dims.npz", texts=np.array(texts, dtype=str), embeddings=emb, ids=np.array(keyed, dtype=str),
             id_embeddings=id_vectors[:, :10])
    with pytest.raises(UserError, match="both sides must come from one model"):
        read_precomputed(tmp_path / "dims.npz")
