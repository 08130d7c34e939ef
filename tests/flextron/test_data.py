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
