"""Prompt tokenisation as openpi's PaligemmaTokenizer does it, from a user-given SentencePiece model.

pi0: BOS + tokens of `prompt.strip() + "\n"`, padded/truncated to max_token_len.
pi0.5 with discrete state: "Task: <prompt>, State: <256-bin state ints>;\nAction: ".
No tokenizer can be downloaded here: pass the path of PaliGemma's `paligemma_tokenizer.model` (openpi caches it
under `~/.cache/openpi/big_vision/`). `FallbackTokenizer` is a deterministic stand-in for tests and demos only.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np


class PaligemmaTokenizer:
    def __init__(self, model_path: str | os.PathLike, max_len: int = 48):
        try:
            import sentencepiece
        except ImportError as err:
            raise ImportError("tokenizing prompts needs sentencepiece: pip install 'duquant[tokenizer]'") from err
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"no SentencePiece model at {model_path}; pass PaliGemma's "
                                    "paligemma_tokenizer.model (openpi caches it in ~/.cache/openpi/big_vision/)")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.max_len = max_len

    def _encode(self, text: str) -> list[int]:
        return [self._sp.bos_id(), *self._sp.encode(text)]

    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return _pad(self._encode(_prompt_text(prompt, state)), self.max_len)


class FallbackTokenizer:
    """Tests/demos only: hashes words into the tiny vocabulary. Not PaliGemma's tokenizer."""

    def __init__(self, vocab_size: int = 512, max_len: int = 48):
        self.vocab_size, self.max_len = vocab_size, max_len

    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        ids = [2] + [3 + int(hashlib.sha256(w.encode()).hexdigest(), 16) % (self.vocab_size - 3)
                     for w in _prompt_text(prompt, state).split()]
        return _pad(ids, self.max_len)


def _prompt_text(prompt: str, state: np.ndarray | None) -> str:
    cleaned = prompt.strip().replace("_", " ").replace("\n", " ")
    if state is None:
        return cleaned + "\n"
    bins = np.digitize(np.asarray(state, dtype=np.float64), np.linspace(-1, 1, 257)[:-1]) - 1
    return f"Task: {cleaned}, State: {' '.join(map(str, bins.tolist()))};\nAction: "


def _pad(ids: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    ids = ids[:max_len]
    mask = [True] * len(ids) + [False] * (max_len - len(ids))
    return np.asarray(ids + [0] * (max_len - len(ids)), dtype=np.int64), np.asarray(mask)


def load_tokenizer(path: str | os.PathLike | None, max_len: int = 48, vocab_size: int = 512):
    """PaliGemma's tokenizer from `path`, or (path None) the fallback for tests and tiny models."""
    if path is None:
        return FallbackTokenizer(vocab_size, max_len)
    return PaligemmaTokenizer(path, max_len)
