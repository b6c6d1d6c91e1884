"""The ledger task: a long, exactly checkable answer for the ``tiny-llada-long`` diffusion LM.

A ledger line is 8 tokens: a line number, five lowercase words, a count digit and a running total digit:

    L07 cat sun red box cup 4 9

From one line to the next the words rotate left by one, the count goes up by one (mod 10) and the
total adds the new count (mod 10); the line number goes up by one:

    L08 sun red box cup cat 5 4

A prompt is a fixed instruction, then the first ``num_lines`` lines of a ledger (random words, count and
total); the answer continues it for ``num_lines`` more lines (L32 ... L63 with the defaults). Every
whitespace-separated token is one token of the word-level tokenizer built here. With the defaults the
prompt is 271 tokens and the answer 256.

Every answer token follows from the line before it (offsets 7 to 11 tokens back), so the answer is
predictable from the prompt's last line, but only through the chain of lines: a model that sees line
``r`` can commit line ``r + 1`` (8 tokens at once, more with depth), while committing lines far ahead of
the decoded ones too eagerly gives wrong words and totals.

The long setting (``gen_length`` 1024) asks the same question with 1024 positions to fill: the answer is
the same 256 tokens followed by ``<|eos|>`` padding, as LLaDA's SFT data pads answers (and as Fast-dLLM's
published 1024-token GSM8K runs look: most of the 1024 positions are EOS). Training covers 256, 512 and
1024.

Example:
    >>> task = LedgerTask()
    >>> ex = task.example(seed=3)
    >>> task.answer_of(ex.prompt) == ex.answer
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .kv_task import SeededExamples, TaskExample, word_level_tokenizer

SPECIAL_TOKENS = ("<|pad|>", "<|unk|>", "<|eos|>", "<|mdm_mask|>")
"""Special tokens of the task tokenizer, in id order (0, 1, 2, 3)."""

MASK_TOKEN_ID = SPECIAL_TOKENS.index("<|mdm_mask|>")
"""Mask token id of the task tokenizer."""

EOS_TOKEN_ID = SPECIAL_TOKENS.index("<|eos|>")
"""End-of-text id (the padding after the answer)."""

INSTRUCTION = "continue the ledger : rotate the words , add one to the count , add the count to the total :"
"""The fixed first line of every prompt."""

HELD_OUT_SEED_BASE = 2_000_000
"""Held-out instances use example seeds from here on; training draws its batches from another stream."""

WORDS = (
    "cat", "dog", "sun", "map", "tin", "red", "box", "cup", "owl", "bee", "oak", "fig", "hat", "jar",
    "key", "log", "net", "pen", "rug", "sky", "toy", "van", "web", "yak", "zip", "ant", "bus", "cow",
    "den", "egg", "fox", "gum", "hen", "ink", "jam", "kit", "lip", "mud", "nut", "pig", "ram", "sea",
    "tea", "urn", "vet", "wax", "axe", "bat", "cab", "dew", "elm", "fin", "gem", "hog", "ivy", "jet",
    "kin", "lab", "mop", "nib", "orb", "pod", "rib", "sap",
)  # fmt: skip
"""The 64 ledger words."""

WORDS_PER_LINE = 5
"""Words per line."""

LINE_TOKENS = WORDS_PER_LINE + 3
"""Tokens per line: number, words, count, total."""

MAX_LINES = 128
"""Line numbers ``L00`` ... ``L127`` are in the vocabulary."""


def next_line(line: list[str]) -> list[str]:
    """The ledger line after ``line`` (number + 1, words rotated left, count + 1, total + count)."""
    number, words, count, total = int(line[0][1:]), line[1:-2], int(line[-2]), int(line[-1])
    count = (count + 1) % 10
    return [f"L{number + 1:02d}", *words[1:], words[0], str(count), str((total + count) % 10)]


LedgerExample = TaskExample
"""One ledger instance: the instruction and the prompt's lines; the answer's lines (no EOS padding)."""


@dataclass(frozen=True)
class LedgerTask(SeededExamples):
    """The task's size; one object generates prompts, token ids and checks answers."""

    held_out_seed_base = HELD_OUT_SEED_BASE
    """Held-out instances use example seeds from here on (another range than the key-value task's)."""

    num_lines: int = 32
    """Lines in the prompt and lines in the answer (``8 * num_lines`` answer tokens: 256 by default)."""

    def __post_init__(self) -> None:
        if isinstance(self.num_lines, bool) or not isinstance(self.num_lines, int):
            raise ValueError(f"num_lines={self.num_lines!r} must be an integer in [1, {MAX_LINES // 2}]")
        if not 1 <= self.num_lines <= MAX_LINES // 2:
            raise ValueError(f"num_lines={self.num_lines!r} must be an integer in [1, {MAX_LINES // 2}]")

    @property
    def vocabulary(self) -> list[str]:
        """All tokens in id order: specials, instruction words, digits, line numbers, words."""
        out = list(SPECIAL_TOKENS)
        for tok in (*INSTRUCTION.split(), *map(str, range(10))):
            if tok not in out:
                out.append(tok)
        return out + [f"L{i:02d}" for i in range(MAX_LINES)] + list(WORDS)

    @property
    def answer_length(self) -> int:
        """Answer tokens (without EOS padding)."""
        return LINE_TOKENS * self.num_lines

    def prompt_length(self) -> int:
        """Prompt tokens (instruction + lines)."""
        return len(INSTRUCTION.split()) + LINE_TOKENS * self.num_lines

    def sample(self, rng: random.Random) -> tuple[list[str], list[str]]:
        """``(prompt tokens, answer tokens)`` drawn with ``rng``."""
        count, total = rng.randrange(10), rng.randrange(10)
        line = ["L00", *(rng.choice(WORDS) for _ in range(WORDS_PER_LINE)), str(count), str(total)]
        lines = [line]
        for _ in range(2 * self.num_lines - 1):
            lines.append(next_line(lines[-1]))
        prompt = INSTRUCTION.split() + [t for ln in lines[: self.num_lines] for t in ln]
        return prompt, [t for ln in lines[self.num_lines :] for t in ln]

    def answer_of(self, prompt: str) -> str | None:
        """The correct answer of a prompt in the task's format (continued from its last line); ``None``
        if the prompt does not end with a well-formed line."""
        words = (prompt or "").split()
        last = words[-LINE_TOKENS:]
        if len(last) != LINE_TOKENS or not (last[0][:1] == "L" and last[0][1:].isdigit()):
            return None
        if any(w not in WORDS for w in last[1:-2]) or not all(t.isdigit() and len(t) == 1 for t in last[-2:]):
            return None
        if int(last[0][1:]) + self.num_lines >= MAX_LINES:
            return None
        out, line = [], last
        for _ in range(self.num_lines):
            line = next_line(line)
            out += line
        return " ".join(out)

    def score(self, generated: str, answer: str) -> tuple[bool, float]:
        """``(exact match, per-token accuracy)`` of ``generated`` against ``answer``.

        Tokens are compared position by position over the answer's length (missing tokens count wrong);
        the exact match needs the whole text equal (EOS is dropped by decoding).
        """
        got, want = generated.split(), answer.split()
        hits = sum(g == w for g, w in zip(got, want))
        return got == want, hits / len(want)

    def build_tokenizer(self):
        """A word-level ``PreTrainedTokenizerFast`` over :attr:`vocabulary`, built in code."""
        return word_level_tokenizer(self.vocabulary)


__all__ = [
    "EOS_TOKEN_ID",
    "HELD_OUT_SEED_BASE",
    "INSTRUCTION",
    "LINE_TOKENS",
    "LedgerExample",
    "LedgerTask",
    "MASK_TOKEN_ID",
    "MAX_LINES",
    "SPECIAL_TOKENS",
    "WORDS",
    "WORDS_PER_LINE",
    "next_line",
]
