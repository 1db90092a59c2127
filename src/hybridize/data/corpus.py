"""Corpora: where documents come from.

A `Corpus` is an ordered list of *shards* (usually files); each shard yields its documents in a fixed
order, read lazily, so a corpus never has to fit in memory. Shards are the unit of shuffling (the
packer permutes shards per epoch) and of resuming (a position is shard / document / token offset).

Documents are strings, chat records ``{"messages": [...]}`` or preference records
``{"prompt", "chosen", "rejected"}`` (for DPO; see `hybridize.data.preference`).

Sources:
- plain text files: by default **one file = one document** (``doc_split="file"``: code and most
  long-form text keep their structure); ``doc_split="blank_lines"`` splits each file at blank lines
  (paragraph-per-document corpora).
- JSONL: one record per line with ``text``, ``messages`` or ``prompt``/``chosen``/``rejected``.
- a local Hugging Face ``datasets`` directory (``save_to_disk``); needs ``pip install datasets``.
- ``"stdlib"``: the Python standard library's source, present on every machine (``*.py`` files,
  without test directories, site-packages or the machine-specific ``_sysconfigdata*``).

Held-out split: ``split="train"`` / ``"heldout"`` keeps the documents whose stable hash of
``"<shard name>#<index in shard>"`` falls below / above ``heldout_fraction``. The name is a path
relative to the corpus root, so the split is the same on every machine; for the stdlib corpus (one
document per file) the split is by file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

TEXT_SUFFIXES = (".txt", ".md", ".text")
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HF_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


class CorpusError(ValueError):
    """A corpus is missing, malformed (the message names file:line) or too small."""


@dataclass(frozen=True)
class Shard:
    """One unit of a corpus. name: stable id (relative path) used for splitting and error messages.
    read: () → iterator over the shard's documents, in order."""
    name: str
    read: Callable[[], Iterator]


def _heldout(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h / 2.0 ** 64 < fraction


class Corpus:
    """An ordered list of shards, optionally restricted to the train or held-out split."""

    def __init__(self, name: str, shards: Sequence[Shard], *, split: Optional[str] = None,
                 heldout_fraction: float = 0.0):
        if split not in (None, "train", "heldout"):
            raise CorpusError(f"split must be None, 'train' or 'heldout', got {split!r}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise CorpusError(f"heldout_fraction must lie in [0, 1), got {heldout_fraction}")
        if split == "heldout" and heldout_fraction == 0.0:
            raise CorpusError(f"corpus {name}: split='heldout' with heldout_fraction=0 would be empty")
        self.name = name
        self.shards = list(shards)
        self.split = split
        self.heldout_fraction = heldout_fraction

    def __repr__(self) -> str:
        sp = f", split={self.split!r}" if self.split else ""
        return f"Corpus({self.name!r}, {len(self.shards)} shards{sp})"

    @property
    def fingerprint(self) -> str:
        """Identifies the corpus and split (stored in data-iterator states to catch mismatched resumes)."""
        return f"{self.name}|{self.split}|{self.heldout_fraction}|{len(self.shards)}"

    def num_shards(self) -> int:
        return len(self.shards)

    def shard_documents(self, i: int) -> Iterator:
        """Documents of shard i that belong to this corpus' split, in order."""
        shard = self.shards[i]
        for j, doc in enumerate(shard.read()):
            if self.split is not None and self.heldout_fraction > 0:
                if _heldout(f"{shard.name}#{j}", self.heldout_fraction) != (self.split == "heldout"):
                    continue
            yield doc

    def __iter__(self) -> Iterator:
        for i in range(len(self.shards)):
            yield from self.shard_documents(i)

    def with_split(self, split: Optional[str], heldout_fraction: Optional[float] = None) -> "Corpus":
        frac = self.heldout_fraction if heldout_fraction is None else heldout_fraction
        return Corpus(self.name, self.shards, split=split, heldout_fraction=frac)


# ---------------------------------------------------------------------------- readers
def _read_text(path: Path) -> str:
    # errors="replace": a stray non-UTF-8 byte must not stop a long run
    return path.read_text(encoding="utf-8", errors="replace")


def _text_file_docs(path: Path, doc_split: str) -> Iterator[str]:
    text = _read_text(path)
    if doc_split == "file":
        yield text
    else:
        for block in re.split(r"\n[ \t]*\n", text):
            if block.strip():
                yield block.strip("\n")


def parse_record(obj, where: str):
    """A JSON object → a document (str for {"text"}, the dict itself for chat / preference records)."""
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise CorpusError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
        return obj["text"]
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in msgs):
            raise CorpusError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
        return {"messages": msgs}
    if {"prompt", "chosen", "rejected"} <= set(obj):
        return {k: obj[k] for k in ("prompt", "chosen", "rejected")}
    raise CorpusError(f"{where}: expected a 'text', 'messages' or 'prompt'/'chosen'/'rejected' field, "
                      f"got keys {sorted(obj)}")


def _jsonl_docs(path: Path) -> Iterator:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            yield parse_record(obj, f"{path}:{lineno}")


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise CorpusError(f"corpus path {str(path)!r} does not exist")


def _file_shard(path: Path, root: Path, doc_split: str) -> Shard:
    name = path.relative_to(root).as_posix() if path != root else path.name
    if path.suffix == ".jsonl":
        return Shard(name, lambda p=path: _jsonl_docs(p))
    return Shard(name, lambda p=path: _text_file_docs(p, doc_split))


def _collect_files(path: Path, suffixes: tuple) -> list[Path]:
    return sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes),
                  key=lambda p: p.relative_to(path).as_posix())


def text_corpus(paths: Union[PathLike, Sequence[PathLike]], *, doc_split: str = "file",
                name: Optional[str] = None, **split_kw) -> Corpus:
    """Plain-text (and JSONL) files; directories are searched recursively for *.txt, *.md, *.jsonl
    (sorted by relative path, so the order is the same everywhere)."""
    if doc_split not in ("file", "blank_lines"):
        raise CorpusError(f"doc_split must be 'file' or 'blank_lines', got {doc_split!r}")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    shards = []
    for p in map(Path, paths):
        _require_exists(p)
        if p.is_dir():
            files = _collect_files(p, TEXT_SUFFIXES + (".jsonl",))
            if not files:
                raise CorpusError(f"corpus directory {str(p)!r} holds no *.txt, *.md or *.jsonl files")
            shards += [_file_shard(f, p, doc_split) for f in files]
        else:
            shards.append(_file_shard(p, p, doc_split))
    return Corpus(name or ",".join(str(p) for p in paths), shards, **split_kw)


def jsonl_corpus(paths: Union[PathLike, Sequence[PathLike]], *, name: Optional[str] = None,
                 **split_kw) -> Corpus:
    """JSONL files, one shard per file. Each line: {"text"}, {"messages"} or {"prompt","chosen","rejected"}."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    for p in map(Path, paths):
        _require_exists(p)
    return Corpus(name or ",".join(str(p) for p in paths),
                  [Shard(Path(p).name, lambda p=Path(p): _jsonl_docs(p)) for p in paths], **split_kw)


def list_corpus(docs: Sequence, *, name: str = "list", **split_kw) -> Corpus:
    """An in-memory corpus (tests, demos): each document is its own shard."""
    docs = list(docs)
    return Corpus(name, [Shard(f"{i}", lambda d=d: iter((d,))) for i, d in enumerate(docs)], **split_kw)


def hf_dataset_corpus(path: PathLike, *, hf_split: str = "train", rows_per_shard: int = 1000,
                      name: Optional[str] = None, **split_kw) -> Corpus:
    """A Hugging Face dataset saved with ``save_to_disk`` (needs the optional ``datasets`` package).
    Rows are read like JSONL records; shards are blocks of `rows_per_shard` rows."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{str(path)!r} is a Hugging Face datasets directory: `pip install datasets` "
                          "to read it") from None
    p = Path(path)
    _require_exists(p)
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if hf_split not in ds:
            raise CorpusError(f"dataset {str(p)!r} has splits {sorted(ds)}, not {hf_split!r}")
        ds = ds[hf_split]

    def read(lo: int, hi: int) -> Iterator:
        cols = ds[lo:hi]                      # one columnar read per shard, not one per row
        for j in range(hi - lo):
            yield parse_record({k: v[j] for k, v in cols.items()}, f"{p}[{hf_split}][{lo + j}]")

    shards = [Shard(f"{hf_split}:{lo}", lambda lo=lo: read(lo, min(lo + rows_per_shard, len(ds))))
              for lo in range(0, len(ds), rows_per_shard)]
    return Corpus(name or str(p), shards, **split_kw)


def stdlib_files(root: Optional[PathLike] = None) -> list[Path]:
    """The standard library's *.py files in a fixed order (sorted relative paths), without test
    directories, installed packages and the machine-specific ``_sysconfigdata*`` modules."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        for fn in filenames:
            if fn.endswith(".py") and not fn.startswith("_sysconfigdata"):
                out.append(Path(dirpath) / fn)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(*, split: Optional[str] = None, heldout_fraction: float = 0.05,
                  root: Optional[PathLike] = None) -> Corpus:
    """The built-in corpus: Python's standard library source, one document per file."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if not files:
        raise CorpusError(f"found no standard-library *.py files under {str(root)!r}")
    shards = [Shard(f.relative_to(root).as_posix(), lambda f=f: iter((_read_text(f),))) for f in files]
    return Corpus("stdlib", shards, split=split, heldout_fraction=heldout_fraction)


def is_hf_dataset_dir(path: PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / m).exists() for m in HF_DATASET_MARKERS)


def load_corpus(spec: Union[str, PathLike, Sequence[PathLike]], *, split: Optional[str] = None,
                heldout_fraction: float = 0.05, doc_split: str = "file", hf_split: str = "train") -> Corpus:
    """A corpus from a spec: ``"stdlib"``, a text / JSONL file, a directory of such files, a saved HF
    dataset directory, or a list of paths. `split`: None (everything), "train" or "heldout"."""
    kw = dict(split=split, heldout_fraction=heldout_fraction if split else 0.0)
    if isinstance(spec, str) and spec == "stdlib":
        return stdlib_corpus(split=split, heldout_fraction=heldout_fraction)
    if isinstance(spec, (list, tuple)):
        return text_corpus(spec, doc_split=doc_split, **kw)
    p = Path(spec)
    _require_exists(p)
    if is_hf_dataset_dir(p):
        return hf_dataset_corpus(p, hf_split=hf_split, **kw)
    return text_corpus(p, doc_split=doc_split, **kw)
