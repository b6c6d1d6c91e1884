"""Field-value retrieval in a haystack: the synthetic task the shipped tiny diffusion LM is trained and
scored on (a passkey-style long-context retrieval test).

A prompt is ``num_filler`` filler words (``the``, ``sky`` ...) with one code token per field hidden at
random places (fields ``a``, ``b``, ``c``, ``d``; the code of field ``a`` is one of ``a00`` ... ``a15``),
then ``?`` and ``->``. The answer is the four codes in field order, e.g. ``a07 b12 c03 d09``. Every word
is one token of the word-level tokenizer built here (a ``PreTrainedTokenizerFast``); 512 filler words make
a 518-token prompt and the answer is 4 tokens. Each answer token must attend to one token anywhere in
the prompt, which is what sparse attention or a pruned window can lose: the exact match of the whole
answer is the fidelity figure (chance level ``16**-4``).

A key-value form with 64 queried keys was tried first; on this (heavily shared) 2-core CPU the model did
not leave the "copy any value" plateau within the training budget, so the task keeps the long prompt and
the exact answers but makes each field's code self-identifying (one hop of attention instead of two).

Example:
    >>> task = KVTask()
    >>> example = task.example(seed=3)
    >>> example.prompt[-40:], example.answer
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SPECIAL_TOKENS = ("<|pad|>", "<|unk|>", "<|eos|>", "<|mdm_mask|>")
"""Special tokens of the task tokenizer, in id order (0, 1, 2, 3)."""

MASK_TOKEN_ID = SPECIAL_TOKENS.index("<|mdm_mask|>")
"""Mask token id of the task tokenizer."""

QUERY_MARK = "?"
"""Token after the haystack."""

ANSWER_MARK = "->"
"""Token that ends the prompt; the answer follows it."""

HELD_OUT_SEED_BASE = 1_000_000
"""Held-out instances use example seeds from here on; training draws its batches from another stream."""

FIELDS = "abcdefgh"
"""Field names (the first ``num_fields`` are used)."""

FILLER_WORDS = (
    "the", "sky", "is", "blue", "and", "grass", "green", "a", "cat", "sat", "on", "mat", "we", "walk",
    "by", "river", "at", "dawn", "birds", "sing", "of", "old", "hills", "rain", "falls", "soft", "light",
    "wind", "moves", "through", "tall", "trees",
)  # fmt: skip
"""The haystack vocabulary (32 words)."""


@dataclass(frozen=True)
class TaskExample:
    """One instance of a trained tiny LM's task (this one's and the ledger's): a prompt and its exact answer."""

    prompt: str
    """The prompt, space-separated tokens of the task's vocabulary (here: the haystack with the hidden codes,
    then ``? ->``)."""
    answer: str
    """The answer, space-separated tokens without EOS padding (here: the codes in field order)."""


KVExample = TaskExample
"""One instance of the key-value task (the name this module has always used)."""


class SeededExamples:
    """What the trained tasks share: the instance of an example seed and a fixed held-out set; a task
    defines ``sample(rng) -> (prompt tokens, answer tokens)`` and its ``held_out_seed_base``."""

    held_out_seed_base = HELD_OUT_SEED_BASE
    """Held-out instances use example seeds from here on."""

    def example(self, seed: int) -> TaskExample:
        """The instance of example seed ``seed`` (the same text on every machine)."""
        prompt, answer = self.sample(random.Random(seed))
        return TaskExample(" ".join(prompt), " ".join(answer))

    def held_out(self, count: int) -> list[TaskExample]:
        """The fixed held-out set: ``count`` instances from seeds ``held_out_seed_base + i``."""
        return [self.example(self.held_out_seed_base + i) for i in range(count)]


@dataclass(frozen=True)
class KVTask(SeededExamples):
    """The task's sizes; one object generates prompts, token ids and checks answers."""

    num_fields: int = 4
    """Fields per prompt (= answer tokens)."""
    num_codes: int = 16
    """Codes per field."""
    num_filler: int = 512
    """Filler words per prompt at evaluation (512 + 4 codes + 2 marks = 518 prompt tokens)."""

    def __post_init__(self) -> None:
        if isinstance(self.num_filler, bool) or not isinstance(self.num_filler, int) or self.num_filler < 0:
            raise ValueError(f"num_filler={self.num_filler!r} must be an integer >= 0")
        if not isinstance(self.num_fields, int) or not 1 <= self.num_fields <= len(FIELDS):
            raise ValueError(f"num_fields={self.num_fields!r} must be an integer in [1, {len(FIELDS)}]")
        if not isinstance(self.num_codes, int) or not 2 <= self.num_codes <= 100:
            raise ValueError(f"num_codes={self.num_codes!r} must be an integer in [2, 100]")

    @property
    def fields(self) -> str:
        """The field letters in answer order."""
        return FIELDS[: self.num_fields]

    @property
    def vocabulary(self) -> list[str]:
        """All tokens in id order: specials, the two marks, filler words, codes."""
        codes = [f"{f}{i:02d}" for f in self.fields for i in range(self.num_codes)]
        return [*SPECIAL_TOKENS, QUERY_MARK, ANSWER_MARK, *FILLER_WORDS, *codes]

    def prompt_length(self) -> int:
        """Prompt tokens of an evaluation instance."""
        return self.num_filler + self.num_fields + 2

    def sample(self, rng: random.Random, num_filler: int | None = None) -> tuple[list[str], list[str]]:
        """``(prompt words, answer words)`` drawn with ``rng`` (``num_filler`` default: the task's)."""
        f = self.num_filler if num_filler is None else num_filler
        if f < 0:
            raise ValueError(f"num_filler={f} must be >= 0")
        codes = [f"{field}{rng.randrange(self.num_codes):02d}" for field in self.fields]
        words = [rng.choice(FILLER_WORDS) for _ in range(f)]
        for code in codes:
            words.insert(rng.randint(0, len(words)), code)
        return [*words, QUERY_MARK, ANSWER_MARK], codes

    def answer_of(self, prompt: str) -> str | None:
        """The correct answer of a prompt in the task's format; ``None`` if it is not one."""
        words = (prompt or "").split()
        if len(words) < 2 or words[-2:] != [QUERY_MARK, ANSWER_MARK]:
            return None
        found = {}
        for w in words[:-2]:
            if len(w) == 3 and w[0] in self.fields and w[1:].isdigit() and int(w[1:]) < self.num_codes:
                if w[0] in found:
                    return None
                found[w[0]] = w
        if len(found) != self.num_fields:
            return None
        return " ".join(found[f] for f in self.fields)

    @staticmethod
    def is_correct(generated: str, answer: str) -> bool:
        """Exact match of the whole answer (whitespace-normalised)."""
        return generated.split() == answer.split()

    def build_tokenizer(self):
        """A word-level ``PreTrainedTokenizerFast`` over :attr:`vocabulary`, built in code."""
        return word_level_tokenizer(self.vocabulary)


def word_level_tokenizer(vocabulary: list[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``vocabulary`` (ids in list order), built in code:
    whitespace split, the special tokens ``<|pad|>``, ``<|unk|>``, ``<|eos|>``, ``<|mdm_mask|>``, left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(vocabulary)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return fast_tokenizer(tok)


def fast_tokenizer(tok):
    """The ``PreTrainedTokenizerFast`` around the ``tokenizers.Tokenizer`` ``tok`` with the tiny models'
    :data:`SPECIAL_TOKENS` as pad / unk / eos / mask tokens and left padding."""
    from transformers import PreTrainedTokenizerFast

    pad, unk, eos, mask = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        unk_token=unk,
        eos_token=eos,
        mask_token=mask,
        padding_side="left",
    )


__all__ = [
    "fast_tokenizer",
    "word_level_tokenizer",
    "ANSWER_MARK",
    "FIELDS",
    "FILLER_WORDS",
    "HELD_OUT_SEED_BASE",
    "KVExample",
    "KVTask",
    "SeededExamples",
    "TaskExample",
    "MASK_TOKEN_ID",
    "QUERY_MARK",
    "SPECIAL_TOKENS",
]
