"""Tasks with one right answer: does a bounded multi-state still hold the fact it will be asked about?

Perplexity averages over tokens that mostly need the recent past. These tasks ask for ONE thing said long ago:

- needle in a haystack: a sentence with a random number ("The secret number is 48213.") placed at depth d % of a
  passage of a book, the whole prompt exactly L tokens; then "What is the secret number?".
- associative recall: N key-value pairs ({"apple": 4821, "river": 9310, ...}), then questions about some of the
  keys ("What is the value of river?"), each asked of the same state after the pairs.

    trial = needle_trial(tokenizer, book_ids, length=1024, depth=50, seed=0)   # a Trial, the same for a seed
    trial.context, trial.queries[0].ids, trial.queries[0].answer               # token ids, token ids, "48213"
    is_correct("The secret number is 48,213.", "48213")                         # True: the first number given

Every prompt goes through the model's chat template: [template before the user's text] + context + question +
[template after it: the assistant's turn]. The pieces are encoded separately and concatenated, so the length of a
prompt and the token positions of the needle are exact (the needle's span is recorded, for the retention
recorder). A task is a pure function of its arguments: `random.Random` seeded by a string of the task's name and
coordinates (the same numbers on every machine and Python run), no global state.

Scoring is exact match of the first number in the greedy answer (thousands separators allowed): an answer that
names another number first is wrong, one that adds words around the right number is right.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .errors import InputError

NEEDLE = "The secret number is {value}."
NEEDLE_QUESTION = "What is the secret number?"
RECALL_QUESTION = "What is the value of {key}? Answer with the number only."
MARKER = "MSRNN_USER_TEXT"  # stands for the user's text while the chat template is rendered
# Keys of the recall task: common, concrete nouns (each a word the model knows, none a number).
KEY_WORDS = tuple("""apple river stone cloud tiger piano garden window candle silver forest bottle rabbit castle
dragon lemon mirror pencil rocket spider tomato violin wallet anchor basket camera dinner engine feather guitar hammer
island jacket kitten ladder magnet needle orange parrot pillow puzzle rainbow saddle tunnel umbrella valley wagon zebra
bridge button carpet doctor farmer flower hunter kettle letter market monkey nickel oyster palace planet pocket queen
robot sailor shadow ticket tower turtle winter cotton copper desert giant honey horse jungle knight lizard meadow ocean
pepper prince salmon school spoon summer sugar table thunder train violet water whale wheat wizard""".split())


@dataclass(frozen=True)
class Query:
    """One question: its token ids (the question and the template's opening of the assistant's turn) and the
    expected answer, a number as its digits."""

    ids: list[int]
    answer: str


@dataclass(frozen=True)
class Trial:
    """One prompt of a task: the context read first, then each query asked of the state the context left.

    key: unique in a run (the resume key); coords: where the trial sits in the grid ({"length", "depth", "seed"}
    or {"pairs", "seed"}); span: the needle's token indices [start, end) in the context, if any."""

    key: str
    context: list[int]
    queries: list[Query]
    coords: dict = field(default_factory=dict)
    span: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Token counts of the context and of each query: trials of one shape run in one batch."""
        return (len(self.context), *(len(q.ids) for q in self.queries))

    def __len__(self) -> int:
        return len(self.context) + sum(len(q.ids) for q in self.queries)


def chat_parts(tokenizer) -> tuple[list[int], list[int]]:
    """The chat template around one user message, as token ids: (before the user's text, after it up to where the
    assistant answers). Rendered once with a marker in place of the text, then split there."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("this tokenizer has no chat template: the tasks ask their question as a user's message. "
                         "Use a chat (instruct) model, such as the bundled SmolLM2-135M-Instruct.")
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARKER}], add_generation_prompt=True)
    if text.count(MARKER) != 1:
        raise InputError("this chat template does not show the user's message verbatim (once); the tasks cannot "
                         "place their text in it.")
    before, after = text.split(MARKER)
    return _encode(tokenizer, before), _encode(tokenizer, after)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False) if text else []  # the template writes BOS itself where it wants one


# --- needle in a haystack -------------------------------------------------------------------------------------------
def needle_trial(tokenizer, haystack: list[int], length: int, depth: float, seed: int, needle: str = NEEDLE,
                 question: str = NEEDLE_QUESTION, digits: int = 5, parts=None) -> Trial:
    """A prompt of exactly `length` tokens: a passage of `haystack` (a book's token ids) with the needle sentence
    at `depth` % of the passage, then the question.

    The passage and the number depend on (length, seed) only, so the depths of one seed differ in nothing but where
    the needle sits. Depths strictly between 0 and 100 move the needle to the nearest sentence end within 64 tokens
    (it reads as a sentence of the text); 0 and 100 put it before the first / after the last passage token. parts:
    chat_parts(tokenizer), if already computed."""
    if "{value}" not in needle:
        raise InputError(f"--needle {needle!r} must contain {{value}} where the number goes.")
    if not 0 <= depth <= 100:
        raise InputError(f"depth {depth}: give a percentage in 0..100.")
    if not 1 <= digits <= 18:
        raise InputError(f"digits {digits}: give 1..18.")
    before, after = parts or chat_parts(tokenizer)
    rng = random.Random(f"needle/{length}/{seed}")
    value = str(rng.randrange(10 ** (digits - 1), 10**digits))
    needle_ids = _encode(tokenizer, " " + needle.format(value=value))
    query = _encode(tokenizer, "\n\n" + question) + after
    n = length - len(before) - len(needle_ids) - len(query)  # passage tokens
    if n < 1:
        raise InputError(f"length {length}: the template, needle and question alone take {length - n} tokens; "
                         "give a longer length.")
    if n > len(haystack):
        raise InputError(f"length {length}: the haystack text has {len(haystack)} tokens, fewer than the {n} "
                         "needed; give a longer text or a shorter length.")
    start = rng.randrange(len(haystack) - n + 1)
    passage = haystack[start : start + n]
    at = round(depth / 100 * n)
    if 0 < at < n:
        at = _sentence_end(tokenizer, passage, at)
    context = before + passage[:at] + needle_ids + passage[at:]
    span = (len(before) + at, len(before) + at + len(needle_ids))
    return Trial(f"L{length}/d{depth:g}/s{seed}", context, [Query(query, value)],
                 {"length": length, "depth": depth, "seed": seed, "at": at, "passage_start": start}, span)


def _sentence_end(tokenizer, passage: list[int], at: int, reach: int = 64) -> int:
    """The index nearest `at` (within `reach` tokens, strictly inside the passage) right after a token that ends a
    sentence or a line; `at` itself if there is none."""
    for d in range(reach + 1):
        for i in (at - d, at + d):
            if 0 < i < len(passage) and _ends_sentence(tokenizer.decode([passage[i - 1]])):
                return i
    return at


def _ends_sentence(piece: str) -> bool:
    return "\n" in piece or piece.rstrip().rstrip("\"'”’)_").endswith((".", "!", "?"))


# --- associative recall ---------------------------------------------------------------------------------------------
def recall_trial(tokenizer, pairs: int, seed: int, queries: int = 4, question: str = RECALL_QUESTION,
                 words=KEY_WORDS, parts=None) -> Trial:
    """`pairs` distinct keys (from `words`) with distinct 4-digit values, written as a JSON object, then `queries`
    questions about distinct keys drawn uniformly among them (each answered from the state after the pairs)."""
    if "{key}" not in question:
        raise InputError(f"--question {question!r} must contain {{key}} where the key goes.")
    if not 1 <= pairs <= len(words):
        raise InputError(f"pairs {pairs}: give 1..{len(words)} (the number of key words).")
    if not 1 <= queries <= pairs:
        raise InputError(f"queries {queries}: give 1..{pairs} (each asks about a different one of the {pairs} keys).")
    before, after = parts or chat_parts(tokenizer)
    rng = random.Random(f"recall/{pairs}/{seed}")
    keys = rng.sample(list(words), pairs)
    values = [str(v) for v in rng.sample(range(1000, 10000), pairs)]
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in zip(keys, values)) + "}"
    asked = rng.sample(range(pairs), queries)
    return Trial(f"N{pairs}/s{seed}", before + _encode(tokenizer, text),
                 [Query(_encode(tokenizer, "\n\n" + question.format(key=keys[i])) + after, values[i]) for i in asked],
                 {"pairs": pairs, "seed": seed, "asked": [keys[i] for i in asked]})


# --- scoring --------------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+")  # 48,213 (thousands separators) or 48213


def parse_number(text: str) -> str | None:
    """The first number in an answer, as its digits (thousands separators removed); None if there is none."""
    match = _NUMBER.search(text)
    return match.group().replace(",", "") if match else None


def is_correct(answer: str, expected: str) -> bool:
    """Exact match of the answer's first number with the expected one (leading zeros count: "048" != "48")."""
    return parse_number(answer) == expected
