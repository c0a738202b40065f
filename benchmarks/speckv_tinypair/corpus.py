"""Text that ships with Python, split into train and held-out documents deterministically.

The tiny pair must build without downloads, so it learns from Python's standard-library
sources (code) and `pydoc_data.topics` (prose, the language reference). Those used to be
read from the running interpreter, so another Python (or another build of the same one)
gave another corpus and another pair. They are now read from a snapshot shipped in the
repository, `data/python-3.11.7-corpus.json.gz`: every top-level `Lib/*.py` (in name
order, decoded as UTF-8 with replacement) and every pydoc topic of CPython 3.11.7, so the
corpus is the same on every machine and interpreter. The snapshot holds exactly what the
builder read from that interpreter, so pairs built there before the snapshot are unchanged.
`data/PYTHON-LICENSE.txt` is the PSF license the texts are distributed under.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
SNAPSHOT = DATA_DIR / "python-3.11.7-corpus.json.gz"
SNAPSHOT_FORMAT = 1


@dataclass(frozen=True)
class Document:
    name: str  # "code:<file>.py" or "prose:<topic>"
    text: str


@dataclass(frozen=True)
class Corpus:
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]

    def digest(self) -> str:
        """Changes when the text changes, so cached pairs rebuild."""
        h = hashlib.sha256()
        for split, docs in (("train", self.train), ("heldout", self.heldout)):
            for doc in docs:
                h.update(f"{split}\0{doc.name}\0".encode())
                h.update(doc.text.encode())
        return h.hexdigest()[:16]

    def chars(self, split: str) -> int:
        docs = self.train if split == "train" else self.heldout
        return sum(len(d.text) for d in docs)


@functools.lru_cache(maxsize=2)
def read_snapshot(path: Path = SNAPSHOT) -> dict[str, Any]:
    """{"format", "python", "source", "code": [[file, text], ...], "prose": [[topic, text], ...]}"""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    if data.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path}: corpus snapshot format {data.get('format')!r}, expected 1")
    return data


def write_snapshot(path: Path) -> dict[str, Any]:
    """Snapshot what this interpreter ships (how the shipped file was made; see the module doc).

    gzip with no name and mtime 0, so the same texts always give the same bytes.
    """
    from pydoc_data.topics import topics

    lib = Path(sysconfig.get_paths()["stdlib"])
    data: dict[str, Any] = {
        "format": SNAPSHOT_FORMAT,
        "python": platform.python_version(),
        "source": "CPython Lib/*.py (top level, name order, UTF-8 with replacement) "
        "and pydoc_data.topics (key order)",
        "code": [
            [p.name, p.read_text(encoding="utf-8", errors="replace")]
            for p in sorted(lib.glob("*.py"))
        ],
        "prose": [[key, topics[key]] for key in sorted(topics)],
    }
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    with open(path, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as f:
        f.write(blob)
    return data


def _prose(snapshot: dict[str, Any]) -> list[Document]:
    return [Document(f"prose:{key}", text) for key, text in snapshot["prose"]]


def _code(snapshot: dict[str, Any], max_chars: int) -> list[Document]:
    docs: list[Document] = []
    total = 0
    for name, text in snapshot["code"]:
        if total + len(text) > max_chars:
            continue
        docs.append(Document(f"code:{name}", text))
        total += len(text)
    return docs


def load_corpus(code_chars: int, heldout_every: int = 10, snapshot: Path = SNAPSHOT) -> Corpus:
    """All prose plus stdlib modules (in name order) up to `code_chars`; every
    `heldout_every`-th document of each kind is held out for evaluation."""
    snap = read_snapshot(snapshot)
    train: list[Document] = []
    heldout: list[Document] = []
    for docs in (_prose(snap), _code(snap, code_chars)):
        for i, doc in enumerate(docs):
            (heldout if i % heldout_every == heldout_every // 2 else train).append(doc)
    return Corpus(train=tuple(train), heldout=tuple(heldout))
