from flextron.data import SPLITS, load_documents, token_windows, wants_bos
from flextron.models import ADAPTERS, byte_tokenizer


def test_splits_are_disjoint_deterministic_and_sized():
    docs = load_documents("wiki")
    assert len(docs) > 1000
    by_split = {s: {d.name for d in docs if d.split == s} for s in SPLITS}
    names = [n for s in by_split.values() for n in s]
    assert len(names) == len(set(names)) == len(docs)
    assert 0.03 < len(by_split["calibration"]) / len(docs) < 0.08
    assert {d.name for d in load_documents("wiki") if d.split == "validation"} == by_split["validation"]


def test_pydoc_fallback_and_local_files(tmp_path):
    assert len(load_documents("pydoc")) > 50
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    assert [d.text for d in load_documents(str(tmp_path / "a.txt"))] == ["one", "two"]
    assert len(load_documents(str(tmp_path))) == 1


def test_windows_have_bos_when_the_model_wants_it():
    tok = byte_tokenizer()
    gemma, llama = ADAPTERS["gemma3"], ADAPTERS["llama"]
    assert wants_bos(tok, gemma) and not wants_bos(tok, llama)
    w = token_windows(tok, gemma, "validation", 32, max_windows=3)
    assert w.shape == (3, 32) and (w[:, 0] == tok.bos_token_id).all()
    w2 = token_windows(tok, llama, "validation", 32, max_windows=3)
    assert (w2[:, 0] != tok.bos_token_id).any()
    # the text stream is the same; BOS only takes the first slot
    assert w[0, 1:].tolist() == w2[0, :31].tolist()


def test_corpus_identity_follows_content_and_paths_are_absolute(tmp_path, monkeypatch):
    """A corpus is known by its content: editing a text file or a folder gives it another id (caches,
    studies and quality models keyed on it then never mix texts); the id does not depend on where it is
    read from; a relative path is resolved to an absolute one; a missing corpus is refused."""
    import os

    import pytest

    from flextron.data import corpus_id, resolve_corpus
    from flextron.errors import FlextronError
    from search.quality import quality_setting

    f = tmp_path / "t.txt"
    f.write_text("alpha\n\nbeta")
    first = corpus_id(str(f))
    assert corpus_id(str(f)) == first and len(first) == 10
    setting = quality_setting("validation", str(f), 4, 32)
    f.write_text("alpha\n\nbeta!")
    os.utime(f, ns=(1, 1))  # another mtime as well as another text
    assert corpus_id(str(f)) != first and quality_setting("validation", str(f), 4, 32) != setting
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    before = corpus_id(str(folder))
    (folder / "b.txt").write_text("two")
    assert corpus_id(str(folder)) != before
    assert corpus_id("pydoc") == corpus_id("pydoc") and corpus_id("wiki") != corpus_id("pydoc")
    monkeypatch.chdir(tmp_path)
    assert resolve_corpus("t.txt") == str(f.resolve()) and resolve_corpus("pydoc") == "pydoc"
    with pytest.raises(FlextronError, match="is not 'wiki', 'pydoc'"):
        resolve_corpus("missing.txt")


def test_paragraph_names_do_not_move_when_a_paragraph_is_inserted(tmp_path):
    """Paragraphs of a single-file corpus are named by their text: inserting one keeps every other
    paragraph's name, hence its split."""
    f = tmp_path / "t.txt"
    paras = [f"paragraph number {i} with some words" for i in range(40)]
    f.write_text("\n\n".join(paras))
    before = {d.text: (d.name, d.split) for d in load_documents(str(f))}
    f.write_text("\n\n".join(paras[:3] + ["a new paragraph"] + paras[3:]))
    after = {d.text: (d.name, d.split) for d in load_documents(str(f))}
    assert all(after[t] == before[t] for t in paras) and len(after) == 41
