"""Real text that needs no download: Python's own standard library.

The demo trains on the source of a fixed list of stdlib modules (code, comments
and docstrings: English prose and Python), which every CPython installation
ships. Installations stripped of .py sources fall back to the stdlib's LICENSE
text and then to the docstrings of stdlib modules, which live in memory and are
always there. The selection is deterministic for a given Python.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

# Prose-heavy, stable modules first; the order fixes the corpus.
_MODULES = (
    "argparse.py", "textwrap.py", "dataclasses.py", "functools.py", "random.py",
    "statistics.py", "fractions.py", "difflib.py", "calendar.py", "pprint.py",
    "shlex.py", "heapq.py", "bisect.py", "string.py", "enum.py", "typing.py",
)
_DOCSTRING_MODULES = ("os", "re", "json", "math", "random", "argparse", "textwrap", "functools",
                      "collections", "itertools", "typing", "dataclasses", "statistics")
MAX_CHARS = 600_000

# Fixed vocabulary: tab, newline and printable ASCII; anything else becomes "?".
# Fixed (not derived from the text) so ids mean the same on every machine.
VOCAB = "\t\n" + "".join(chr(c) for c in range(32, 127))
_UNKNOWN = VOCAB.index("?")


@dataclass
class Corpus:
    """Encoded text split into train (90%) and validation (10%, see load_corpus).

    train, val: 1-D int64 CPU tensors of character ids in [0, len(VOCAB)).
    """

    train: torch.Tensor
    val: torch.Tensor
    source: str           # where the text came from, for the output
    n_chars: int

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)


def encode(text: str) -> torch.Tensor:
    """Character ids (int64, CPU) under the fixed VOCAB."""
    # A 128-entry lookup over the ASCII bytes: fast for the ~0.5 MB corpus.
    table = torch.full((128,), _UNKNOWN, dtype=torch.int64)
    for i, ch in enumerate(VOCAB):
        table[ord(ch)] = i
    raw = text.encode("ascii", errors="replace")  # non-ASCII -> b"?"
    if not raw:
        return torch.empty(0, dtype=torch.int64)
    return table[torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()]


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def _stdlib_dir() -> str:
    return os.path.dirname(os.__file__)


def read_text(max_chars: int = MAX_CHARS) -> tuple[str, str]:
    """(text, source description): stdlib sources, else LICENSE, else docstrings."""
    root = _stdlib_dir()
    parts, used = [], []
    for name in _MODULES:
        path = os.path.join(root, name)
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                parts.append(fh.read())
        except OSError:
            continue
        used.append(name)
        if sum(map(len, parts)) >= max_chars:
            break
    text = "".join(parts)
    if len(text) >= 50_000:
        return text[:max_chars], f"Python {_python_version()} stdlib sources ({', '.join(used)}) in {root}"
    for name in ("LICENSE.txt", "LICENSE"):
        try:
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as fh:
                lic = fh.read()
        except OSError:
            continue
        if len(lic) >= 10_000:
            return lic[:max_chars], f"Python's {name} in {root}"
    docs = []
    for mod in _DOCSTRING_MODULES:
        m = importlib.import_module(mod)
        docs.append(m.__doc__ or "")
        for attr in sorted(dir(m)):
            doc = getattr(getattr(m, attr, None), "__doc__", None)
            if isinstance(doc, str):
                docs.append(doc)
    return "\n\n".join(docs)[:max_chars], "docstrings of Python stdlib modules"


def _python_version() -> str:
    import platform

    return platform.python_version()


def load_corpus(max_chars: int = MAX_CHARS, val_every: int = 10, block: int = 4096) -> Corpus:
    """The corpus, split by blocks of `block` characters: every `val_every`-th
    block is validation text, the rest training text. Interleaving keeps both
    splits drawn from every source file (a tail split would validate on one
    file only)."""
    text, source = read_text(max_chars)
    ids = encode(text)
    blocks = list(torch.split(ids, block))
    val = [b for i, b in enumerate(blocks) if i % val_every == val_every - 1]
    train = [b for i, b in enumerate(blocks) if i % val_every != val_every - 1]
    if not val:  # a text shorter than val_every blocks: hold out its last tenth
        n_val = max(1, len(ids) // val_every)
        train, val = [ids[:-n_val]], [ids[-n_val:]]
    return Corpus(train=torch.cat(train), val=torch.cat(val), source=source, n_chars=len(ids))


def batch_offsets(n_tokens: int, context: int, batch_size: int, n_batches: int,
                  seed: int) -> torch.Tensor:
    """(n_batches, batch_size) int64 start offsets, fixed by `seed`.

    Drawn once up front so every run (fp32, AMP) sees exactly the same batches
    in the same order, whatever each run does with the global RNG.
    """
    if n_tokens <= context + 1:
        raise ValueError(f"the text ({n_tokens} chars) is shorter than the context + 1 ({context + 1})")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - context - 1, (n_batches, batch_size), generator=gen)


def make_batch(ids: torch.Tensor, offsets: torch.Tensor, context: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs (B, context) and next-character targets (B*context,), int64 on `device`."""
    idx = offsets[:, None] + torch.arange(context + 1)[None, :]
    chunk = ids[idx]
    x = chunk[:, :-1].contiguous()
    y = chunk[:, 1:].reshape(-1)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
