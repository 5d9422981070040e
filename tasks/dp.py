"""Maximum-sum non-adjacent subsequence (SPEC.md section 3, from "Faith and Fate").

A problem is a tuple of integers in [-5, 5], e.g. ``(3, -1, 4)``; its length is the number of
items. The answer marks each item 1 (chosen) or 2 (not chosen): the lexicographically smallest
choice of greatest sum, ``[1, 2, 1]`` here.

Datasets (``training_problems`` / ``retuning_copies``), two presets:

* ``paper``: SPEC's sampling exactly. Every list of length 2..5 (177,144 lists, in counting
  order). Baseline and scratchpad repeat each list of length 2/3/4/5 by 100/10/3/1 (230,384
  records). Re-Tuning solves every list once; after de-duplication, an input whose first list
  has length 5 or more is dropped with p = 0.85 (one draw per such input), and lengths 1/2/3 are
  repeated 250/30/4 times.
  Record counts in this project: a list of length N yields 4N + 1 Re-Tuning records, not SPEC's
  4N, because the top level ends with one more record (SPEC section 6). The paper set therefore
  has 3,649,360 raw records (3,472,216 + 177,144) and 1,272,227 distinct inputs, by length of the
  first list 33 / 1,089 / 11,979 / 131,769 / 1,127,357 (SPEC's 33 / 968 / 10,648 / 117,128 /
  966,306 plus the 11**N final top-level records of lengths 2..5), about 390,000 after re-weighting.
* ``small``: for a ~1M-parameter character-level model trained on a CPU in minutes, lengths 2..5.
  Baseline and scratchpad: 5,000 uniformly drawn lists per length (20,000 records). Re-Tuning:
  1,000 uniformly drawn lists per length (60,000 raw records, about 26,300 distinct inputs); each
  distinct input is kept once, its base cases (length 1) 100 times and length-2 inputs 4 times:
  about 32,700 records. (With 20 copies of each base case the tiny model, at less than half an
  epoch, still answered ``[0]`` for ``[2]``, ``[3]`` and ``[4]``: docs/tiny_model.md.)

``lengths`` overrides the list lengths drawn (paper: every list of each length).
"""
from __future__ import annotations

import itertools
import random
import re
import string
from typing import Iterator

from tasks import protocol, register
from tasks.base import Task

Items = tuple[int, ...]

# --- sampling ---------------------------------------------------------------------------------
LOW, HIGH = -5, 5
PAPER_LENGTHS = [2, 3, 4, 5]
PAPER_REPEATS = {2: 100, 3: 10, 4: 3, 5: 1}
PAPER_RETUNING_REPEATS = {1: 250, 2: 30, 3: 4}
PAPER_DROP_LENGTH, PAPER_DROP_PROBABILITY = 5, 0.85
SMALL_LENGTHS = [2, 3, 4, 5]
SMALL_LISTS_PER_LENGTH = {"baseline": 5000, "scratchpad": 5000, "retuning": 1000}
SMALL_RETUNING_REPEATS = {1: 100, 2: 4}


def all_lists(n: int) -> Iterator[Items]:
    """Every list of length n over [-5, 5], in counting order: (-5, -5), (-5, -4), ..."""
    return itertools.product(range(LOW, HIGH + 1), repeat=n)


# --- solving ----------------------------------------------------------------------------------
def dp_array(items: Items) -> list[int]:
    """``dp[i]`` = the best sum from item i on: ``(3, -1, 4)`` -> ``[7, 4, 4]``.

    SPEC: dp[N-1] = max(A[N-1], 0), dp[N-2] = max(A[N-1], A[N-2], 0),
    dp[i] = max(dp[i+1], A[i] + dp[i+2], 0): one rule once dp[N] = dp[N+1] = 0.
    """
    sums = [0] * (len(items) + 2)
    for i in range(len(items) - 1, -1, -1):
        sums[i] = max(sums[i + 1], items[i] + sums[i + 2], 0)
    return sums[:len(items)]


def first_fits(sums: list[int], items: Items) -> bool:
    """Does taking the first item reach the best sum? ``dp[0] == A[0] + dp[2]``, with dp[2] = 0
    for lists of length 1 and 2 (SPEC's rules for items N-1 and N-2)."""
    return sums[0] == items[0] + (sums[2] if len(items) > 2 else 0)


def choose(sums: list[int], items: Items) -> list[int]:
    """Rebuild the choice left to right: 1 where the item fits and may be used (its left
    neighbour was not chosen), else 2.

    ``choose([7, 4, 4], (3, -1, 4))`` -> ``[1, 2, 1]``; ``choose([3, 3], (-2, 3))`` -> ``[2, 1]``.
    """
    choice, can_use = [], True
    for k in range(len(items)):
        chosen = can_use and first_fits(sums[k:], items[k:])
        choice.append(1 if chosen else 2)
        can_use = not chosen
    return choice


def format_list(values) -> str:
    """``(3, -1, 4)`` -> ``"[3, -1, 4]"``, as Python prints a list."""
    return "[" + ", ".join(map(str, values)) + "]"


def format_suffixes(values) -> list[str]:
    """``format_list(values[k:])`` for every k, built from the right in one pass:
    ``(3, -1, 4)`` -> ``["[3, -1, 4]", "[-1, 4]", "[4]"]``."""
    suffixes = [format_list(values[-1:])]
    for value in reversed(values[:-1]):
        suffixes.append(format_list([value])[:-1] + ", " + suffixes[-1][1:])
    return suffixes[::-1]


def parse_list(text: str) -> list[int]:
    """``"[3, -1, 4]"`` -> ``[3, -1, 4]``; ValueError for anything else."""
    if not (text.startswith("[") and text.endswith("]")) or len(text) < 3:
        raise ValueError(f"not a list of integers: {text!r}")
    return [int(value) for value in text[1:-1].split(",")]


def template_pattern(template: str) -> re.Pattern:
    """A template's fields as regex groups, so each text format is written once and parsed
    from that one string: ``"Create dp array {items}"`` -> ``Create\\ dp\\ array\\ (?P<items>.+?)``."""
    pattern = ""
    for literal, field, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal) + (f"(?P<{field}>.+?)" if field else "")
    return re.compile(pattern, re.DOTALL)


# --- baseline ---------------------------------------------------------------------------------
BASELINE_PROMPT = (
    "Given a sequence of integers, find a subsequence with the highest sum, such that no two "
    "numbers in the subsequence are adjacent in the original sequence.\n\nOutput a list with \"1\" "
    "for chosen numbers and \"2\" for unchosen ones. If multiple solutions exist, select the "
    "lexicographically smallest. Input = {items}." + protocol.ANSWER_CUE)

# --- scratchpad -------------------------------------------------------------------------------
SCRATCHPAD_PROMPT = "Question: Let's solve input = {items}."
DP_LAST = "dp[{i}] = max(input[{i}], 0) = max({item}, 0) = {sum}"
DP_SECOND_LAST = "dp[{i}] = max(input[{i}], input[{j}], 0) = max({item}, {next_item}, 0) = {sum}"
DP_GENERAL = ("dp[{i}] = max(dp[{j}], input[{i}] + dp[{k}], 0) = "
              "max({next_sum}, {item} + {after_next_sum}, 0) = {sum}")
FINALLY = ("Finally, we reconstruct the lexicographically smallest subsequence that fulfills the "
           "task objective by selecting numbers as follows. We store the result on a list named "
           "\"output\".")
FITS_GENERAL = "dp[{i}] {op} input[{i}] + dp[{k}] ({sum} {op} {item} + {after_next_sum})"
FITS_LAST_TWO = "dp[{i}] {op} input[{i}] ({sum} {op} {item})"
STORE_CHOSEN = "Since {fits} and can_use_next_item == True, we store output[{i}] = 1."
STORE_UNCHOSEN = "Since {fits} or can_use_next_item == False, we store output[{i}] = 2."
UPDATE = " We update can_use_next_item = {can_use}."
FINAL_LINE = "Reconstructing all together, output={answer}."
SCRATCHPAD = ("Scratchpad: {dp_lines}\n\n" + FINALLY + "\n\nLet can_use_next_item = True.\n"
              "{rebuild_lines}\n\n" + FINAL_LINE)


def scratchpad(items: Items) -> str:
    """The scratchpad completion; for ``(-2, 3)``::

        Scratchpad: dp[1] = max(input[1], 0) = max(3, 0) = 3
        dp[0] = max(input[0], input[1], 0) = max(-2, 3, 0) = 3

        Finally, we reconstruct ... We store the result on a list named "output".

        Let can_use_next_item = True.
        Since dp[0] != input[0] (3 != -2) or can_use_next_item == False, we store output[0] = 2. We update can_use_next_item = True.
        Since dp[1] == input[1] (3 == 3) and can_use_next_item == True, we store output[1] = 1.

        Reconstructing all together, output=[2, 1].

    ``==``/``!=`` says whether the item was chosen, so a refusal forced by the flag prints a false
    ``(4 != 4)``, as in the original. A list of length 1 (outside SPEC) gets only the dp[N-1] line.
    """
    n, sums = len(items), dp_array(items)
    padded = sums + [0, 0]
    dp_lines = [DP_LAST.format(i=n - 1, item=items[-1], sum=sums[-1])]
    if n >= 2:
        dp_lines.append(DP_SECOND_LAST.format(i=n - 2, j=n - 1, item=items[-2], next_item=items[-1],
                                              sum=sums[-2]))
    for i in range(n - 3, -1, -1):
        dp_lines.append(DP_GENERAL.format(i=i, j=i + 1, k=i + 2, next_sum=sums[i + 1], item=items[i],
                                          after_next_sum=sums[i + 2], sum=sums[i]))
    choice = choose(sums, items)
    rebuild_lines = []
    for i, mark in enumerate(choice):
        chosen = mark == 1
        fits = (FITS_GENERAL if i < n - 2 else FITS_LAST_TWO).format(
            i=i, k=i + 2, op="==" if chosen else "!=", sum=sums[i], item=items[i],
            after_next_sum=padded[i + 2])
        line = (STORE_CHOSEN if chosen else STORE_UNCHOSEN).format(fits=fits, i=i)
        if i < n - 1:
            line += UPDATE.format(can_use=not chosen)
        rebuild_lines.append(line)
    return SCRATCHPAD.format(dp_lines="\n".join(dp_lines), rebuild_lines="\n".join(rebuild_lines),
                             answer=format_list(choice))


# --- re-tuning --------------------------------------------------------------------------------
TOP_QUESTION = "Compute the maximum sum of nonadjacent subsequences of {items}"
DP_QUESTION = "Create dp array {items}"
DP_CALL_NOTE = "Call with array minus first element. "
DP_COMBINE_NOTE = "Append max(return[0], array[0] + return[1]) to return."
DP_BASE_NOTE = "Return [0] if negative else element."
CHOSEN_QUESTION = "Create chosen indices array: sum array {sums}, item array {items}, can use item {can_use}"
CHOSEN_BASE_NOTE = "If there is only 1 item, return 1 if we should use it else 2."
CHOSEN_CALL_NOTE = (CHOSEN_BASE_NOTE + " If we should use the first item to get the sum, "
                    "call False else True. ")
CHOSEN_COMBINE_NOTE = "Append 1 if False else 2."
QUESTION_PATTERNS = {kind: template_pattern(template) for kind, template in
                     (("top", TOP_QUESTION), ("dp", DP_QUESTION), ("chosen", CHOSEN_QUESTION))}
PROMPT_PATTERNS = {"baseline": template_pattern(BASELINE_PROMPT),
                   "scratchpad": template_pattern(SCRATCHPAD_PROMPT)}


def call(note: str, sub_question: str) -> str:
    """``call(DP_CALL_NOTE, "Create dp array [4]")`` ->
    ``"Call with array minus first element. Call: Create dp array [4]\\n"``."""
    return note + protocol.call_line(sub_question)


def answer(note: str, listed: str) -> str:
    """``answer(DP_BASE_NOTE, "[4]")`` -> ``"Return [0] if negative else element.\\nAnswer: [4]"``."""
    return note + protocol.ANSWER_CUE + listed


def dp_question(items: Items) -> str:
    return DP_QUESTION.format(items=format_list(items))


def chosen_question(sums: list[int], items: Items, can_use: bool) -> str:
    return CHOSEN_QUESTION.format(sums=format_list(sums), items=format_list(items), can_use=can_use)


def parse_question(question: str) -> tuple[str, dict[str, str]]:
    """Which kind of Re-Tuning problem a question poses, and its fields:
    ``"Create dp array [4]"`` -> ``("dp", {"items": "[4]"})``."""
    for kind, pattern in QUESTION_PATTERNS.items():
        match = pattern.fullmatch(question)
        if match:
            return kind, match.groupdict()
    raise ValueError(f"not a dp question: {question!r}")


class DPTask(Task):
    """Formats (SPEC section 3), for the list [3, -1, 4] (dp = [7, 4, 4], answer [1, 2, 1]):

    baseline:   ``BASELINE_PROMPT`` ending ``"... Input = [3, -1, 4].\\nAnswer: "`` -> ``"[1, 2, 1]"``
    scratchpad: ``"Question: Let's solve input = [3, -1, 4]."`` -> ``scratchpad(items)``
    retuning:   three kinds of problem; each Call is solved in a fresh context::

        Compute the maximum sum of nonadjacent subsequences of [3, -1, 4]\\nSolution:
            -> Call: Create dp array [3, -1, 4]\\n
            ... Return: [7, 4, 4]\\nAnswer:
            -> Call: Create chosen indices array: sum array [7, 4, 4], item array [3, -1, 4], can use item True\\n
            ... Return: [1, 2, 1]\\nAnswer:
            -> [1, 2, 1]                      (SPEC section 6: the top level writes the answer)
        Create dp array [3, -1, 4]\\nSolution:
            -> Call with array minus first element. Call: Create dp array [-1, 4]\\n
            ... Return: [4, 4]\\nAnswer:
            -> Append max(return[0], array[0] + return[1]) to return.\\nAnswer: [7, 4, 4]
        Create dp array [4]\\nSolution:  -> Return [0] if negative else element.\\nAnswer: [4]
        Create chosen indices array: sum array [7, 4, 4], item array [3, -1, 4], can use item True\\nSolution:
            -> If there is only 1 item, return 1 if we should use it else 2. If we should use the
               first item to get the sum, call False else True. Call: Create chosen indices array:
               sum array [4, 4], item array [-1, 4], can use item False\\n
            ... Return: [2, 1]\\nAnswer:
            -> Append 1 if False else 2.\\nAnswer: [1, 2, 1]
        Create chosen indices array: sum array [4], item array [4], can use item True\\nSolution:
            -> If there is only 1 item, return 1 if we should use it else 2.\\nAnswer: [1]

    The flag passed down is ``not chosen_0`` (chosen_0: the first item fits and the flag is True).
    A list of length N yields 4N + 1 records: 3 top-level, 2N - 1 dp-array, 2N - 1 chosen-indices
    (SPEC's 4N plus the section-6 final top-level record).
    """

    name = "dp"

    # --- problems -----------------------------------------------------------------------------
    def sample(self, rng: random.Random, length: int) -> Items:
        return tuple(rng.randint(LOW, HIGH) for _ in range(length))

    def length(self, problem: Items) -> int:
        return len(problem)

    def solution(self, problem: Items) -> list[int]:
        return choose(dp_array(problem), problem)

    def training_problems(self, method: str, preset: str, rng: random.Random,
                          lengths: list[int] | None = None) -> Iterator[Items]:
        if method not in SMALL_LISTS_PER_LENGTH:
            raise ValueError(f"unknown method {method!r} for dp")
        if preset == "paper":
            for n in lengths or PAPER_LENGTHS:
                repeats = 1 if method == "retuning" else PAPER_REPEATS.get(n, 1)
                for items in all_lists(n):
                    for _ in range(repeats):
                        yield items
        elif preset == "small":
            for n in lengths or SMALL_LENGTHS:
                for _ in range(SMALL_LISTS_PER_LENGTH[method]):
                    yield self.sample(rng, n)
        else:
            raise ValueError(f"unknown preset {preset!r} for dp; known: {', '.join(self.presets)}")

    def record_length(self, record_input: str) -> int:
        """The length of the first list in the input (SPEC 3 counts records so):
        ``"Create dp array [-1, 4]\\nSolution: "`` -> 2."""
        start = record_input.index("[")
        return record_input.count(",", start, record_input.index("]", start)) + 1

    def retuning_copies(self, record_input: str, preset: str, rng: random.Random) -> int:
        n = self.record_length(record_input)
        if preset == "small":
            return SMALL_RETUNING_REPEATS.get(n, 1)
        if n >= PAPER_DROP_LENGTH and rng.random() < PAPER_DROP_PROBABILITY:
            return 0
        return PAPER_RETUNING_REPEATS.get(n, 1)

    # --- text ---------------------------------------------------------------------------------
    def question(self, problem: Items) -> str:
        return TOP_QUESTION.format(items=format_list(problem))

    def prompt(self, problem: Items, method: str) -> str:
        if method == "baseline":
            return BASELINE_PROMPT.format(items=format_list(problem))
        if method == "scratchpad":
            return SCRATCHPAD_PROMPT.format(items=format_list(problem))
        if method == "retuning":
            return protocol.pose(self.question(problem))
        raise ValueError(f"unknown method {method!r}")

    def oracle(self, context: str, method: str) -> str:
        if method in PROMPT_PATTERNS:
            match = PROMPT_PATTERNS[method].fullmatch(context)
            if not match:
                raise ValueError(f"not a dp {method} prompt: {context!r}")
            items = tuple(parse_list(match["items"]))
            return format_list(self.solution(items)) if method == "baseline" else scratchpad(items)
        if method != "retuning":
            raise ValueError(f"unknown method {method!r}")
        kind, fields = parse_question(protocol.question_of(context))
        items = tuple(parse_list(fields["items"]))
        returned = protocol.returned_answers(context)
        if kind == "top":
            if not returned:
                return call("", dp_question(items))
            if len(returned) == 1:
                return call("", CHOSEN_QUESTION.format(sums=returned[0], items=fields["items"],
                                                       can_use=True))
            return returned[1]
        if kind == "dp":
            if len(items) == 1:
                return answer(DP_BASE_NOTE, format_list(dp_array(items)))
            if not returned:
                return call(DP_CALL_NOTE, dp_question(items[1:]))
            rest = parse_list(returned[0]) + [0]  # dp[N] = 0 past the end
            best = max(rest[0], items[0] + rest[1], 0)
            return answer(DP_COMBINE_NOTE, format_list([best] + rest[:-1]))
        sums, can_use = parse_list(fields["sums"]), fields["can_use"] == "True"
        chosen = can_use and first_fits(sums, items)
        if len(items) == 1:
            return answer(CHOSEN_BASE_NOTE, format_list([1 if chosen else 2]))
        if not returned:
            return call(CHOSEN_CALL_NOTE, chosen_question(sums[1:], items[1:], not chosen))
        return answer(CHOSEN_COMBINE_NOTE, format_list([1 if chosen else 2] + parse_list(returned[0])))

    def records(self, problem: Items, method: str) -> list[tuple[str, str]]:
        """Same records as ``Task.records`` (a test holds them equal), rendered directly for
        Re-Tuning because the paper set has 3.6M of them: the order is the protocol's (each
        sub-problem's calls top-down, its base case, then its combines bottom-up)."""
        if method != "retuning":
            return super().records(problem, method)
        n, sums = len(problem), dp_array(problem)
        choice = choose(sums, problem)
        flags = [True] + [mark == 2 for mark in choice[:-1]]
        listed_items, listed_sums, listed_choice = map(format_suffixes, (problem, sums, choice))
        records = []

        def recurse(questions: list[str], call_note: str, base_note: str, combine_note: str,
                    listed_answers: list[str]) -> None:
            contexts = [protocol.pose(question) for question in questions]
            calls = [call(call_note, question) for question in questions[1:]]
            records.extend(zip(contexts, calls))
            records.append((contexts[-1], answer(base_note, listed_answers[-1])))
            for k in range(n - 2, -1, -1):
                records.append((protocol.append_return(contexts[k], calls[k], listed_answers[k + 1]),
                                answer(combine_note, listed_answers[k])))

        top = protocol.pose(TOP_QUESTION.format(items=listed_items[0]))
        dp_questions = [DP_QUESTION.format(items=listed) for listed in listed_items]
        first_call = call("", dp_questions[0])
        records.append((top, first_call))
        recurse(dp_questions, DP_CALL_NOTE, DP_BASE_NOTE, DP_COMBINE_NOTE, listed_sums)
        chosen_questions = [CHOSEN_QUESTION.format(sums=listed_sums[k], items=listed_items[k],
                                                   can_use=flags[k]) for k in range(n)]
        top = protocol.append_return(top, first_call, listed_sums[0])
        second_call = call("", chosen_questions[0])
        records.append((top, second_call))
        recurse(chosen_questions, CHOSEN_CALL_NOTE, CHOSEN_BASE_NOTE, CHOSEN_COMBINE_NOTE, listed_choice)
        records.append((protocol.append_return(top, second_call, listed_choice[0]), listed_choice[0]))
        return records

    # --- answers ------------------------------------------------------------------------------
    def parse_answer(self, text: str, method: str) -> list[int]:
        """The choice list, written as the oracle writes it (the original compared strings):
        ``"[1, 2, 1]"`` (baseline; Re-Tuning, whose ``Answer: `` line is read as the protocol
        does) or the scratchpad's last line ``"Reconstructing all together, output=[2, 1]."``.
        ValueError for any other form: ``"[1,2, 1]"``, ``"[1, 2, 1] "``."""
        if method == "scratchpad":
            prefix, _, suffix = FINAL_LINE.partition("{answer}")
            at = text.rfind(prefix)
            if at < 0 or not text.endswith(suffix):
                raise ValueError(f"no {FINAL_LINE!r} line ending a dp scratchpad: {text[-80:]!r}")
            listed = text[at + len(prefix):len(text) - len(suffix)]
        else:
            listed = protocol.read_answer(text)
        choice = parse_list(listed)
        if any(mark not in (1, 2) for mark in choice) or str(choice) != listed:
            raise ValueError(f"not a list of 1s and 2s as Python prints it: {listed!r}")
        return choice


TASK = register(DPTask())
