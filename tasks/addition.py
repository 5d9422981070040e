"""Integer addition (SPEC.md section 2): ``73199 + 21439``.

A problem is a pair of digit strings of equal length, the operands zero-padded to the longer one:
``("07", "58")``. Its length L is that common length. Sub-problems keep their leading zeros
(``("007", "234")`` is a problem of length 3), so every suffix of a problem is a problem.

The module reads as the spec does: sampling and the dataset presets, then each method's format
with a literal example, then answer parsing. At the end, a bulk renderer writes the de-duplicated
and re-weighted Re-Tuning set at paper scale (3.68M records) fast; tests hold it equal to the
definition (``Task.records``, ``protocol.solve`` driven by ``oracle``) record for record.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from tasks import protocol, register
from tasks.base import METHODS, Task

Problem = tuple[str, str]


# --- 1. problems and sampling -----------------------------------------------------------------
def pad(a: int, b: int) -> Problem:
    """Two numbers as a problem, zero-padded to the same length: ``pad(7, 58) == ("07", "58")``."""
    a_text, b_text = str(a), str(b)
    width = max(len(a_text), len(b_text))
    return a_text.zfill(width), b_text.zfill(width)


def numeric_length(operand: str) -> int:
    """Digits of an operand without its leading zeros: ``"0123"`` -> 3, ``"000"`` -> 1."""
    return len(operand.lstrip("0")) or 1


@dataclass(frozen=True)
class Preset:
    """How one dataset preset samples problems and re-weights its Re-Tuning records.

    Cell sampling (paper, small): for each start in ``starts``, for each digit counts i <= j
    from ``lengths`` with i >= start, ``pairs_per_cell`` pairs with a uniform in
    [10^(i-1), 10^i] and b uniform in [10^(j-1), 10^j], both ends included. Distinct sampling
    (limited): ``distinct_pairs`` distinct ordered pairs per digit count d, both exactly d digits,
    a != b. Re-Tuning records are de-duplicated by input when ``deduplicate``; each distinct
    input is then dropped with ``drop[n]`` when both operands have n digits without leading
    zeros, else repeated ``repeats[L]`` times for padded length L (SPEC section 2).
    """

    lengths: tuple[int, ...]
    starts: tuple[int, ...] = (1,)
    pairs_per_cell: int = 0
    distinct_pairs: int = 0
    swap: bool = True
    deduplicate: bool = True
    drop: dict[int, float] = field(default_factory=dict)
    repeats: dict[int, int] = field(default_factory=dict)

    def drop_probability(self, a: str, b: str) -> float:
        """The chance that a distinct Re-Tuning input posing ``a + b`` is dropped."""
        digits = numeric_length(a)
        return self.drop.get(digits, 0.0) if digits == numeric_length(b) else 0.0


PRESETS = {
    # SPEC section 2: 304,000 pairs; 3,677,455 Re-Tuning records in the authors' file.
    "paper": Preset(lengths=tuple(range(1, 16)), starts=(1, 3, 6, 9, 12), pairs_per_cell=1000,
                    drop={**dict.fromkeys(range(3, 8), 0.85), **dict.fromkeys(range(8, 12), 0.65)},
                    repeats={1: 1000, 2: 5}),
    # For the tiny character-level model on a CPU (lengths 1-6, evaluated out to 18; see
    # docs/tiny_model.md): the paper's scheme with 200 pairs per cell (6,400 problems) and milder
    # re-weighting: the 100 base cases x20 (paper: x1000), no extra 2-digit copies (paper: x5),
    # the over-represented full-width lengths 3-6 halved (paper: 3-7 cut by 85%).
    "small": Preset(lengths=tuple(range(1, 7)), starts=(1, 3, 6, 9, 12), pairs_per_cell=200,
                    drop=dict.fromkeys(range(3, 7), 0.5), repeats={1: 20}),
    # SPEC "Limited-data variant": 10 distinct pairs per digit count 1-15, the same 150 problems
    # for every method, no swap, no de-duplication, no re-weighting.
    "limited": Preset(lengths=tuple(range(1, 16)), distinct_pairs=10, swap=False, deduplicate=False),
}


def cell_pairs(preset: Preset, lengths: Iterable[int], rng: random.Random) -> Iterator[tuple[int, int, bool]]:
    """The paper's draw: ``(a, b, swap)`` per pair, the swap coin drawn for every pair (so that all
    methods share one draw and only apply the coin differently)."""
    lengths = sorted(set(lengths))
    for start in preset.starts:
        for i in lengths:
            if i < start:
                continue
            for j in lengths:
                if j < i:
                    continue
                for _ in range(preset.pairs_per_cell):
                    a = rng.randint(10 ** (i - 1), 10 ** i)
                    b = rng.randint(10 ** (j - 1), 10 ** j)
                    yield a, b, rng.random() < 0.5


def distinct_exact_pairs(preset: Preset, lengths: Iterable[int], rng: random.Random) -> Iterator[tuple[int, int]]:
    """The limited set's draw: per digit count d, ``distinct_pairs`` distinct ordered pairs of
    d-digit numbers with a != b, in the order drawn."""
    for d in sorted(set(lengths)):
        low, high = 10 ** (d - 1), 10 ** d - 1
        available = (high - low + 1) ** 2 - (high - low + 1)
        if available < preset.distinct_pairs:
            raise ValueError(f"only {available} distinct {d}-digit pairs exist, "
                             f"{preset.distinct_pairs} wanted")
        chosen: dict[tuple[int, int], None] = {}
        while len(chosen) < preset.distinct_pairs:
            a, b = rng.randint(low, high), rng.randint(low, high)
            if a != b:
                chosen.setdefault((a, b))
        yield from chosen


# --- 2. the three formats ---------------------------------------------------------------------
OPERATOR = " + "
ANSWER_FORMAT = "Carry {carry}, Output {digits}"
_DIGITS = re.compile(r"[0-9]+")


def question(a: str, b: str) -> str:
    """The problem as text, operands as given (padded): ``question("07", "58") == "07 + 58"``."""
    return a + OPERATOR + b


def operands(question_text: str) -> Problem:
    """``"007 + 234"`` -> ``("007", "234")``; ValueError unless two digit strings of equal length."""
    a, separator, b = question_text.partition(OPERATOR)
    if not separator or not _DIGITS.fullmatch(a) or not _DIGITS.fullmatch(b) or len(a) != len(b):
        raise ValueError(f"not an addition question: {question_text!r}")
    return a, b


def answer_text(carry: int | str, digits: str) -> str:
    """One scratchpad line, and the Re-Tuning answer: ``answer_text(1, "8") == "Carry 1, Output 8"``."""
    return ANSWER_FORMAT.format(carry=carry, digits=digits)


def digit_sums(a: str, b: str) -> list[tuple[int, str]]:
    """``(carry, s_k)`` for k = 1..L: s_k the last k digits of the sum of the last k digits of a
    and b, c its carry out. ``digit_sums("73199", "21439")`` ->
    ``[(1, "8"), (1, "38"), (0, "638"), (0, "4638"), (0, "94638")]``."""
    sums, carry, digits = [], 0, ""
    for x, y in zip(reversed(a), reversed(b)):
        total = int(x) + int(y) + carry
        carry, digits = total // 10, str(total % 10) + digits
        sums.append((carry, digits))
    return sums


def scratchpad(a: str, b: str) -> str:
    """``scratchpad("73199", "21439")`` ->
    ``"Carry 1, Output 8\\nCarry 1, Output 38\\nCarry 0, Output 638\\nCarry 0, Output 4638\\nCarry 0, Output 94638"``."""
    return "\n".join(answer_text(carry, digits) for carry, digits in digit_sums(a, b))


def combine(a: str, b: str, returned: str) -> str:
    """The Re-Tuning answer of ``a + b`` from the answer of its sub-problem (both without their
    first digit): ``combine("73199", "21439", "Carry 0, Output 4638") == "Carry 0, Output 94638"``."""
    carry, digits = parse_carry_output(returned)
    total = int(a[0]) + int(b[0]) + carry
    return answer_text(total // 10, str(total % 10) + digits)


# --- 3. reading answers -----------------------------------------------------------------------
_ANSWER = re.compile(re.escape(ANSWER_FORMAT).replace(re.escape("{carry}"), "([01])")
                     .replace(re.escape("{digits}"), "([0-9]+)"))


def parse_carry_output(text: str) -> tuple[int, str]:
    """``"Carry 1, Output 08"`` -> ``(1, "08")``; ValueError for anything else."""
    match = _ANSWER.fullmatch(text)
    if match is None:
        raise ValueError(f"not a 'Carry c, Output s' answer: {text!r}")
    return int(match.group(1)), match.group(2)


def carry_output_value(text: str, length: int | None = None) -> int:
    """``"Carry c, Output s"`` means ``c * 10^L + int(s)`` for a problem of length L (SPEC
    section 2): ``"Carry 1, Output 08"`` -> 108. Given the length, ``s`` must have that many
    digits, the form the oracle writes (the original compared strings): with L = 2,
    ``"Carry 1, Output 098"`` and ``"Carry 0, Output 198"`` are ValueErrors."""
    carry, digits = parse_carry_output(text)
    if length is not None and len(digits) != length:
        raise ValueError(f"{text!r}: {len(digits)} output digits for a problem of {length}")
    return carry * 10 ** len(digits) + int(digits)


class AdditionTask(Task):
    """Formats (SPEC section 2), for 73199 + 21439 = 94638:

    baseline:   ``"73199 + 21439\\nAnswer: "`` -> ``"94638"``  (e.g. ``"07 + 58\\nAnswer: "`` -> ``"65"``)
    scratchpad: ``"73199 + 21439\\nSolution: "`` -> ``scratchpad(a, b)``, one ``Carry c, Output s_k``
                line per suffix length k, the last line the answer
    retuning:   ``"73199 + 21439\\nSolution: "`` -> ``"Call: 3199 + 1439\\n"``;
                ``"73199 + 21439\\nSolution: Call: 3199 + 1439\\nReturn: Carry 0, Output 4638\\nAnswer: "``
                -> ``"Carry 0, Output 94638"``; base case ``"9 + 9\\nSolution: "`` -> ``"Carry 1, Output 8"``.
                A problem of length L yields 2L - 1 records.
    """

    name = "addition"
    presets = tuple(PRESETS)

    # --- problems -----------------------------------------------------------------------------
    def sample(self, rng: random.Random, length: int) -> Problem:
        """Both operands exactly ``length`` digits, no leading zero (the evaluation problems)."""
        if length < 1:
            raise ValueError(f"addition length must be at least 1, got {length}")
        low, high = 10 ** (length - 1), 10 ** length - 1
        return str(rng.randint(low, high)), str(rng.randint(low, high))

    def length(self, problem: Problem) -> int:
        return len(problem[0])

    def solution(self, problem: Problem) -> int:
        return int(problem[0]) + int(problem[1])

    def preset(self, preset: str) -> Preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} for addition; known: {', '.join(PRESETS)}")
        return PRESETS[preset]

    def training_problems(self, method: str, preset: str, rng: random.Random,
                          lengths: list[int] | None = None) -> Iterator[Problem]:
        """The preset's problems in the order drawn. ``lengths`` replaces the operand digit counts
        (paper and small: the i, j of the cells; limited: the d). The same rng gives every method
        the same pairs; scratchpad and Re-Tuning then swap where the pair's coin says so."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        rules = self.preset(preset)
        lengths = list(lengths or rules.lengths)
        if min(lengths) < 1:
            raise ValueError(f"addition lengths must be at least 1, got {min(lengths)}")
        if rules.distinct_pairs:
            for a, b in distinct_exact_pairs(rules, lengths, rng):
                yield pad(a, b)
            return
        swaps = rules.swap and method != "baseline"
        for a, b, coin in cell_pairs(rules, lengths, rng):
            yield pad(b, a) if swaps and coin else pad(a, b)

    def shared_draw(self, preset: str) -> bool:
        """All three methods get the same pairs from the same seed (SPEC 2 lets us share them)."""
        return True

    def deduplicates(self, preset: str) -> bool:
        """Whether Re-Tuning records are de-duplicated by input (not for the limited set)."""
        return self.preset(preset).deduplicate

    def retuning_copies(self, record_input: str, preset: str, rng: random.Random) -> int:
        """SPEC 2's re-weighting: draws only where a drop can happen (equal numeric lengths)."""
        rules = self.preset(preset)
        a, b = operands(protocol.question_of(record_input))
        drop = rules.drop_probability(a, b)
        if drop and rng.random() < drop:
            return 0
        return rules.repeats.get(len(a), 1)

    def record_length(self, record_input: str) -> int:
        """The length of the (sub-)problem a record's input poses: ``"007 + 234\\nSolution: "`` -> 3."""
        return len(record_input.split(OPERATOR, 1)[0])

    # --- text ---------------------------------------------------------------------------------
    def question(self, problem: Problem) -> str:
        return question(*problem)

    def prompt(self, problem: Problem, method: str) -> str:
        if method == "baseline":
            return question(*problem) + protocol.ANSWER_CUE
        if method in ("scratchpad", "retuning"):
            return protocol.pose(question(*problem))
        raise ValueError(f"unknown method {method!r}")

    def oracle(self, context: str, method: str) -> str:
        if method == "baseline":
            if not context.endswith(protocol.ANSWER_CUE):
                raise ValueError(f"not a baseline addition prompt: {context!r}")
            a, b = operands(context[:-len(protocol.ANSWER_CUE)])
            return str(int(a) + int(b))
        a, b = operands(protocol.question_of(context))
        if method == "scratchpad":
            return scratchpad(a, b)
        if method != "retuning":
            raise ValueError(f"unknown method {method!r}")
        returned = protocol.returned_answers(context)
        if returned:
            return combine(a, b, returned[-1])
        if len(a) == 1:
            return answer_text(*digit_sums(a, b)[-1])
        return protocol.call_line(question(a[1:], b[1:]))

    # --- answers ------------------------------------------------------------------------------
    def parse_answer(self, text: str, method: str, length: int | None = None) -> int:
        """baseline ``"65"`` -> 65; scratchpad (its last line) and Re-Tuning
        ``"Carry 1, Output 08"`` -> 108 (``c * 10^length``, by default ``10^len(s)``).
        ValueError for anything else."""
        if method == "baseline":
            if not _DIGITS.fullmatch(text):
                raise ValueError(f"not a number: {text!r}")
            return int(text)
        if method == "scratchpad":
            text = text.rsplit("\n", 1)[-1]
        elif method == "retuning":
            text = protocol.read_answer(text)
        else:
            raise ValueError(f"unknown method {method!r}")
        return carry_output_value(text, length)

    def answer_for(self, problem: Problem, final_text: str, method: str) -> int:
        """The value of an answer in the form the oracle writes for ``problem`` (the original
        compared strings), ValueError for any other form: for ``("99", "99")``, ``"Carry 1,
        Output 98"`` -> 198, ``"Carry 1, Output 098"`` -> ValueError; baseline ``"198"`` ->
        198, ``"0198"`` -> ValueError."""
        value = self.parse_answer(final_text, method, self.length(problem))
        if method == "baseline" and final_text != str(value):
            raise ValueError(f"{final_text!r}: a leading zero")
        return value

    # --- bulk Re-Tuning rendering (paper scale) -------------------------------------------------
    def fast_retuning(self, preset: str, rng: random.Random,
                      record_piece: Callable[[str, str], str]) -> "BulkRetuning":
        return BulkRetuning(self.preset(preset), rng, record_piece)


class BulkRetuning:
    """The de-duplicated, re-weighted Re-Tuning set, written as text pieces, without building a
    single record through the generic path. Equal, piece for piece and draw for draw, to running
    ``Task.records`` on every problem, keeping each input's first occurrence and asking
    ``retuning_copies`` once per distinct input (tests/test_addition.py holds them equal).

    Why it is fast: a problem's records are fixed by its suffix questions, and a suffix of a
    question seen before was seen before too. So a problem walks its suffixes from the longest
    down, stopping at the first one seen; only the new ones are rendered, each with one ``%``
    into a template made by the format functions above (so no format text is written twice).
    ``record_piece(input, output)`` is the writer's text for one record.
    """

    def __init__(self, rules: Preset, rng: random.Random, record_piece: Callable[[str, str], str]):
        self.rules, self.draw = rules, rng.random
        slot = "%s"
        sub = question(slot, slot)
        self.call_piece = self._template(record_piece(protocol.pose(sub), protocol.call_line(sub)), 4)
        self.base_piece = self._template(record_piece(protocol.pose(sub), answer_text(slot, slot)), 4)
        self.combine_piece = self._template(record_piece(
            protocol.append_return(protocol.pose(sub), protocol.call_line(sub), answer_text(slot, slot)),
            answer_text(slot, slot)), 8)
        # All by padded length k: the questions posed (as a + b), the drop probability and the
        # copies of a record, and the records written of each kind.
        self.seen: list[set[str]] = []
        self.drop_at: list[float] = []
        self.copies_at: list[int] = []
        self.written: dict[str, list[int]] = {"call": [], "base": [], "combine": []}

    @staticmethod
    def _template(piece: str, slots: int) -> str:
        if piece.count("%") != slots or piece.count("%s") != slots:
            raise ValueError(f"the record text holds a '%' of its own: {piece!r}")
        return piece

    def _grow(self, size: int) -> None:
        while len(self.seen) <= size:
            k = len(self.seen)
            self.seen.append(set())
            self.drop_at.append(self.rules.drop.get(k, 0.0))
            self.copies_at.append(self.rules.repeats.get(k, 1))
            for counts in self.written.values():
                counts.append(0)

    @property
    def counts(self) -> dict[tuple[str, int], int]:
        """Records written, by (kind, length): kinds "call", "base", "combine"."""
        return {(kind, k): n for kind, counts in self.written.items() for k, n in enumerate(counts) if n}

    def trained(self, problem: Problem) -> bool:
        """Whether the problem was posed (at any depth) in the problems rendered so far."""
        a, b = problem
        return len(a) < len(self.seen) and a + b in self.seen[len(a)]

    def pieces(self, problem: Problem) -> str:
        """The text of the problem's new records, in first-seen order, repeats included."""
        a, b = problem
        size = len(a)
        if len(self.seen) <= size:
            self._grow(size)
        seen, a_from, b_from = self.seen, [""] * (size + 1), [""] * (size + 1)
        k = size
        while k:  # suffix k: the last k digits of both operands
            x, y = a[size - k:], b[size - k:]
            known = seen[k]
            before = len(known)
            known.add(x + y)
            a_from[k], b_from[k] = x, y
            if len(known) == before:
                break
            k -= 1
        old = k  # suffixes 1..old were posed before
        if old == size:
            return ""
        total = str(int(a) + int(b)).zfill(size + 1)
        codes, a_codes, b_codes = total.encode(), a.encode(), b.encode()
        carry = [0] * (size + 1)
        for n in range(max(old, 1), size):  # the sum's digit n+1 is a's + b's + carry n (mod 10)
            carry[n] = (codes[size - n] - a_codes[size - n - 1] - b_codes[size - n - 1] + 48) % 10
        carry[size] = codes[0] - 48
        drop_at, copies_at, draw = self.drop_at, self.copies_at, self.draw
        calls, combines = self.written["call"], self.written["combine"]
        out, drop_of = [], [0.0] * (size + 1)
        for k in range(size, old, -1):  # calls top-down, ending with the base case
            x, y = a_from[k], b_from[k]
            if x[0] != "0" and y[0] != "0":
                drop = drop_at[k]
            elif x[0] != y[0]:  # one operand shorter than the other without its zeros
                drop = 0.0
            else:
                digits = len(x.lstrip("0")) or 1
                drop = drop_at[digits] if digits == (len(y.lstrip("0")) or 1) else 0.0
            drop_of[k] = drop  # the combine record of suffix k draws with the same probability
            if drop and draw() < drop:
                continue
            copies = copies_at[k]
            if k == 1:
                piece = self.base_piece % (x, y, carry[1], total[size])
                self.written["base"][1] += copies
            else:
                piece = self.call_piece % (x, y, a_from[k - 1], b_from[k - 1])
                calls[k] += copies
            out.append(piece * copies if copies > 1 else piece)
        for k in range(max(old + 1, 2), size + 1):  # then the combines bottom-up
            drop = drop_of[k]
            if drop and draw() < drop:
                continue
            copies = copies_at[k]
            piece = self.combine_piece % (a_from[k], b_from[k], a_from[k - 1], b_from[k - 1],
                                          carry[k - 1], total[size + 2 - k:], carry[k], total[size + 1 - k:])
            out.append(piece * copies if copies > 1 else piece)
            combines[k] += copies
        return "".join(out)

    def tally(self) -> Iterator[tuple[int, int, int, int]]:
        """``(length, input chars, output chars, copies)`` per kind and length written: within a
        kind and length every addition record has the same size (all fields are fixed width)."""
        for (kind, k), copies in sorted(self.counts.items(), key=lambda item: (item[0][1], item[0][0])):
            zeros = "0" * k
            sub = question(zeros[1:], zeros[1:])
            if kind == "call":
                record = protocol.pose(question(zeros, zeros)), protocol.call_line(sub)
            elif kind == "base":
                record = protocol.pose(question(zeros, zeros)), answer_text(0, zeros)
            else:
                record = (protocol.append_return(protocol.pose(question(zeros, zeros)), protocol.call_line(sub),
                                                 answer_text(0, zeros[1:])), answer_text(0, zeros))
            yield k, len(record[0]), len(record[1]), copies


TASK = register(AdditionTask())
