"""Key-value retrieval: the synthetic task the shipped tiny diffusion LM is trained and scored on.

A prompt is a haystack of ``num_filler`` filler words (``the``, ``sky`` ...) with ``num_pairs`` pairs
``key value`` at random places (distinct keys drawn from ``k00`` ... ``k63``, values from ``v00`` ...
``v31``), then ``?``, ``num_queries`` of those keys in random order and ``->``; the answer is the values
of the queried keys, in query order. Every word is one word-level token of the tokenizer built here (a
``PreTrainedTokenizerFast``), so 32 pairs in 448 filler words make a 518-token prompt and the answer is
4 tokens. Answering needs attention from the answer to a pair anywhere in the prompt, which is
what sparse attention can get wrong: the exact match of the whole answer is the fidelity figure.

Example:
    >>> task = KVTask()
    >>> example = task.example(seed=3)
    >>> example.prompt[:30], example.answer
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SPECIAL_TOKENS = ("<|pad|>", "<|unk|>", "<|eos|>", "<|mdm_mask|>")
"""Special tokens of the task tokenizer, in id order (0, 1, 2, 3)."""

MASK_TOKEN_ID = SPECIAL_TOKENS.index("<|mdm_mask|>")
"""Mask token id of the task tokenizer."""

QUERY_MARK = "?"
"""Token between the pairs and the queried keys."""

ANSWER_MARK = "->"
"""Token that ends the prompt; the answer follows it."""

HELD_OUT_SEED_BASE = 1_000_000
"""Held-out instances use example seeds from here on; training draws its batches from another stream."""


FILLER_WORDS = (
    "the", "sky", "is", "blue", "and", "grass", "green", "a", "cat", "sat", "on", "mat", "we", "walk",
    "by", "river", "at", "dawn", "birds", "sing", "of", "old", "hills", "rain", "falls", "soft", "light",
    "wind", "moves", "through", "tall", "trees",
)  # fmt: skip
"""The haystack vocabulary (32 words)."""


def key_words(num_keys: int) -> list[str]:
    """The key vocabulary: ``k00``, ``k01``, ..."""
    return [f"k{i:02d}" for i in range(num_keys)]


def value_words(num_values: int) -> list[str]:
    """The value vocabulary: ``v00``, ``v01``, ..."""
    return [f"v{i:02d}" for i in range(num_values)]


@dataclass(frozen=True)
class KVExample:
    """One task instance."""

    prompt: str
    """Pairs, ``?``, the queried keys, ``->`` (space-separated words)."""
    answer: str
    """The queried keys' values, space-separated, in query order."""
    num_pairs: int
    """Number of ``key value`` pairs in the prompt."""


@dataclass(frozen=True)
class KVTask:
    """The task's sizes; one object generates prompts, token ids and checks answers."""

    num_keys: int = 64
    """Size of the key vocabulary."""
    num_values: int = 32
    """Size of the value vocabulary."""
    num_pairs: int = 32
    """Pairs per prompt at evaluation."""
    num_filler: int = 448
    """Filler words per prompt at evaluation (32 pairs + 448 filler words = 518 prompt tokens)."""
    num_queries: int = 4
    """Queried keys per prompt (= answer tokens)."""

    def __post_init__(self) -> None:
        if isinstance(self.num_filler, bool) or not isinstance(self.num_filler, int) or self.num_filler < 0:
            raise ValueError(f"num_filler={self.num_filler!r} must be an integer >= 0")
        for name in ("num_keys", "num_values", "num_pairs", "num_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.num_keys > 100 or self.num_values > 100:
            raise ValueError(
                f"num_keys={self.num_keys}, num_values={self.num_values}: allowed at most 100 keys and 100 values"
            )
        if self.num_pairs > self.num_keys:
            raise ValueError(
                f"num_pairs={self.num_pairs} must be <= num_keys={self.num_keys} (keys are distinct)"
            )
        if self.num_queries > self.num_pairs:
            raise ValueError(f"num_queries={self.num_queries} must be <= num_pairs={self.num_pairs}")

    @property
    def vocabulary(self) -> list[str]:
        """All tokens in id order: specials, the two marks, keys, values."""
        return [
            *SPECIAL_TOKENS,
            QUERY_MARK,
            ANSWER_MARK,
            *FILLER_WORDS,
            *key_words(self.num_keys),
            *value_words(self.num_values),
        ]

    def prompt_length(self) -> int:
        """Prompt tokens of an evaluation instance."""
        return 2 * self.num_pairs + self.num_filler + self.num_queries + 2

    def haystack(
        self, rng: random.Random, num_pairs: int | None = None, num_filler: int | None = None
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """``(words, pairs)``: filler words with ``num_pairs`` ``(key, value)`` pairs at random places."""
        n = self.num_pairs if num_pairs is None else num_pairs
        f = self.num_filler if num_filler is None else num_filler
        if not self.num_queries <= n <= self.num_keys:
            raise ValueError(f"num_pairs={n} must be in [{self.num_queries}, {self.num_keys}]")
        keys = rng.sample(range(self.num_keys), n)
        pairs = [(f"k{k:02d}", f"v{rng.randrange(self.num_values):02d}") for k in keys]
        items = [list(p) for p in pairs] + [[rng.choice(FILLER_WORDS)] for _ in range(f)]
        rng.shuffle(items)
        return [w for item in items for w in item], pairs

    def sample(
        self, rng: random.Random, num_pairs: int | None = None, num_filler: int | None = None
    ) -> tuple[list[str], list[str]]:
        """``(prompt words, answer words)`` drawn with ``rng``."""
        words, pairs = self.haystack(rng, num_pairs, num_filler)
        queried = rng.sample(pairs, self.num_queries)
        words = [*words, QUERY_MARK, *(k for k, _ in queried), ANSWER_MARK]
        return words, [v for _, v in queried]

    def example(self, seed: int) -> KVExample:
        """The evaluation instance of example seed ``seed`` (the same text on every machine)."""
        words, answer = self.sample(random.Random(seed))
        return KVExample(" ".join(words), " ".join(answer), self.num_pairs)

    def held_out(self, count: int) -> list[KVExample]:
        """The fixed held-out set: ``count`` instances from seeds ``HELD_OUT_SEED_BASE + i``."""
        return [self.example(HELD_OUT_SEED_BASE + i) for i in range(count)]

    def answer_of(self, prompt: str) -> str | None:
        """The correct answer of a prompt in the task's format; ``None`` if it is not one."""
        words = prompt.split()
        if QUERY_MARK not in words or not words or words[-1] != ANSWER_MARK:
            return None
        cut = words.index(QUERY_MARK)
        haystack, queried = words[:cut], words[cut + 1 : -1]
        table = {a: b for a, b in zip(haystack, haystack[1:]) if a.startswith("k") and b.startswith("v")}
        if any(k not in table for k in queried):
            return None
        return " ".join(table[k] for k in queried)

    @staticmethod
    def is_correct(generated: str, answer: str) -> bool:
        """Exact match of the whole answer (whitespace-normalised)."""
        return generated.split() == answer.split()

    def build_tokenizer(self):
        """A word-level ``PreTrainedTokenizerFast`` over :attr:`vocabulary`, built in code."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {tok: i for i, tok in enumerate(self.vocabulary)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="<|pad|>",
            unk_token="<|unk|>",
            eos_token="<|eos|>",
            mask_token="<|mdm_mask|>",
            padding_side="left",
        )


__all__ = [
    "ANSWER_MARK",
    "FILLER_WORDS",
    "HELD_OUT_SEED_BASE",
    "KVExample",
    "KVTask",
    "MASK_TOKEN_ID",
    "QUERY_MARK",
    "SPECIAL_TOKENS",
    "key_words",
    "value_words",
]
