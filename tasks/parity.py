"""Parity of a list of bits (SPEC.md section 4): is the number of ones even (0) or odd (1)?

A problem is a tuple of bits, e.g. ``(1, 0, 1)``; its length is the number of bits.

Datasets (``training_problems`` / ``retuning_copies``), two presets:

* ``paper``: SPEC's sampling exactly. Baseline and scratchpad: per length n = 1..21,
  ``min(15000, max(300, int(0.2 * 2**n)))`` distinct lists (all of them when fewer exist),
  repeated x60 for n = 1-3, x20 for 4, x10 for 5-9, x4 for 10-14 (129,388 records from 101,912
  lists). Re-Tuning: 250,000 distinct lists of length 21, each solved through every suffix
  (41 records each, 10,250,000 raw); after de-duplication an input whose list is longer than 10
  is dropped with p = 0.9, longer than 16 with a further p = (L - 16) / 10 + 0.25 (one draw per
  distinct input, only where a drop can happen), and lengths 1..8 are repeated 900, 240, 100,
  50, 24, 12, 6, 4 times, a surviving length 11 four times. Measured once (problems drawn with
  seed 0): 2,208,738 distinct inputs, 124,121 records after drop/repeat (about 124,400 expected).
* ``small``: for a ~1M-parameter character-level model trained on a CPU in minutes, lengths
  1..10. Baseline and scratchpad: per length n, ``min(2**n, 2048)`` distinct lists, each repeated
  ``2048 // count`` times, so every length has exactly 2048 records (20,480 records). Re-Tuning:
  all 1,024 lists of length 10 (suffixes cover lengths 1..10; 19,456 raw records, 4,090 distinct);
  each distinct input of a length-L list is kept ``max(1, 1024 // 2**L)`` times, so every length
  weighs 2,048 records (1,024 for the base cases); then each combine whose call returned 0 is
  kept twice as often again: 24,064 records. The combine's answer is the first bit XOR the
  returned parity; with the two returns equally often neither bit alone says anything about the
  answer, a saddle that held the tiny model at chance for 160 to all of its 1,500 steps,
  depending on the seed. With returns of 0 twice as often, the answer is the first bit in 2 of 3
  combines, and every run left the saddle by step 590 (docs/tiny_model.md).

``lengths`` overrides the lengths of the lists drawn (for Re-Tuning: of the top-level lists,
whose suffixes supply every shorter length).
"""
from __future__ import annotations

import random
import re
from typing import Iterator

from tasks import protocol, register
from tasks.base import Task

Bits = tuple[int, ...]

# --- sampling ---------------------------------------------------------------------------------
PAPER_LENGTHS = list(range(1, 22))
PAPER_RETUNING_LENGTHS = [21]
PAPER_RETUNING_LISTS = 250_000
PAPER_REPEATS = {**dict.fromkeys((1, 2, 3), 60), 4: 20, **dict.fromkeys(range(5, 10), 10),
                 **dict.fromkeys(range(10, 15), 4)}
PAPER_RETUNING_REPEATS = {1: 900, 2: 240, 3: 100, 4: 50, 5: 24, 6: 12, 7: 6, 8: 4, 11: 4}
SMALL_LENGTHS = list(range(1, 11))
SMALL_RETUNING_LENGTHS = [10]
SMALL_RETUNING_LISTS = 1024
SMALL_RECORDS_PER_LENGTH = 2048
SMALL_EVEN_RETURN_WEIGHT = 2  # copies of a combine whose call returned 0, per one that returned 1


def paper_list_count(n: int) -> int:
    """How many distinct lists of length n the paper's baseline/scratchpad draws: 300 for n = 9."""
    return min(15000, max(300, int(0.2 * 2 ** n)))


def paper_keep_probability(n: int) -> float:
    """Chance that a distinct Re-Tuning input of a length-n list survives the paper's drop:
    1 up to n = 10, 0.1 up to 16, then ``0.1 * (1 - ((n - 16) / 10 + 0.25))`` (0.065 for 17)."""
    if n <= 10:
        return 1.0
    if n <= 16:
        return 0.1
    return max(0.0, 0.1 * (1 - ((n - 16) / 10 + 0.25)))


def distinct_lists(rng: random.Random, n: int, count: int) -> list[Bits]:
    """``count`` distinct bit lists of length n drawn uniformly without replacement, or all 2**n
    of them in counting order when count >= 2**n."""
    if count >= 2 ** n:
        numbers = range(2 ** n)
    else:
        numbers = rng.sample(range(2 ** n), count)
    return [tuple(int(bit) for bit in format(number, f"0{n}b")) for number in numbers]


# --- the three formats ------------------------------------------------------------------------
QUESTION = "What is the parity of {bits}?"
SCRATCHPAD_NOTE = "Compute one element at a time."


def format_bits(bits: Bits) -> str:
    """``(1, 0, 1)`` -> ``"[1, 0, 1]"`` (as Python prints a list)."""
    return "[" + ", ".join(map(str, bits)) + "]"


def parse_bits(text: str) -> Bits:
    """``"[1, 0, 1]"`` -> ``(1, 0, 1)``; ValueError for anything that is not a list of bits."""
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"not a bit list: {text!r}")
    bits = tuple(int(item) for item in text[1:-1].split(","))
    if any(bit not in (0, 1) for bit in bits):
        raise ValueError(f"not a bit list: {text!r}")
    return bits


def parity_of(bits: Bits) -> int:
    return sum(bits) % 2


def running_parities(bits: Bits) -> list[int]:
    """Parity of each prefix: ``(1, 0, 1, 1)`` -> ``[1, 1, 0, 1]``."""
    parities, parity = [], 0
    for bit in bits:
        parity ^= bit
        parities.append(parity)
    return parities


_SCRATCHPAD = re.compile(re.escape(SCRATCHPAD_NOTE) + "( [01])+")


def scratchpad(bits: Bits) -> str:
    """The scratchpad completion: ``(1, 0, 1, 1)`` -> ``"Compute one element at a time. 1 1 0 1"``."""
    return " ".join([SCRATCHPAD_NOTE, *map(str, running_parities(bits))])


class ParityTask(Task):
    """Formats (SPEC section 4), for the list [1, 0, 1, 1]:

    baseline:   ``"What is the parity of [1, 0, 1, 1]?\\nAnswer: "`` -> ``"1"``
    scratchpad: ``"What is the parity of [1, 0, 1, 1]?\\nSolution: "``
                -> ``"Compute one element at a time. 1 1 0 1"`` (prefix parities; the last is the answer)
    retuning:   ``"What is the parity of [1, 0, 1]?\\nSolution: "`` -> ``"Call: What is the parity of [0, 1]?\\n"``;
                ``"What is the parity of [1, 0, 1]?\\nSolution: Call: What is the parity of [0, 1]?\\nReturn: 1\\nAnswer: "``
                -> ``"0"``; base case ``"What is the parity of [1]?\\nSolution: "`` -> ``"1"``.
                A list of length L yields 2L - 1 records.
    """

    name = "parity"

    # --- problems -----------------------------------------------------------------------------
    def sample(self, rng: random.Random, length: int) -> Bits:
        return tuple(rng.randrange(2) for _ in range(length))

    def length(self, problem: Bits) -> int:
        return len(problem)

    def solution(self, problem: Bits) -> int:
        return parity_of(problem)

    def training_problems(self, method: str, preset: str, rng: random.Random,
                          lengths: list[int] | None = None) -> Iterator[Bits]:
        if method not in ("baseline", "scratchpad", "retuning"):
            raise ValueError(f"unknown method {method!r} for parity")
        if preset not in self.presets:
            raise ValueError(f"unknown preset {preset!r} for parity; known: {', '.join(self.presets)}")
        if method == "retuning":
            default = PAPER_RETUNING_LENGTHS if preset == "paper" else SMALL_RETUNING_LENGTHS
            count = PAPER_RETUNING_LISTS if preset == "paper" else SMALL_RETUNING_LISTS
            for n in lengths or default:
                yield from distinct_lists(rng, n, count)
            return
        for n in lengths or (PAPER_LENGTHS if preset == "paper" else SMALL_LENGTHS):
            if preset == "paper":
                lists, repeats = distinct_lists(rng, n, paper_list_count(n)), PAPER_REPEATS.get(n, 1)
            else:
                lists = distinct_lists(rng, n, SMALL_RECORDS_PER_LENGTH)
                repeats = max(1, SMALL_RECORDS_PER_LENGTH // len(lists))
            for bits in lists:
                for _ in range(repeats):
                    yield bits

    def record_length(self, record_input: str) -> int:
        """``"What is the parity of [1, 0, 1]?\\nSolution: "`` -> 3."""
        start = record_input.index("[")
        return (record_input.index("]", start) - start + 1) // 3  # "[1, 0, 1]": 3 characters a bit

    def retuning_copies(self, record_input: str, preset: str, rng: random.Random) -> int:
        n = self.record_length(record_input)
        if preset == "small":
            copies = max(1, SMALL_RETUNING_LISTS // 2 ** n)
            if protocol.returned_answers(record_input) == ["0"]:
                copies *= SMALL_EVEN_RETURN_WEIGHT
            return copies
        keep = paper_keep_probability(n)
        if keep < 1.0 and rng.random() >= keep:
            return 0
        return PAPER_RETUNING_REPEATS.get(n, 1)

    # --- text ---------------------------------------------------------------------------------
    def question(self, problem: Bits) -> str:
        return QUESTION.format(bits=format_bits(problem))

    def prompt(self, problem: Bits, method: str) -> str:
        if method == "baseline":
            return self.question(problem) + protocol.ANSWER_CUE
        if method in ("scratchpad", "retuning"):
            return protocol.pose(self.question(problem))
        raise ValueError(f"unknown method {method!r}")

    def problem_of(self, question: str) -> Bits:
        """``"What is the parity of [1, 0]?"`` -> ``(1, 0)``."""
        before, _, after = QUESTION.partition("{bits}")
        if not (question.startswith(before) and question.endswith(after)):
            raise ValueError(f"not a parity question: {question!r}")
        return parse_bits(question[len(before):len(question) - len(after)])

    def oracle(self, context: str, method: str) -> str:
        if method == "baseline":
            return str(parity_of(self.problem_of(context.removesuffix(protocol.ANSWER_CUE))))
        bits = self.problem_of(protocol.question_of(context))
        if method == "scratchpad":
            return scratchpad(bits)
        if method != "retuning":
            raise ValueError(f"unknown method {method!r}")
        returned = protocol.returned_answers(context)
        if not returned:
            return str(bits[0]) if len(bits) == 1 else protocol.call_line(self.question(bits[1:]))
        return str((bits[0] + self.parse_answer(returned[0], method)) % 2)

    def records(self, problem: Bits, method: str) -> list[tuple[str, str]]:
        """Same records as ``Task.records`` (a test holds them equal), rendered directly for
        Re-Tuning because the paper set has 10.25M of them: calls top-down, the base case, then
        the combines bottom-up, exactly the order in which the protocol generates them."""
        if method != "retuning":
            return super().records(problem, method)
        n = len(problem)
        listed = format_bits(problem)  # suffix k is "[" + listed[1 + 3k:], 3 characters a bit
        questions = [QUESTION.format(bits="[" + listed[1 + 3 * k:]) for k in range(n)]
        contexts = [protocol.pose(question) for question in questions]
        calls = [protocol.call_line(question) for question in questions[1:]]
        suffix_parities = running_parities(problem[::-1])[::-1]
        records = list(zip(contexts, calls))
        records.append((contexts[-1], str(problem[-1])))
        for k in range(n - 2, -1, -1):
            records.append((protocol.append_return(contexts[k], calls[k], str(suffix_parities[k + 1])),
                            str(suffix_parities[k])))
        return records

    # --- answers ------------------------------------------------------------------------------
    def parse_answer(self, text: str, method: str) -> int:
        """``"1"`` -> 1 (baseline, Re-Tuning; an ``Answer: `` line is read as the protocol does);
        ``"Compute one element at a time. 1 1 0 1"`` -> 1 (scratchpad: its last value). ValueError
        for any form the oracle does not write: ``"1\n"``, ``"Compute one element at a time. 1  1"``."""
        if method == "scratchpad":
            if not _SCRATCHPAD.fullmatch(text):
                raise ValueError(f"not a parity scratchpad: {text!r}")
            answer = text[-1]
        else:
            answer = protocol.read_answer(text)
        if answer not in ("0", "1"):
            raise ValueError(f"not a parity answer (0 or 1): {text!r}")
        return int(answer)

    def answer_for(self, problem: Bits, final_text: str, method: str) -> int:
        """A scratchpad must write one running parity per bit, as the oracle does: for
        ``(1, 0, 1, 1)``, ``"Compute one element at a time. 1 1 0 1"`` -> 1, and the cut-short
        ``"Compute one element at a time. 1"`` -> ValueError (its last value is no answer)."""
        value = self.parse_answer(final_text, method)
        if method == "scratchpad":
            written = len(final_text.split()) - len(SCRATCHPAD_NOTE.split())
            if written != len(problem):
                raise ValueError(f"{written} running parities for a list of {len(problem)} bits")
        return value


TASK = register(ParityTask())
