"""The dynamic-programming task (SPEC.md section 3): literal examples byte for byte, every format
checked against a brute-force optimum, the Re-Tuning recursion step by step, and the paper counts.

The paper's full Re-Tuning set (3,649,360 records, 1,272,227 distinct inputs) takes ~20 s to
render, so the suite renders the lists of length 2..4 and checks the counts that carry over; the
full figures were measured once by rendering everything (see tasks/dp.py's docstring).
"""
import collections
import itertools
import random
import re

import pytest

from tasks import get_task, protocol
from tasks.base import Task
from tasks.dp import all_lists, dp_array

task = get_task("dp")
FINALLY = ('Finally, we reconstruct the lexicographically smallest subsequence that fulfills the task '
           'objective by selecting numbers as follows. We store the result on a list named "output".')


# --- an independent solver: enumerate every valid choice ----------------------------------------
def brute_force(items):
    """(best sum, lexicographically smallest optimal choice in 1/2 form), by enumeration."""
    best, best_choice = None, None
    for choice in itertools.product((1, 2), repeat=len(items)):  # lexicographic order: 1 < 2
        if any(a == b == 1 for a, b in zip(choice, choice[1:])):
            continue
        total = sum(item for item, mark in zip(items, choice) if mark == 1)
        if best is None or total > best:
            best, best_choice = total, list(choice)
    return best, best_choice


def random_lists(count, lengths, seed):
    rng = random.Random(seed)
    return [tuple(rng.randint(-5, 5) for _ in range(rng.choice(lengths))) for _ in range(count)]


EDGE_LISTS = [(-3,), (0,), (5,), (-1, -2), (0, 0), (-5, -5, -5, -5, -5), (0, 0, 0, 0, 0), (0, -1, 0),
              (5, 5), (1, 2, 1), (2, 1, 1, 2), (-2, 3)]


# --- SPEC literal examples ----------------------------------------------------------------------
def test_spec_baseline_example():
    prompt = task.prompt((3, -1, 4), "baseline")
    assert prompt == (
        "Given a sequence of integers, find a subsequence with the highest sum, such that no two numbers "
        "in the subsequence are adjacent in the original sequence.\n\nOutput a list with \"1\" for chosen "
        "numbers and \"2\" for unchosen ones. If multiple solutions exist, select the lexicographically "
        "smallest. Input = [3, -1, 4].\nAnswer: ")
    assert task.records((3, -1, 4), "baseline") == [(prompt, "[1, 2, 1]")]


def test_spec_scratchpad_example():
    assert task.records((-2, 3), "scratchpad") == [(
        "Question: Let's solve input = [-2, 3].",
        "Scratchpad: dp[1] = max(input[1], 0) = max(3, 0) = 3\n"
        "dp[0] = max(input[0], input[1], 0) = max(-2, 3, 0) = 3\n\n" + FINALLY + "\n\n"
        "Let can_use_next_item = True.\n"
        "Since dp[0] != input[0] (3 != -2) or can_use_next_item == False, we store output[0] = 2. "
        "We update can_use_next_item = True.\n"
        "Since dp[1] == input[1] (3 == 3) and can_use_next_item == True, we store output[1] = 1.\n\n"
        "Reconstructing all together, output=[2, 1].")]


def test_scratchpad_general_lines_and_false_refusals():
    text = task.oracle(task.prompt((0, 1, 4, 3), "scratchpad"), "scratchpad")
    assert text.startswith(
        "Scratchpad: dp[3] = max(input[3], 0) = max(3, 0) = 3\n"
        "dp[2] = max(input[2], input[3], 0) = max(4, 3, 0) = 4\n"
        "dp[1] = max(dp[2], input[1] + dp[3], 0) = max(4, 1 + 3, 0) = 4\n"
        "dp[0] = max(dp[1], input[0] + dp[2], 0) = max(4, 0 + 4, 0) = 4\n\n" + FINALLY)
    # Item 1 fits (4 == 1 + 3) but its neighbour was taken: the original prints a false "!=".
    assert ("Since dp[0] == input[0] + dp[2] (4 == 0 + 4) and can_use_next_item == True, we store "
            "output[0] = 1. We update can_use_next_item = False.\n"
            "Since dp[1] != input[1] + dp[3] (4 != 1 + 3) or can_use_next_item == False, we store "
            "output[1] = 2. We update can_use_next_item = True.\n"
            "Since dp[2] == input[2] (4 == 4) and can_use_next_item == True, we store output[2] = 1. "
            "We update can_use_next_item = False.\n"
            "Since dp[3] != input[3] (3 != 3) or can_use_next_item == False, we store output[3] = 2.\n\n"
            "Reconstructing all together, output=[1, 2, 1, 2].") in text
    assert ("Since dp[1] != input[1] (4 != 4) or can_use_next_item == False, we store output[1] = 2."
            in task.oracle(task.prompt((4, 4), "scratchpad"), "scratchpad"))


SPEC_TOP = "Compute the maximum sum of nonadjacent subsequences of [3, -1, 4]\nSolution: "
SPEC_CHOSEN_TOP = "Create chosen indices array: sum array [7, 4, 4], item array [3, -1, 4], can use item True"
SPEC_CHOSEN_CALL = ("If there is only 1 item, return 1 if we should use it else 2. If we should use the first "
                    "item to get the sum, call False else True. Call: ")
SPEC_DP_CALL = "Call with array minus first element. Call: "
SPEC_DP_COMBINE = "Append max(return[0], array[0] + return[1]) to return.\nAnswer: "
SPEC_CHOSEN_MIDDLE = "Create chosen indices array: sum array [4, 4], item array [-1, 4], can use item False"
SPEC_CHOSEN_LAST = "Create chosen indices array: sum array [4], item array [4], can use item True"


def test_spec_retuning_records_of_3_minus1_4():
    top_after_dp = SPEC_TOP + "Call: Create dp array [3, -1, 4]\nReturn: [7, 4, 4]\nAnswer: "
    assert task.records((3, -1, 4), "retuning") == [
        (SPEC_TOP, "Call: Create dp array [3, -1, 4]\n"),
        ("Create dp array [3, -1, 4]\nSolution: ", SPEC_DP_CALL + "Create dp array [-1, 4]\n"),
        ("Create dp array [-1, 4]\nSolution: ", SPEC_DP_CALL + "Create dp array [4]\n"),
        ("Create dp array [4]\nSolution: ", "Return [0] if negative else element.\nAnswer: [4]"),
        ("Create dp array [-1, 4]\nSolution: " + SPEC_DP_CALL + "Create dp array [4]\nReturn: [4]\nAnswer: ",
         SPEC_DP_COMBINE + "[4, 4]"),
        ("Create dp array [3, -1, 4]\nSolution: " + SPEC_DP_CALL + "Create dp array [-1, 4]\n"
         "Return: [4, 4]\nAnswer: ", SPEC_DP_COMBINE + "[7, 4, 4]"),
        (top_after_dp, "Call: " + SPEC_CHOSEN_TOP + "\n"),
        (SPEC_CHOSEN_TOP + "\nSolution: ", SPEC_CHOSEN_CALL + SPEC_CHOSEN_MIDDLE + "\n"),
        (SPEC_CHOSEN_MIDDLE + "\nSolution: ", SPEC_CHOSEN_CALL + SPEC_CHOSEN_LAST + "\n"),
        (SPEC_CHOSEN_LAST + "\nSolution: ",
         "If there is only 1 item, return 1 if we should use it else 2.\nAnswer: [1]"),
        (SPEC_CHOSEN_MIDDLE + "\nSolution: " + SPEC_CHOSEN_CALL + SPEC_CHOSEN_LAST + "\nReturn: [1]\nAnswer: ",
         "Append 1 if False else 2.\nAnswer: [2, 1]"),
        (SPEC_CHOSEN_TOP + "\nSolution: " + SPEC_CHOSEN_CALL + SPEC_CHOSEN_MIDDLE + "\nReturn: [2, 1]\nAnswer: ",
         "Append 1 if False else 2.\nAnswer: [1, 2, 1]"),
        # SPEC section 6: the top level writes the answer itself.
        (top_after_dp + "Call: " + SPEC_CHOSEN_TOP + "\nReturn: [1, 2, 1]\nAnswer: ", "[1, 2, 1]"),
    ]


def test_spec_dp_base_case_of_negative_item():
    assert task.oracle("Create dp array [-5]\nSolution: ", "retuning") == \
        "Return [0] if negative else element.\nAnswer: [0]"


# --- every format against the brute-force optimum -----------------------------------------------
def test_solution_matches_brute_force_on_every_short_list_and_edge_cases():
    for items in itertools.chain(*(all_lists(n) for n in range(1, 5)), EDGE_LISTS):
        best, choice = brute_force(items)
        assert task.solution(items) == choice, items
        assert dp_array(items)[0] == max(best, 0)
    assert task.solution((-5, -1, -3)) == [2, 2, 2]      # nothing is best: choose nothing
    assert task.solution((0, 0, 0, 0, 0)) == [1, 2, 1, 2, 1]  # a zero may be taken: 1 < 2


def test_dp_array_is_the_best_suffix_sum():
    for items in random_lists(500, range(1, 9), seed=1):
        assert dp_array(items) == [brute_force(items[k:])[0] for k in range(len(items))]


@pytest.mark.parametrize("method", ["baseline", "scratchpad", "retuning"])
def test_every_method_answers_the_brute_force_choice(method):
    lists = random_lists(1500 if method != "scratchpad" else 800, range(1, 9), seed=2) + EDGE_LISTS
    for items in lists:
        choice = brute_force(items)[1]
        final_text = task.records(items, method)[-1][1]
        assert task.parse_answer(final_text, method) == choice, items
        assert task.is_correct(items, final_text, method)


def test_scratchpad_lines_agree_with_brute_force():
    rebuild = re.compile(r"Since dp\[(\d+)\] (==|!=) input\[\d+\]( \+ dp\[\d+\])? \((-?\d+) (?:==|!=) (-?\d+)"
                         r"(?: \+ (-?\d+))?\) (and|or) can_use_next_item == (True|False), "
                         r"we store output\[\d+\] = ([12])\.")
    for items in random_lists(500, range(2, 9), seed=3) + [x for x in EDGE_LISTS if len(x) > 1]:
        text = task.oracle(task.prompt(items, "scratchpad"), "scratchpad")
        sums = [brute_force(items[k:])[0] for k in range(len(items))] + [0, 0]
        choice = brute_force(items)[1]
        dp_lines = re.findall(r"^(?:Scratchpad: )?dp\[(\d+)\] = max\(.*?\) = max\((.*)\) = (-?\d+)$", text, re.MULTILINE)
        assert [int(index) for index, _, _ in dp_lines] == list(range(len(items) - 1, -1, -1))
        for index, arguments, value in dp_lines:
            i = int(index)
            shown = {len(items) - 1: f"{items[i]}, 0", len(items) - 2: f"{items[i]}, {items[-1]}, 0"}
            assert arguments == shown.get(i, f"{sums[i + 1]}, {items[i]} + {sums[i + 2]}, 0")
            assert int(value) == sums[i]
        lines = rebuild.findall(text)
        assert len(lines) == len(items)
        for index, op, _, shown_sum, shown_item, shown_after, joiner, flag, stored in lines:
            i = int(index)
            assert (int(shown_sum), int(shown_item)) == (sums[i], items[i])
            assert shown_after == ("" if i >= len(items) - 2 else str(sums[i + 2]))
            assert int(stored) == choice[i]
            assert (op, joiner, flag) == (("==", "and", "True") if choice[i] == 1 else ("!=", "or", "False"))


# --- Re-Tuning: the recursion, step by step ------------------------------------------------------
def numbers(text):
    return [int(x) for x in text.split(", ")]


def expected_answer(question):
    """The independent answer to any Re-Tuning question (a top-level problem or a sub-problem)."""
    match = re.fullmatch(r"Compute the maximum sum of nonadjacent subsequences of \[(.*)\]", question)
    if match:
        return brute_force(numbers(match[1]))[1]
    match = re.fullmatch(r"Create dp array \[(.*)\]", question)
    if match:
        items = numbers(match[1])
        return [brute_force(items[k:])[0] for k in range(len(items))]
    match = re.fullmatch(r"Create chosen indices array: sum array \[(.*)\], item array \[(.*)\], "
                         r"can use item (True|False)", question)
    assert match, question
    sums, items = numbers(match[1]), numbers(match[2])
    assert sums == [brute_force(items[k:])[0] for k in range(len(items))], question
    if match[3] == "True":
        return brute_force(items)[1]
    return [2] + brute_force(items[1:])[1]  # the first item may not be used: the best of the rest


def expected_call(question, calls_made):
    """The sub-problem a question must call next, from the independent answers."""
    match = re.fullmatch(r"Compute the maximum sum of nonadjacent subsequences of (\[.*\])", question)
    if match:
        if calls_made == 0:
            return f"Create dp array {match[1]}"
        sums = expected_answer(f"Create dp array {match[1]}")
        return f"Create chosen indices array: sum array {sums}, item array {match[1]}, can use item True"
    assert calls_made == 0
    match = re.fullmatch(r"Create dp array \[(.*)\]", question)
    if match:
        return f"Create dp array {numbers(match[1])[1:]}"
    match = re.fullmatch(r"Create chosen indices array: sum array \[(.*)\], item array \[(.*)\], .*", question)
    first_unchosen = expected_answer(question)[0] == 2
    return (f"Create chosen indices array: sum array {numbers(match[1])[1:]}, item array {numbers(match[2])[1:]}, "
            f"can use item {first_unchosen}")


def check_retuning_records(records, items):
    n = len(items)
    assert len(records) == 4 * n + 1
    kinds = collections.Counter(context.split(" ")[0] + context.split(" ")[1] for context, _ in records)
    assert kinds == {"Computethe": 3, "Createdp": 2 * n - 1, "Createchosen": 2 * n - 1}
    for context, completion in records:
        question, rest = context.split("\nSolution: ", 1)
        steps = [step.split("\nReturn: ") for step in rest.split("\nAnswer: ")[:-1]]
        assert len(steps) <= (2 if question.startswith("Compute") else 1)
        # each answer pasted back is the independent answer of the call just made
        for calls_made, (call_text, returned) in enumerate(steps):
            called = call_text.split("Call: ")[-1]
            assert called == expected_call(question, calls_made)
            assert returned == str(expected_answer(called))
        called = protocol.find_call(completion)
        if called is None:
            assert protocol.read_answer(completion) == str(expected_answer(question)), context
        else:
            assert called == expected_call(question, len(steps))
    assert records[-1][1] == str(brute_force(items)[1])


def test_retuning_records_step_by_step():
    for items in random_lists(300, range(1, 9), seed=4) + EDGE_LISTS:
        check_retuning_records(Task.records(task, items, "retuning"), items)  # the oracle's trace
        check_retuning_records(task.records(items, "retuning"), items)  # the fast renderer


def test_fast_records_equal_the_protocol_trace():
    lists = random_lists(3000, range(1, 10), seed=5) + list(all_lists(1)) + list(all_lists(2)) + EDGE_LISTS
    for items in lists:
        assert task.records(items, "retuning") == Task.records(task, items, "retuning"), items


def test_oracle_uses_what_came_back():
    context = "Create dp array [3, -1, 4]\nSolution: " + SPEC_DP_CALL + "Create dp array [-1, 4]\nReturn: [1, 0]\nAnswer: "
    # a perfect model combines what came back, right or wrong: max(1, 3 + 0, 0)
    assert task.oracle(context, "retuning") == SPEC_DP_COMBINE + "[3, 1, 0]"


# --- answers ------------------------------------------------------------------------------------
def test_parse_answer_forms_and_errors():
    assert task.parse_answer("[1, 2, 1]", "baseline") == [1, 2, 1]
    assert task.parse_answer("Append 1 if False else 2.\nAnswer: [1, 2]", "retuning") == [1, 2]
    assert task.parse_answer("Scratchpad: ...\n\nReconstructing all together, output=[2, 1].", "scratchpad") == [2, 1]
    for text, method in [("", "baseline"), ("[1, 3]", "baseline"), ("[1, 2", "retuning"), ("[]", "retuning"),
                         ("Call: Create dp array [4]\n", "retuning"), ("output[0] = 1.", "scratchpad"),
                         ("Reconstructing all together, output=[1, x].", "scratchpad")]:
        with pytest.raises(ValueError):
            task.parse_answer(text, method)
    assert not task.is_correct((3, -1, 4), "[1, 2, 2]", "baseline")
    # The right choice in a form the oracle does not write is wrong, as in the original's string
    # comparison.
    assert task.is_correct((3, -1, 4), "Append 1 if False else 2.\nAnswer: [1, 2, 1]", "retuning")
    for text, method in [("[1,2, 1]", "baseline"), ("[1, 2, 1] ", "baseline"),
                         ("Append 1 if False else 2.\nAnswer:  [1, 2, 1]", "retuning"),
                         ("Append 1 if False else 2.\nAnswer: [1, 2, 1]\n", "retuning"),
                         ("Reconstructing all together, output=[1, 2, 1].\n", "scratchpad"),
                         ("Reconstructing all together, output=[1, 2, 1]", "scratchpad")]:
        assert not task.is_correct((3, -1, 4), text, method), text


def test_sample_is_seeded_and_in_range():
    first = [task.sample(random.Random(7), n) for n in range(1, 30)]
    assert first == [task.sample(random.Random(7), n) for n in range(1, 30)]
    assert all(len(items) == n and all(-5 <= x <= 5 for x in items) for n, items in enumerate(first, 1))


# --- paper and small presets --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["baseline", "scratchpad"])
def test_paper_baseline_and_scratchpad_counts(method):
    problems = list(task.training_problems(method, "paper", random.Random(0)))
    assert len(problems) == 230_384
    assert len(set(problems)) == 177_144
    assert collections.Counter(map(len, problems)) == {2: 12_100, 3: 13_310, 4: 43_923, 5: 161_051}


def test_paper_retuning_counts_on_lengths_2_to_4():
    """Every list of length 2..4: per first-list length, SPEC's distinct counts for lengths 1..3 plus
    one final top-level record per list (SPEC section 6); length 4 holds only the 14,641 top-level
    lists here (in the paper set, length-5 lists also pass a False flag down to length 4)."""
    problems = list(task.training_problems("retuning", "paper", random.Random(0), lengths=[2, 3, 4]))
    assert len(problems) == 11 ** 2 + 11 ** 3 + 11 ** 4 == len(set(problems))
    distinct, raw = {}, 0
    for items in problems:
        for record_input, output in task.records(items, "retuning"):
            raw += 1
            distinct.setdefault(record_input, output)
    assert raw == sum(4 * len(items) + 1 for items in problems) == 267_289
    first_list_length = collections.Counter(
        record_input[record_input.index("["):record_input.index("]")].count(",") + 1 for record_input in distinct)
    assert first_list_length == {1: 33, 2: 968 + 121, 3: 10_648 + 1_331, 4: 14_641 * 7}
    full_paper = {1: 33, 2: 968 + 121, 3: 10_648 + 1_331, 4: 117_128 + 14_641, 5: 966_306 + 161_051}
    assert sum(full_paper.values()) == 1_095_083 + 177_144 == 1_272_227


def test_paper_retuning_copies():
    rng = random.Random(0)
    lists = {n: task.records(next(all_lists(n)), "retuning")[0][0] for n in range(1, 6)}
    assert [task.retuning_copies(lists[n], "paper", rng) for n in (1, 2, 3, 4)] == [250, 30, 4, 1]
    inner = "Create chosen indices array: sum array [0, 0, 0, 0, 0], item array [0, 0, 0, 0, 0], can use item True"
    copies = [task.retuning_copies(record_input, "paper", rng) for record_input in
              [lists[5], protocol.pose(inner)] * 10_000]
    assert set(copies) == {0, 1}
    assert abs(sum(copies) / len(copies) - 0.15) < 0.01
    again = random.Random(3), random.Random(3)
    assert [task.retuning_copies(lists[5], "paper", again[0]) for _ in range(50)] == \
        [task.retuning_copies(lists[5], "paper", again[1]) for _ in range(50)]


@pytest.mark.parametrize("method", ["baseline", "scratchpad", "retuning"])
def test_small_preset(method):
    problems = list(task.training_problems(method, "small", random.Random(1)))
    per_length = 1000 if method == "retuning" else 5000
    assert collections.Counter(map(len, problems)) == {n: per_length for n in (2, 3, 4, 5)}
    assert all(-5 <= x <= 5 for items in problems for x in items)
    assert problems == list(task.training_problems(method, "small", random.Random(1)))
    assert problems != list(task.training_problems(method, "small", random.Random(2)))
    # Every base case (11 dp-array and 22 chosen-indices inputs) x100, length-2 inputs x4, the rest once.
    for items, copies in (((3,), 100), ((3, -1), 4), ((3, -1, 4), 1)):
        for record_input, _ in task.records(items, "retuning"):
            if task.record_length(record_input) == len(items):
                assert task.retuning_copies(record_input, "small", random.Random(0)) == copies


def test_unknown_preset_or_method_is_refused():
    with pytest.raises(ValueError, match="preset"):
        list(task.training_problems("baseline", "huge", random.Random(0)))
    with pytest.raises(ValueError, match="method"):
        list(task.training_problems("cot", "small", random.Random(0)))
