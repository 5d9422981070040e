"""Addition (SPEC.md section 2): the spec's literal examples byte for byte, thousands of records
checked against Python's own a + b, the dataset presets, and the bulk renderer held equal to the
definition (``Task.records`` = ``protocol.solve`` driven by the oracle)."""
import json
import random

import pytest

from data_generation.pipeline import GenericRecords, Tally, record_piece
from tasks import get_task, protocol
from tasks.addition import PRESETS, BulkRetuning, Preset, pad

TASK = get_task("addition")


# --- SPEC literal examples ----------------------------------------------------------------------
def test_spec_examples_byte_for_byte():
    assert TASK.records(("07", "58"), "baseline") == [("07 + 58\nAnswer: ", "65")]
    assert TASK.records(("73199", "21439"), "scratchpad") == [(
        "73199 + 21439\nSolution: ",
        "Carry 1, Output 8\nCarry 1, Output 38\nCarry 0, Output 638\nCarry 0, Output 4638\nCarry 0, Output 94638")]
    assert TASK.records(("9", "9"), "retuning") == [("9 + 9\nSolution: ", "Carry 1, Output 8")]
    records = TASK.records(("73199", "21439"), "retuning")
    assert records[0] == ("73199 + 21439\nSolution: ", "Call: 3199 + 1439\n")
    assert records[-1] == ("73199 + 21439\nSolution: Call: 3199 + 1439\nReturn: Carry 0, Output 4638\nAnswer: ",
                           "Carry 0, Output 94638")
    assert len(records) == 2 * 5 - 1
    # leading zeros stay in sub-problems: "01" is a valid operand
    assert TASK.records(("101", "302"), "retuning")[:2] == [
        ("101 + 302\nSolution: ", "Call: 01 + 02\n"), ("01 + 02\nSolution: ", "Call: 1 + 2\n")]
    assert pad(7, 58) == ("07", "58") and TASK.question(pad(73199, 21439)) == "73199 + 21439"


def test_answer_parsing():
    assert TASK.parse_answer("Carry 0, Output 94638", "retuning") == 94638
    assert TASK.parse_answer("Carry 1, Output 08", "retuning") == 108
    assert TASK.parse_answer("Append.\nAnswer: Carry 1, Output 8", "retuning") == 18  # read as the protocol does
    assert TASK.parse_answer("Carry 1, Output 8\nCarry 1, Output 38", "scratchpad") == 138
    assert TASK.parse_answer("65", "baseline") == 65
    for text in ["", "Carry 2, Output 1", "Carry 1, Output ", "carry 1, output 8", "Carry 1, Output 8x", "6 5"]:
        for method in ("baseline", "scratchpad", "retuning"):
            with pytest.raises(ValueError):
                TASK.parse_answer(text, method)
    assert TASK.is_correct(("07", "58"), "65", "baseline")
    assert not TASK.is_correct(("07", "58"), "Carry 0, Output 64", "retuning")
    # SPEC: "Carry c, Output s" is c * 10^L + int(s), L the problem's length; as in the original's
    # string comparison, an answer of the right value in another form is wrong.
    assert TASK.answer_for(("99", "99"), "Carry 1, Output 98", "retuning") == 198
    assert TASK.is_correct(("99", "99"), "Carry 1, Output 98", "retuning")
    assert TASK.is_correct(("99", "99"), "Carry 1, Output 98", "scratchpad")
    for problem, text, method in [(("99", "99"), "Carry 1, Output 098", "retuning"),
                                  (("50", "50"), "Carry 1, Output 0", "retuning"),
                                  (("50", "50"), "Carry 0, Output 100", "scratchpad"),
                                  (("50", "50"), "0100", "baseline")]:
        assert not TASK.is_correct(problem, text, method), text
    assert TASK.is_correct(("50", "50"), "100", "baseline") and TASK.is_correct(("00", "00"), "0", "baseline")
    # Nothing around the answer either: the oracle writes no whitespace there.
    for text, method in [("Carry 0, Output 46\n", "retuning"), (" 46", "baseline"), ("46\n", "baseline"),
                         ("Carry 0, Output 6\nCarry 0, Output 46\n", "scratchpad")]:
        assert not TASK.is_correct(("12", "34"), text, method), text


@pytest.mark.parametrize("length", [70, 1000])
def test_records_of_problems_deeper_than_the_default_recursion_limit(length):
    """The oracle's trace is never cut by a limit: a 70-digit sum has 139 records (2L - 1), and
    its evaluation at that length (depth limit 2L) sizes its token budget from them; nor by
    Python's recursion limit (1,000 frames)."""
    problem = ("1" * length, "8" * length)
    records = TASK.records(problem, "retuning")
    assert len(records) == 2 * length - 1 and records[-1][1] == "Carry 0, Output " + "9" * length


# --- every record against an independent computation --------------------------------------------
def digits_problem(rng, length):
    """Any digits, leading zeros included, with extra weight on 0 and 9 (carry chains)."""
    digit = lambda: rng.choice("0999012345678")  # noqa: E731
    return "".join(digit() for _ in range(length)), "".join(digit() for _ in range(length))


EDGE_CASES = [("99999", "00001"), ("99999", "99999"), ("007", "234"), ("000", "000"), ("0", "0"),
              ("9", "9"), ("1", "9"), ("09", "91"), ("5" * 30, "5" * 30), ("0001", "9999")]


def check_carry_output(text, a, b):
    """``text`` is the answer of a + b as the spec means it, computed with Python integers."""
    total, width = int(a) + int(b), len(a)
    assert text == f"Carry {total // 10 ** width}, Output {str(total % 10 ** width).zfill(width)}"


def check_record(method, record_input, output):
    if method == "baseline":
        question, cue, rest = record_input.partition("\nAnswer: ")
        a, b = question.split(" + ")
        assert cue and rest == "" and output == str(int(a) + int(b))
        return
    question, cue, rest = record_input.partition("\nSolution: ")
    a, b = question.split(" + ")
    assert cue and len(a) == len(b) and a.isdigit() and b.isdigit()
    if method == "scratchpad":
        lines = output.split("\n")
        assert rest == "" and len(lines) == len(a)
        for k, line in enumerate(lines, start=1):
            check_carry_output(line, a[-k:], b[-k:])
        return
    if rest == "":  # a fresh context: call the sub-problem, or answer a 1-digit problem
        if len(a) == 1:
            check_carry_output(output, a, b)
        else:
            assert output == f"Call: {a[1:]} + {b[1:]}\n"
        return
    # a combine: the return pasted in is the sub-problem's answer, the output this problem's
    assert rest.startswith(f"Call: {a[1:]} + {b[1:]}\nReturn: ") and rest.endswith("\nAnswer: ")
    check_carry_output(rest[len(f"Call: {a[1:]} + {b[1:]}\nReturn: "):-len("\nAnswer: ")], a[1:], b[1:])
    check_carry_output(output, a, b)


@pytest.mark.parametrize("method", ["baseline", "scratchpad", "retuning"])
def test_thousands_of_records_against_python_sums(method):
    rng = random.Random(7)
    problems = EDGE_CASES + [digits_problem(rng, rng.randint(1, 24)) for _ in range(600)]
    checked = 0
    for problem in problems:
        records = TASK.records(problem, method)
        assert len(records) == (2 * len(problem[0]) - 1 if method == "retuning" else 1)
        for record_input, output in records:
            check_record(method, record_input, output)
            checked += 1
        final = records[-1][1] if method != "retuning" else protocol.read_answer(records[-1][1])
        assert TASK.parse_answer(final, method) == int(problem[0]) + int(problem[1])
    assert checked >= (7000 if method == "retuning" else 600)


def test_carries_through_every_digit():
    assert TASK.records(("99999", "00001"), "retuning")[-1][1] == "Carry 1, Output 00000"
    assert TASK.records(("99999", "00001"), "baseline")[0][1] == "100000"
    assert TASK.records(("007", "234"), "retuning")[-1] == (
        "007 + 234\nSolution: Call: 07 + 34\nReturn: Carry 0, Output 41\nAnswer: ", "Carry 0, Output 241")
    assert TASK.records(("000", "000"), "scratchpad")[0][1] == "Carry 0, Output 0\nCarry 0, Output 00\nCarry 0, Output 000"


def test_evaluation_problems_have_exact_digits():
    rng = random.Random(0)
    for n in (1, 2, 7, 60):
        for _ in range(50):
            a, b = TASK.sample(rng, n)
            assert len(a) == len(b) == n and a[0] != "0" and b[0] != "0" and TASK.length((a, b)) == n


# --- presets -------------------------------------------------------------------------------------
def test_paper_draw_counts_and_shape():
    base = list(TASK.training_problems("baseline", "paper", random.Random(3)))
    rt = list(TASK.training_problems("retuning", "paper", random.Random(3)))
    assert len(base) == len(rt) == 304_000
    swapped = 0
    for (a, b), (c, d) in zip(base, rt):  # one shared draw: Re-Tuning swaps some pairs
        assert (c, d) in ((a, b), (b, a))
        swapped += (c, d) != (a, b)
        assert len(a) == len(b)
    assert 0.48 < swapped / len(rt) < 0.52
    # the baseline never swaps: its first operand has at most as many digits as its second
    assert all(len(a.lstrip("0") or "0") <= len(b.lstrip("0")) + 1 for a, b in base[::97])
    lengths = {TASK.length(problem) for problem in base}
    assert set(range(1, 16)) <= lengths <= set(range(1, 17))
    # per start 1, 3, 6, 9, 12: 1000 pairs of each (i, j), i <= j: 120 + 91 + 55 + 28 + 10 cells
    assert sum(1 for a, b in base[:1000] if len(a) == 1) > 700  # the first cell: 1-digit + 1-digit (10 with p 0.1)


def test_limited_is_150_distinct_pairs_shared_by_methods():
    sets = {m: list(TASK.training_problems(m, "limited", random.Random(5)))
            for m in ("baseline", "scratchpad", "retuning")}
    problems = sets["baseline"]
    assert len(problems) == 150 and sets["scratchpad"] == problems == sets["retuning"]
    for d in range(1, 16):
        of_d = [p for p in problems if len(p[0]) == d]
        assert len(of_d) == 10 == len(set(of_d))
        assert all(a != b and a[0] != "0" and b[0] != "0" for a, b in of_d)
    assert sum(len(TASK.records(p, "retuning")) for p in problems) == 2250
    assert not TASK.deduplicates("limited") and TASK.deduplicates("paper")


def test_paper_retuning_copies():
    rng = random.Random(0)
    assert TASK.retuning_copies("7 + 3\nSolution: ", "paper", rng) == 1000
    assert TASK.retuning_copies("07 + 53\nSolution: ", "paper", rng) == 5
    assert TASK.retuning_copies("27 + 53\nSolution: Call: 7 + 3\nReturn: Carry 1, Output 0\nAnswer: ",
                                "paper", rng) == 5
    assert TASK.retuning_copies("000 + 000\nSolution: ", "paper", rng) == 1  # numeric (1, 1): never dropped
    assert TASK.retuning_copies("0123 + 1456\nSolution: ", "paper", rng) == 1  # (3, 4): not equal
    for question, keep in [("0123 + 0456", 0.15), ("1234567 + 7654321", 0.15), ("12345678 + 00000001", 1.0),
                           ("12345678 + 12345678", 0.35), ("00012345678 + 12345678901", 1.0)]:
        kept = [TASK.retuning_copies(question + "\nSolution: ", "paper", rng) for _ in range(4000)]
        assert set(kept) <= {0, 1} and abs(sum(kept) / 4000 - keep) < 0.03, question
    # 12 digits: beyond the dropped lengths
    assert TASK.retuning_copies("123456789012 + 123456789012\nSolution: ", "paper", rng) == 1


def test_bad_settings_raise():
    with pytest.raises(ValueError):
        list(TASK.training_problems("baseline", "huge", random.Random(0)))
    with pytest.raises(ValueError):
        list(TASK.training_problems("cot", "paper", random.Random(0)))
    with pytest.raises(ValueError):
        list(TASK.training_problems("baseline", "small", random.Random(0), lengths=[0, 3]))


# --- the bulk renderer equals the definition ---------------------------------------------------
def decode(pieces):
    return [(row["input"], row["output"]) for row in json.loads("[" + pieces[1:] + "]")] if pieces else []


def test_bulk_renderer_equals_task_records_per_problem():
    rng = random.Random(11)
    plain = Preset(lengths=(1,))  # no drops, no repeats: one solve's records exactly
    problems = EDGE_CASES + [digits_problem(rng, rng.randint(1, 20)) for _ in range(2000)]
    for problem in problems:
        bulk = BulkRetuning(plain, random.Random(0), record_piece)
        assert decode(bulk.pieces(problem)) == TASK.records(problem, "retuning"), problem


@pytest.mark.parametrize("preset", ["paper", "small"])
def test_bulk_renderer_equals_generic_dedup_and_reweighting(preset):
    """Same problems, same re-weighting seed: the bulk text, counts and membership equal the
    generic pipeline's (records de-duplicated by input, retuning_copies once per distinct input)."""
    rng = random.Random(13)
    problems = list(EDGE_CASES)
    for _ in range(3000):  # many shared suffixes (short, zero-padded) and some repeats
        i, j = sorted((rng.randint(1, 12), rng.randint(1, 12)))
        problems.append(pad(rng.randint(10 ** (i - 1), 10 ** i), rng.randint(10 ** (j - 1), 10 ** j)))
        if rng.random() < 0.05:
            problems.append(rng.choice(problems))
    bulk = TASK.fast_retuning(preset, random.Random(99), record_piece)
    generic = GenericRecords(TASK, "retuning", preset, random.Random(99), deduplicate=True)
    for problem in problems:
        assert bulk.pieces(problem) == generic.pieces(problem), problem
    tallies = []
    for source in (bulk, generic):
        tally = Tally()
        for entry in source.tally():
            tally.add(*entry)
        tallies.append((tally.per_length(), tally.summary()))
    assert tallies[0] == tallies[1]
    probes = problems[::50] + [TASK.sample(rng, n) for n in range(1, 14) for _ in range(20)]
    assert [bulk.trained(p) for p in probes] == [generic.trained(p) for p in probes]
    assert any(bulk.trained(p) for p in probes) and not all(bulk.trained(p) for p in probes)


def test_paper_retuning_record_count():
    """SPEC: the authors' file had 3,677,455 records; ours must be within 1%. Renders the whole
    paper set in memory-light pieces without writing it (about 10 s on one core)."""
    problems = TASK.training_problems("retuning", "paper", random.Random(0))
    bulk = TASK.fast_retuning("paper", random.Random(1), record_piece)
    for problem in problems:
        bulk.pieces(problem)
    per_kind = {}
    for (kind, length), copies in bulk.counts.items():
        per_kind[kind] = per_kind.get(kind, 0) + copies
    total = sum(per_kind.values())
    assert abs(total - 3_677_455) / 3_677_455 < 0.01, total
    assert per_kind["base"] == 100 * 1000  # the 100 one-digit base cases, x1000
    assert sum(c for (kind, length), c in bulk.counts.items() if length == 2) == 20_000 * 5
    distinct = sum(len(s) for s in bulk.seen)  # distinct questions; ~5.53M distinct inputs
    assert abs(2 * distinct - 100 - 5_530_000) / 5_530_000 < 0.01
