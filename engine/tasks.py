"""Synthetic long-context tasks, generated from a seed (no downloads), and their scorers.

- `passkey`: a 5-digit key hidden in repeated filler at a random depth (Mohtashami & Jaggi 2023,
  "Landmark Attention"), asked for in raw-completion form. The filler is one repeated sentence
  of plain prose (`PROSE`) rather than the paper's "The grass is green..." lines: over those,
  SmolLM2-135M-Instruct retrieves the key in 1 of 8 samples at 2,400 tokens against 7 of 8
  over prose (CPU, 2026-11-23), so the task would measure the filler, not the compression.
- `niah_single`, `niah_multikey`, `niah_multivalue`: RULER's needle-in-a-haystack variants
  (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
  Models?") over RULER's "noise" haystack: one needle; several needles with different keys, one
  asked; several values of one key, all asked.
- `variable_tracking`: RULER's chains of variable assignments (VAR X = 12345, VAR Y = X, ...);
  every variable holding the value is asked for.
- `common_words`, `frequent_words`: RULER's common- and frequent-word extraction: the 10 words
  repeated most often in a list, or the 3 most frequent coded words.

Scoring follows RULER: a sample scores the fraction of its reference strings found in the output
(`string_match_all`; passkey and single-needle tasks have one reference, so 1 or 0).
"""

import dataclasses
from typing import Callable

import numpy as np

from pallas_kernels.errors import UserError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PROSE = ("The history of the region is long and complicated, and many people have written about "
         "it over the years in books and letters.")
WORDS = (
    "apple river stone cloud garden window silver forest candle bridge mountain pencil ocean "
    "thunder blanket mirror harbor lantern meadow violin castle feather island rocket velvet "
    "compass desert orchard glacier pepper saddle tunnel anchor bamboo cactus dragon falcon "
    "ginger hammer jacket kettle ladder magnet nectar oyster parrot quartz rabbit shadow "
    "tomato umbrella valley walnut yogurt zipper basket cotton dolphin engine fossil goblet "
    "helmet igloo jungle koala lemon marble needle olive pillow quiver ribbon spider tiger "
    "uniform vessel wagon yarn zebra acorn beacon cobalt dynamo ember fabric gravel hazel "
    "indigo jasmine kernel lotus mango nickel onion pearl quill raven saffron tulip"
).split()


@dataclasses.dataclass(frozen=True)
class Sample:
    context: str  # what compression acts on
    question: str  # appended after compression
    answers: tuple[str, ...]  # every reference string expected in the output


def string_match_all(output: str, answers) -> float:
    """RULER's score: the fraction of references that occur in the output (case-insensitive)."""
    output = output.lower()
    return sum(answer.lower() in output for answer in answers) / len(answers)


class _Haystack:
    """Fills a context of about `tokens` tokens with filler, with insertions at given depths."""

    def __init__(self, count_tokens: Callable[[str], int], tokens: int, filler: str = NOISE):
        self.filler = filler
        self.repeats = max(1, tokens // max(1, count_tokens(filler + " ")))

    def build(self, insertions: list[tuple[float, str]]) -> str:
        pieces = [self.filler] * self.repeats
        for depth, text in sorted(insertions, reverse=True):
            pieces.insert(round(depth * self.repeats), text)
        return " ".join(pieces)


def _number(rng) -> str:
    return str(rng.integers(10000, 100000))


def _key(rng) -> str:
    return "-".join(rng.choice(WORDS, 2, replace=False))


def passkey(rng, haystack: _Haystack) -> Sample:
    key = _number(rng)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    intro = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
             "memorize it. I will quiz you about the important information there.\n\n")
    return Sample(intro + haystack.build([(rng.uniform(), needle)]),
                  "\n\nWhat is the pass key? The pass key is", (key,))


def _niah(rng, haystack: _Haystack, keys: int, values: int) -> Sample:
    names = [_key(rng) for _ in range(keys)]
    asked = names[0]
    numbers = {name: [_number(rng) for _ in range(values if name == asked else 1)]
               for name in names}
    needles = [(rng.uniform(), f"One of the special magic numbers for {name} is: {number}.")
               for name in names for number in numbers[name]]
    intro = ("Some special magic numbers are hidden within the following text. Make sure to "
             "memorize it. I will quiz you about the numbers afterwards.\n")
    plural = "numbers" if values > 1 else "number"
    question = (f"\nWhat {'are all the' if values > 1 else 'is the'} special magic {plural} for "
                f"{asked} mentioned in the provided text? The special magic {plural} for {asked} "
                "mentioned in the provided text")
    return Sample(intro + haystack.build(needles), question + (" are" if values > 1 else " is"),
                  tuple(numbers[asked]))


def niah_single(rng, haystack):
    return _niah(rng, haystack, keys=1, values=1)


def niah_multikey(rng, haystack):
    return _niah(rng, haystack, keys=4, values=1)


def niah_multivalue(rng, haystack):
    return _niah(rng, haystack, keys=1, values=4)


def variable_tracking(rng, haystack: _Haystack, hops: int = 4) -> Sample:
    value = _number(rng)
    names = ["".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 5)) for _ in range(hops + 1)]
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}."
                                               for i in range(1, hops + 1)]
    depths = np.sort(rng.uniform(size=len(chain)))
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text "
                f"above. Answer: According to the chain(s) of variable assignment in the text "
                f"above, {len(chain)} variables are assigned the value {value}, they are:")
    return Sample(intro + haystack.build(list(zip(depths, chain))), question, tuple(names))


def _word_list_task(rng, count_tokens, tokens: int, top: int, frequent: bool) -> Sample:
    vocabulary = list(rng.permutation(WORDS))
    if frequent:  # Zipf-like counts over coded words (RULER fwe)
        counts = {w: max(1, int(60 / (rank + 1) ** 1.3)) for rank, w in enumerate(vocabulary[:30])}
    else:  # `top` words repeated often, the rest rarely (RULER cwe)
        counts = {w: (30 if i < top else 3) for i, w in enumerate(vocabulary)}
    numbered = lambda words: " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    words = [w for w, c in counts.items() for _ in range(c)]
    per_item = max(1.0, count_tokens(numbered(words)) / len(words))
    scale = max(1.0, tokens / per_item / len(words))
    words = [str(w) for w, c in counts.items() for _ in range(round(c * scale))]
    listing = numbered(rng.permutation(words))
    answers = tuple(str(w) for w in sorted(counts, key=counts.get, reverse=True)[:top])
    context = (f"Below is a numbered list of words. In these words, some appear more often than "
               f"others. Memorize the ones that appear most often.\n{listing}\n")
    question = (f"Question: What are the {top} most common words in the above list? Answer: The "
                f"top {top} words that appear most often in the list are:")
    return Sample(context, question, answers)


TASKS = {
    "passkey": passkey,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "variable_tracking": variable_tracking,
    "common_words": lambda rng, count, tokens: _word_list_task(rng, count, tokens, 10, False),
    "frequent_words": lambda rng, count, tokens: _word_list_task(rng, count, tokens, 3, True),
}
WORD_LIST_TASKS = ("common_words", "frequent_words")


def make_samples(task: str, count_tokens: Callable[[str], int], context_tokens: int,
                 num_samples: int, seed: int) -> list[Sample]:
    """`num_samples` samples of `task` with contexts of about `context_tokens` tokens."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, list(TASKS).index(task)])
    if task in WORD_LIST_TASKS:
        return [TASKS[task](rng, count_tokens, context_tokens) for _ in range(num_samples)]
    haystack = _Haystack(count_tokens, context_tokens, PROSE if task == "passkey" else NOISE)
    return [TASKS[task](rng, haystack) for _ in range(num_samples)]
