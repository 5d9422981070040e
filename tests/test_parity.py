"""The parity task (SPEC.md section 4): literal examples byte for byte, every format checked
against sum mod 2, the Re-Tuning recursion step by step, and the paper counts.

Rendering and de-duplicating the paper's 10,250,000 Re-Tuning records takes ~35 s, so the suite
checks the raw count and the expected size after drop/repeat from the drawn lists; the realised
figure was measured once by rendering everything (see tasks/parity.py's docstring).
"""
import collections
import random
import re

import pytest

from tasks import get_task, protocol
from tasks.base import Task
from tasks.parity import PAPER_RETUNING_REPEATS, paper_keep_probability

task = get_task("parity")


def random_lists(count, lengths, seed):
    rng = random.Random(seed)
    return [tuple(rng.randint(0, 1) for _ in range(rng.choice(lengths))) for _ in range(count)]


EDGE_LISTS = [(0,), (1,), (0, 0), (1, 1), (0,) * 21, (1,) * 21, (0,) * 40, (1, 0) * 15]


# --- SPEC literal examples ----------------------------------------------------------------------
def test_spec_examples():
    assert task.records((1, 0, 1), "baseline") == [("What is the parity of [1, 0, 1]?\nAnswer: ", "0")]
    assert task.records((1, 0, 1, 1), "scratchpad") == [
        ("What is the parity of [1, 0, 1, 1]?\nSolution: ", "Compute one element at a time. 1 1 0 1")]
    # One protocol for every task (SPEC section 6): no blank line before "Return: ".
    assert task.records((1, 0, 1), "retuning") == [
        ("What is the parity of [1, 0, 1]?\nSolution: ", "Call: What is the parity of [0, 1]?\n"),
        ("What is the parity of [0, 1]?\nSolution: ", "Call: What is the parity of [1]?\n"),
        ("What is the parity of [1]?\nSolution: ", "1"),
        ("What is the parity of [0, 1]?\nSolution: Call: What is the parity of [1]?\nReturn: 1\nAnswer: ", "1"),
        ("What is the parity of [1, 0, 1]?\nSolution: Call: What is the parity of [0, 1]?\nReturn: 1\nAnswer: ",
         "0"),
    ]
    assert task.records((0,), "retuning") == [("What is the parity of [0]?\nSolution: ", "0")]


# --- every format against sum mod 2 -------------------------------------------------------------
@pytest.mark.parametrize("method", ["baseline", "scratchpad", "retuning"])
def test_every_method_answers_sum_mod_2(method):
    for bits in random_lists(2000, range(1, 31), seed=1) + EDGE_LISTS:
        final_text = task.records(bits, method)[-1][1]
        assert task.parse_answer(final_text, method) == sum(bits) % 2 == task.solution(bits), bits
        assert task.is_correct(bits, final_text, method)
        assert not task.is_correct(bits, str(1 - sum(bits) % 2), "baseline")


def test_scratchpad_writes_every_prefix_parity():
    for bits in random_lists(1000, range(1, 31), seed=2) + EDGE_LISTS:
        values = task.oracle(task.prompt(bits, "scratchpad"), "scratchpad").split(" ")[6:]
        assert values == [str(sum(bits[:k + 1]) % 2) for k in range(len(bits))]


def check_retuning_records(records, bits):
    assert len(records) == 2 * len(bits) - 1
    for context, completion in records:
        match = re.fullmatch(r"What is the parity of \[(.*)\]\?\nSolution: (.*)", context, re.DOTALL)
        listed, rest = match[1], match[2]
        question_bits = [int(x) for x in listed.split(", ")]
        assert question_bits == list(bits[len(bits) - len(question_bits):])  # always a suffix
        sub = f"What is the parity of {question_bits[1:]}?"
        if rest:  # a combine step: the call was the list minus its first bit, its answer came back
            assert rest == f"Call: {sub}\nReturn: {sum(question_bits[1:]) % 2}\nAnswer: "
            assert completion == str(sum(question_bits) % 2)
        elif len(question_bits) == 1:
            assert completion == str(question_bits[0])
        else:
            assert completion == f"Call: {sub}\n"


def test_retuning_records_step_by_step():
    for bits in random_lists(300, range(1, 25), seed=3) + EDGE_LISTS:
        check_retuning_records(Task.records(task, bits, "retuning"), bits)  # the oracle's trace
        check_retuning_records(task.records(bits, "retuning"), bits)  # the fast renderer


def test_fast_records_equal_the_protocol_trace():
    for bits in random_lists(3000, range(1, 32), seed=4) + EDGE_LISTS:
        assert task.records(bits, "retuning") == Task.records(task, bits, "retuning"), bits


def test_oracle_uses_what_came_back():
    context = ("What is the parity of [1, 0, 1]?\nSolution: Call: What is the parity of [0, 1]?\n"
               "Return: 0\nAnswer: ")
    assert task.oracle(context, "retuning") == "1"  # 1 xor the (wrong) 0 that came back


# --- answers ------------------------------------------------------------------------------------
def test_parse_answer_forms_and_errors():
    assert task.parse_answer("1", "baseline") == 1
    assert task.parse_answer("0", "retuning") == 0
    assert task.parse_answer("Compute one element at a time. 1 1 0", "scratchpad") == 0
    for text, method in [("", "baseline"), ("2", "baseline"), ("10", "retuning"),
                         ("Call: What is the parity of [1]?\n", "retuning"),
                         ("Compute one element at a time.", "scratchpad"), ("1 1 0", "scratchpad"),
                         ("Compute one element at a time. 1 x", "scratchpad"), ("1\n", "baseline"),
                         (" 1", "retuning"), ("Compute one element at a time. 1  1", "scratchpad"),
                         ("Compute one element at a time. 1 1\n", "scratchpad")]:
        with pytest.raises(ValueError):
            task.parse_answer(text, method)
    # A scratchpad is scored on its last value only when it wrote one per bit.
    assert task.is_correct((1, 0, 1, 1), "Compute one element at a time. 1 1 0 1", "scratchpad")
    for cut_short in ("Compute one element at a time. 1", "Compute one element at a time. 1 1 0 1 1"):
        assert not task.is_correct((1, 0, 1, 1), cut_short, "scratchpad")


def test_sample_is_seeded_and_uniform_bits():
    first = [task.sample(random.Random(7), n) for n in range(1, 60)]
    assert first == [task.sample(random.Random(7), n) for n in range(1, 60)]
    assert all(len(bits) == n and set(bits) <= {0, 1} for n, bits in enumerate(first, 1))
    rng = random.Random(8)
    ones = sum(sum(task.sample(rng, 50)) for _ in range(200)) / 10_000
    assert 0.48 < ones < 0.52


# --- paper and small presets --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["baseline", "scratchpad"])
def test_paper_baseline_and_scratchpad_counts(method):
    problems = list(task.training_problems(method, "paper", random.Random(0)))
    assert len(problems) == 129_388
    distinct = collections.Counter(map(len, set(problems)))
    assert sum(distinct.values()) == 101_912
    assert distinct == {n: min(2 ** n, 15_000, max(300, int(0.2 * 2 ** n))) for n in range(1, 22)}
    copies = collections.Counter(map(len, problems))
    repeats = {1: 60, 2: 60, 3: 60, 4: 20, 5: 10, 9: 10, 10: 4, 14: 4, 15: 1, 21: 1}
    assert all(copies[n] == distinct[n] * r for n, r in repeats.items())
    assert problems == list(task.training_problems(method, "paper", random.Random(0)))  # seeded: same lists
    assert problems != list(task.training_problems(method, "paper", random.Random(1)))


def test_paper_retuning_counts_and_expected_size():
    problems = list(task.training_problems("retuning", "paper", random.Random(0)))
    assert len(problems) == len(set(problems)) == 250_000
    assert problems == list(task.training_problems("retuning", "paper", random.Random(0)))  # seeded
    assert {len(bits) for bits in problems} == {21}
    assert len(task.records(problems[0], "retuning")) == 41  # 250,000 x 41 = 10,250,000 raw
    # A length-L suffix gives 2 distinct inputs (call and combine), length 1 gives one.
    numbers = [int("".join(map(str, bits)), 2) for bits in problems]
    expected = 0.0
    for n in range(1, 22):
        suffixes = len({number & ((1 << n) - 1) for number in numbers})
        if n <= 14:
            assert suffixes == 2 ** n  # every short suffix occurs
        inputs = suffixes * (1 if n == 1 else 2)
        expected += inputs * paper_keep_probability(n) * PAPER_RETUNING_REPEATS.get(n, 1)
    assert abs(expected - 124_400) < 300


def test_paper_retuning_copies():
    rng = random.Random(0)
    for context, _ in task.records((1, 0, 0, 1, 1, 0, 1, 0, 0, 1), "retuning"):
        n = len(task.problem_of(protocol.question_of(context)))
        assert task.retuning_copies(context, "paper", rng) == PAPER_RETUNING_REPEATS.get(n, 1)
    for n, keep in [(11, 0.1), (16, 0.1), (17, 0.065), (19, 0.045), (21, 0.025)]:
        inputs = [task.prompt(bits, "retuning") for bits in random_lists(20_000, [n], seed=n)]
        copies = [task.retuning_copies(context, "paper", rng) for context in inputs]
        assert set(copies) == {0, PAPER_RETUNING_REPEATS.get(n, 1)}
        assert abs(sum(c > 0 for c in copies) / len(copies) - keep) < 0.008, n


@pytest.mark.parametrize("method", ["baseline", "scratchpad"])
def test_small_preset(method):
    problems = list(task.training_problems(method, "small", random.Random(0)))
    assert collections.Counter(map(len, problems)) == {n: 2048 for n in range(1, 11)}
    assert collections.Counter(map(len, set(problems))) == {n: 2 ** n for n in range(1, 11)}


def test_small_retuning_preset_end_to_end():
    """De-duplicate by input, then apply the copies: every length 2..10 weighs 2,048 records,
    plus the extra copies of the combines whose call returned 0 (half of a length's 1,024)."""
    problems = list(task.training_problems("retuning", "small", random.Random(0)))
    assert len(problems) == len(set(problems)) == 1024
    distinct = {}
    for bits in problems:
        for record_input, output in task.records(bits, "retuning"):
            distinct.setdefault(record_input, output)
    assert len(distinct) == 4090
    weight, returned = collections.Counter(), collections.Counter()
    for record_input in distinct:
        length = record_input.split("]")[0].count(",") + 1
        copies = task.retuning_copies(record_input, "small", random.Random(0))
        weight[length] += copies
        if "Return: " in record_input:
            returned[record_input.split("Return: ")[1][0]] += copies
    assert weight == {1: 1024, **{n: 2048 + 512 for n in range(2, 11)}}
    assert returned == {"0": 2 * 9 * 512, "1": 9 * 512}  # 2 of 3 combines answer with the first bit


def test_unknown_preset_or_method_is_refused():
    with pytest.raises(ValueError, match="preset"):
        list(task.training_problems("baseline", "huge", random.Random(0)))
    with pytest.raises(ValueError, match="method"):
        list(task.training_problems("cot", "small", random.Random(0)))
