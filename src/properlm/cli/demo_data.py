"""The demo's data set: numbers written in digits -> the same numbers in English words.

A deterministic translation-like task with an exact reference::

    >>> number_to_words(4721)
    'four thousand seven hundred twenty-one'
    >>> number_to_words(100005)
    'one hundred thousand five'

:func:`make_number_dataset` draws disjoint train/test sets of numbers (a mix of magnitudes,
so that short and long numbers both occur) from a seeded generator, and
:func:`write_parallel` writes them as line-aligned ``.digits``/``.words`` files that
``properlm train --source-file/--target-file`` reads.
"""

from __future__ import annotations

import os
import random

__all__ = ["make_number_dataset", "number_to_words", "write_parallel"]

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_ONES[hundreds], "hundred"]
    if rest:
        if rest < 20:
            words.append(_ONES[rest])
        else:
            tens, ones = divmod(rest, 10)
            words.append(_TENS[tens] + (f"-{_ONES[ones]}" if ones else ""))
    return words


def number_to_words(n: int) -> str:
    """English words for ``0 <= n < 10**9`` (American style, no "and", hyphenated tens)."""
    if not 0 <= n < 10**9:
        raise ValueError(f"number_to_words handles 0 <= n < 10**9, got {n}")
    if n == 0:
        return "zero"
    words: list[str] = []
    for value, name in ((10**6, "million"), (10**3, "thousand"), (1, "")):
        part, n = divmod(n, value)
        if part:
            words += _below_thousand(part) + ([name] if name else [])
    return " ".join(words)


def make_number_dataset(
    train_size: int, test_size: int, seed: int = 0, max_digits: int = 6
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Disjoint ``(digits, words)`` pairs for training and testing.

    The number of digits is drawn uniformly from ``1..max_digits``, then the number uniformly
    among those with that many digits, so short numbers are not swamped by long ones.
    """
    if train_size <= 0 or test_size <= 0:
        raise ValueError("train_size and test_size must be positive")
    capacity = 10**max_digits
    if train_size + test_size > capacity // 2:
        raise ValueError(f"cannot draw {train_size + test_size} distinct numbers below {capacity}")
    rng = random.Random(seed)
    seen: set[int] = set()
    numbers: list[int] = []
    while len(numbers) < train_size + test_size:
        d = rng.randint(1, max_digits)
        lo = 0 if d == 1 else 10 ** (d - 1)
        n = rng.randrange(lo, 10**d)
        if n not in seen:
            seen.add(n)
            numbers.append(n)
    pairs = [(str(n), number_to_words(n)) for n in numbers]
    return pairs[:train_size], pairs[train_size:]


def write_parallel(pairs: list[tuple[str, str]], directory: str, name: str) -> tuple[str, str]:
    """Write ``directory/name.digits`` and ``directory/name.words``; returns both paths."""
    os.makedirs(directory, exist_ok=True)
    src = os.path.join(directory, f"{name}.digits")
    tgt = os.path.join(directory, f"{name}.words")
    with open(src, "w", encoding="utf-8") as f:
        f.write("".join(s + "\n" for s, _ in pairs))
    with open(tgt, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for _, t in pairs))
    return src, tgt
