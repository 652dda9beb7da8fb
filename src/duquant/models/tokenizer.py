"""Prompt tokenisation as openpi's `PaligemmaTokenizer` (src/openpi/models/tokenizer.py) does it.

The prompt is cleaned (`strip()`, "_" -> " ", "\\n" -> " "), then
- pi0 (no state): BOS + tokens(prompt) + tokens("\\n")   ("\\n" encoded on its own: the start-of-answer token);
- pi0.5 with discrete state: BOS + tokens("Task: <prompt>, State: <s_1 s_2 ...>;\\nAction: "), where s_i is the
  normalized state in 256 bins over [-1, 1] (np.digitize(state, linspace(-1, 1, 257)[:-1]) - 1);
then padded with 0 (mask False) or truncated to max_len. Returns (tokens int64 (max_len,), mask bool (max_len,)).

`load_tokenizer(path)` needs PaliGemma's SentencePiece model (`paligemma_tokenizer.model`; openpi downloads it from
gs://big_vision/ into ~/.cache/openpi/big_vision/) and the `sentencepiece` package (imported lazily).
`load_tokenizer(None)` gives `FallbackTokenizer`: a deterministic stand-in FOR TESTS AND DEMOS ONLY, which hashes
words into a small vocabulary; a real checkpoint fed its tokens produces meaningless actions.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

log = logging.getLogger(__name__)


class PaligemmaTokenizer:
    def __init__(self, model_path: str | os.PathLike, max_len: int = 48):
        try:
            import sentencepiece
        except ImportError as err:
            raise ImportError("tokenizing prompts needs the sentencepiece package: pip install sentencepiece "
                              "(or pip install 'duquant[tokenizer]')") from err
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"no SentencePiece model at {model_path}; pass PaliGemma's "
                                    "paligemma_tokenizer.model (openpi caches it in ~/.cache/openpi/big_vision/)")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        except Exception as err:
            raise ValueError(f"{model_path} is not a SentencePiece model ({err})") from err
        self.max_len = max_len
        self.vocab_size = self._sp.get_piece_size()

    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        text = _clean(prompt)
        if state is None:
            ids = self._sp.encode(text, add_bos=True) + self._sp.encode("\n")
        else:
            ids = self._sp.encode(_pi05_prompt(text, state), add_bos=True)
        return _pad(ids, self.max_len)


class FallbackTokenizer:
    """TESTS AND DEMOS ONLY - not PaliGemma's tokenizer. BOS (2), then each whitespace-separated word hashed
    (sha256) into [4, vocab_size), then a newline token (3) for pi0; same padding as openpi."""

    BOS, NEWLINE = 2, 3

    def __init__(self, vocab_size: int = 512, max_len: int = 48):
        if vocab_size < 8:
            raise ValueError("the fallback tokenizer needs a vocabulary of at least 8 tokens")
        self.vocab_size, self.max_len = vocab_size, max_len

    def _word(self, w: str) -> int:
        return 4 + int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little") % (self.vocab_size - 4)

    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        text = _clean(prompt)
        if state is None:
            ids = [self.BOS, *map(self._word, text.split()), self.NEWLINE]
        else:
            ids = [self.BOS, *map(self._word, _pi05_prompt(text, state).split())]
        return _pad(ids, self.max_len)


def _clean(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """openpi's 256-bin discretisation of a normalized state in [-1, 1] (below -1 gives -1, above 1 gives 255)."""
    return np.digitize(np.asarray(state), bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


def _pi05_prompt(text: str, state: np.ndarray) -> str:
    state_str = " ".join(map(str, discretize_state(state).tolist()))
    return f"Task: {text}, State: {state_str};\nAction: "


def _pad(ids: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) > max_len:
        log.warning("token length %d exceeds max length %d, truncating (raise max_token_len)", len(ids), max_len)
        ids = ids[:max_len]
    n = len(ids)
    tokens = np.zeros(max_len, dtype=np.int64)
    tokens[:n] = ids
    return tokens, np.arange(max_len) < n


def load_tokenizer(path: str | os.PathLike | None, max_len: int = 48, vocab_size: int = 512
                   ) -> PaligemmaTokenizer | FallbackTokenizer:
    """PaliGemma's tokenizer from the SentencePiece model at `path`; with path None, the fallback (tests only)."""
    if path is None:
        return FallbackTokenizer(vocab_size, max_len)
    return PaligemmaTokenizer(path, max_len)
