"""The text classifier's tokenizer, shared by every set-up of bench/processing.py.

One source: bench/processing.py writes this file's text into the model's processing.py, the middleman
(bench/peers/middleman.py) imports it, and the bench uses it for the client-side ids. Standard library and
numpy only, so it runs in pyserving's environment and in the middleman's.

Tokenizing: lowercase, split on whitespace, look each word up in the vocabulary (one word a line; line i is
id i + 2), OOV_ID for a word not in it, then pad with PAD_ID or truncate to LENGTH ids.
"""

from pathlib import Path

import numpy as np

LENGTH = 32
PAD_ID = 0
OOV_ID = 1


class Tokenizer:
    def __init__(self, folder):
        folder = Path(folder)
        words = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
        self.ids = {word: i + 2 for i, word in enumerate(w for w in words if w)}
        names = (folder / "labels.txt").read_text(encoding="utf-8").split("\n")
        self.labels = [name for name in names if name]
        self.label_bytes = np.array([name.encode() for name in self.labels], dtype=object)

    def encode(self, texts):
        """int64 [len(texts), LENGTH] ids of `texts` (str or UTF-8 bytes)."""
        out = np.full((len(texts), LENGTH), PAD_ID, dtype=np.int64)
        lookup = self.ids.get
        for row, text in enumerate(texts):
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            ids = [lookup(word, OOV_ID) for word in text.lower().split()[:LENGTH]]
            out[row, : len(ids)] = ids
        return out

    def names(self, classes):
        """The label names (str) of class ids."""
        return [self.labels[int(c)] for c in classes]
