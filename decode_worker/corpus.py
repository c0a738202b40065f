"""Text that ships with Python, split into train and held-out documents deterministically.

The tiny pair must build without downloads, so it learns from the interpreter's own
standard-library sources (code) and `pydoc_data.topics` (prose, the language reference).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Document:
    name: str  # "code:<file>.py" or "prose:<topic>"
    text: str


@dataclass(frozen=True)
class Corpus:
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]

    def digest(self) -> str:
        """Changes when the Python that ships the text changes, so cached pairs rebuild."""
        h = hashlib.sha256()
        for split, docs in (("train", self.train), ("heldout", self.heldout)):
            for doc in docs:
                h.update(f"{split}\0{doc.name}\0".encode())
                h.update(doc.text.encode())
        return h.hexdigest()[:16]

    def chars(self, split: str) -> int:
        docs = self.train if split == "train" else self.heldout
        return sum(len(d.text) for d in docs)


def _prose() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"prose:{key}", topics[key]) for key in sorted(topics)]


def _code(max_chars: int) -> list[Document]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    total = 0
    for path in sorted(lib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_chars:
            continue
        docs.append(Document(f"code:{path.name}", text))
        total += len(text)
    return docs


def load_corpus(code_chars: int, heldout_every: int = 10) -> Corpus:
    """All prose plus stdlib modules (in name order) up to `code_chars`; every
    `heldout_every`-th document of each kind is held out for evaluation."""
    train: list[Document] = []
    heldout: list[Document] = []
    for docs in (_prose(), _code(code_chars)):
        for i, doc in enumerate(docs):
            (heldout if i % heldout_every == heldout_every // 2 else train).append(doc)
    return Corpus(train=tuple(train), heldout=tuple(heldout))
