"""Which tokenizer a run directory or an exported SavedModel has, by its file.

A run keeps its tokenizer beside config.json, and an export carries it as
an asset: `vocab.txt` for the word tokenizer (`tfgpt.data.text.Tokenizer`),
`subword.json` for the subword one (`tfgpt.data.subword.SubwordTokenizer`).
The file's name says which it is, so the sampler, the export and the
commands that read a run choose the tokenizer from the file they find.
"""

from __future__ import annotations

from pathlib import Path

from tfgpt.data.subword import SUBWORD_FILE, SubwordTokenizer
from tfgpt.data.text import Tokenizer

WORD_FILE = "vocab.txt"

# config.json's `tokenizer` -> the name of its file.
FILES = {"word": WORD_FILE, "subword": SUBWORD_FILE}


def kind_of(path) -> str:
    """The tokenizer of a file: subword for subword.json (or any .json file),
    else word (a vocabulary file, vocab.txt: tab-separated text)."""
    path = Path(str(path))
    return "subword" if path.name == SUBWORD_FILE or path.suffix == ".json" else "word"


def load(path):
    """The in-graph tokenizer of the file at path (its tables are created
    here, outside any tf.function, so a SavedModel carries the file as an asset)."""
    return SubwordTokenizer(str(path)) if kind_of(path) == "subword" else Tokenizer(str(path))


def file_in(folder) -> Path | None:
    """The tokenizer file in folder (a run directory, or a SavedModel's
    assets folder): subword.json or vocab.txt; None when it holds neither."""
    for name in (SUBWORD_FILE, WORD_FILE):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None
