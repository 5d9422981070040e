"""The batched Call/Return engine with test-double models: the task's oracle (must be perfect at
every length, far beyond training) and models that write garbage or never stop (every problem
fails with its reason, nothing raises, time stays bounded)."""
import random
import time

import pytest

from evaluation.backends import CallableBackend, OracleBackend, Request
from evaluation.engine import (LimitRules, Limits, evaluate, format_trace, run_engine,
                               sample_problems, solve_sequentially)
from tasks import get_task, protocol, task_names

METHODS = ("baseline", "scratchpad", "retuning")
# Lengths well past any training range (addition and parity train to 15-21, DP to 5).
LONG = {"addition": [1, 2, 3, 7, 15, 16, 31, 45, 60], "dp": [2, 3, 5, 6, 11, 17, 24],
        "parity": [1, 2, 3, 9, 21, 22, 40, 60]}
TASKS = ["addition", "dp", "parity"]


def require(task_name):
    if task_name not in task_names():
        pytest.skip(f"tasks/{task_name}.py has not landed yet")
    return get_task(task_name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task_name", TASKS)
def test_oracle_is_perfect_at_every_length(task_name, method):
    task = require(task_name)
    lengths = LONG[task_name]
    samples = 1 if method == "scratchpad" and task_name == "dp" else 3
    results = evaluate(OracleBackend(task, method), task, method, lengths, samples, seed=1,
                       progress=False)
    assert results["summary"]["problems"] == len(lengths) * samples
    assert results["summary"]["accuracy"] == 1.0, results["summary"]["failures"]
    for n in lengths:
        row = results["lengths"][str(n)]
        assert row["accuracy"] == 1.0 and row["failures"] == {}
    for problem in results["problems"]:
        assert problem["predicted"] == problem["expected"]
        if method == "retuning":
            assert problem["calls"] >= problem["length"] - 1  # every length really recursed
            assert max(step["depth"] for step in problem["trace"]) >= problem["length"] - 1
        else:
            assert problem["calls"] == 0 and len(problem["trace"]) == 1


@pytest.mark.parametrize("task_name", TASKS)
def test_oracle_trace_is_the_training_records(task_name):
    """The invariant between training data and inference: driven by the oracle, the batched
    engine's (context, completion) steps are the problem's Re-Tuning records, in order."""
    task = require(task_name)
    problems = sample_problems(task, LONG[task_name][:5], 2, seed=3)
    results = run_engine(OracleBackend(task, "retuning"), task, "retuning", problems,
                         lambda p: Limits(100, 1000, 10_000), progress=False)
    for problem, result in zip(problems, results):
        assert [(s.context, s.completion) for s in result.trace] == task.records(problem, "retuning")


def test_sequential_reference_matches_engine_with_oracle():
    task = require("dp")
    problems = sample_problems(task, [2, 4, 7], 3, seed=5)
    limits = lambda p: Limits(35, 100, 400)  # noqa: E731
    batched = run_engine(OracleBackend(task, "retuning"), task, "retuning", problems, limits, progress=False)
    one_by_one = solve_sequentially(OracleBackend(task, "retuning"), task, "retuning", problems, limits,
                                    progress=False)
    for a, b in zip(batched, one_by_one):
        assert a.trace == b.trace and a.calls == b.calls and a.correct and b.correct


def test_problems_of_all_depths_share_rounds():
    """One round asks for the innermost context of every unfinished problem, whatever its depth."""
    task = require("parity")
    rounds = []

    class Recording(CallableBackend):
        def generate(self, requests):
            rounds.append([request.context for request in requests])
            return super().generate(requests)

    problems = [tuple([1] * n) for n in (1, 3, 6)]
    results = run_engine(Recording(lambda c: task.oracle(c, "retuning")), task, "retuning", problems,
                         lambda p: Limits(20, 20, 50), progress=False)
    assert all(r.correct for r in results)
    # 2n - 1 generations each (1, 5, 11): the longest problem sets the number of rounds.
    assert len(rounds) == 2 * 6 - 1
    assert [len(r) for r in rounds] == [3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    second = rounds[1]  # the 3- and 6-bit problems, both one call deep
    assert second == [protocol.pose(task.question((1, 1))), protocol.pose(task.question((1,) * 5))]


# --- garbage and runaway models ---------------------------------------------------------------
def run_garbage(task, method, complete, lengths=(2, 5, 9), samples=4, **rules):
    calls = []

    def counted(context):
        calls.append(context)
        return complete(context)

    start = time.perf_counter()
    rules = LimitRules(**{"new_tokens_fixed": 40, **rules})
    results = evaluate(CallableBackend(counted), task, method, lengths, samples, seed=0, rules=rules,
                       progress=False)
    return results, calls, time.perf_counter() - start


def failures_of(results):
    return [p["failure"] for p in results["problems"]]


@pytest.mark.parametrize("method", METHODS)
def test_random_text_fails_as_unparsable(method):
    task = require("parity")
    rng = random.Random(0)
    alphabet = "abcxyz[], \n?"
    results, calls, seconds = run_garbage(
        task, method, lambda c: "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30))))
    assert results["summary"]["accuracy"] == 0
    assert set(failures_of(results)) == {"unparsable_answer"}
    assert all(p["failure_message"] for p in results["problems"])
    assert len(calls) == results["summary"]["problems"]  # one generation each: no call was read
    assert seconds < 10


def test_model_that_never_stops_fails_every_problem_at_the_token_limit():
    task = require("parity")
    results, calls, seconds = run_garbage(task, "retuning", lambda c: ("1" * 1000, False))
    assert set(failures_of(results)) == {"max_new_tokens"}
    assert len(calls) == results["summary"]["problems"]
    assert all(len(p["trace"][0]["completion"]) == 40 for p in results["problems"])
    assert seconds < 10


def test_endless_recursion_stops_at_the_depth_limit():
    task = require("parity")
    results, calls, seconds = run_garbage(task, "retuning", lambda c: "Call: What is the parity of [1]?\n",
                                          depth_per_length=2, depth_fixed=0)
    assert set(failures_of(results)) == {"max_depth"}
    for problem in results["problems"]:
        # depth 0..2n generate, the call from depth 2n is refused
        assert len(problem["trace"]) == 2 * problem["length"] + 1
        assert problem["calls"] == 2 * problem["length"] + 1
    assert seconds < 10


def test_endless_calls_at_one_depth_stop_at_the_call_limit():
    task = require("parity")
    # The top context calls forever; each sub-call answers at once.
    complete = lambda c: "0" if protocol.question_of(c) == "sub" else "Call: sub\n"  # noqa: E731
    results, calls, seconds = run_garbage(task, "retuning", complete, calls_per_length=0, calls_fixed=7)
    assert set(failures_of(results)) == {"max_calls"}
    assert all(p["calls"] == 8 for p in results["problems"])
    assert len(calls) == results["summary"]["problems"] * (8 + 7)
    assert seconds < 10


@pytest.mark.parametrize("task_name", task_names())
def test_a_lengths_problems_do_not_depend_on_the_other_lengths_or_on_more_samples(task_name):
    """So methods evaluated at SPEC's settings (100 baseline problems per length, 20 Re-Tuning)
    share their problems, and ``--lengths 10`` poses those that length 10 gets in 2-60."""
    task = get_task(task_name)
    alone = sample_problems(task, [5], 20, seed=3)
    among_others = sample_problems(task, [2, 3, 4, 5, 6], 100, seed=3)
    assert alone == among_others[300:320]
    assert sample_problems(task, [5], 20, seed=4) != alone


def test_a_callable_backend_counts_eos_against_the_token_budget():
    """As an HF backend does: five characters and EOS need six tokens, so a budget of five ends
    the text there with no EOS."""
    backend = CallableBackend(lambda context: "abcde")
    for budget, expected in [(4, ("abcd", False, 4)), (5, ("abcde", False, 5)), (6, ("abcde", True, 6))]:
        completion, = backend.generate([Request("x", budget)])
        assert (completion.text, completion.hit_eos, completion.n_generated) == expected


@pytest.mark.parametrize("completion", ["Call: \n", "Call: a\nb", "Call:    \n", "Call: What is the parity of [1]?"])
def test_malformed_calls_fail(completion):
    task = require("parity")
    results, _, _ = run_garbage(task, "retuning", lambda c: completion)
    assert set(failures_of(results)) == {"malformed_call"}


def test_failures_are_per_problem_and_the_run_goes_on():
    """Garbage for some problems, the oracle for the rest: each problem gets its own outcome."""
    task = require("parity")
    problems = sample_problems(task, [3, 4, 5, 6], 3, seed=2)
    kind_of_length = {3: "oracle", 4: "runaway", 5: "deep", 6: "garbage"}

    def complete(context):
        question = protocol.question_of(context)
        kind = "deep" if question == "deep" else kind_of_length.get(len(task.problem_of(question)), "oracle")
        if kind == "runaway":
            return "x" * 100, False
        if kind == "garbage":
            return "two"
        if kind == "deep":
            return "Call: deep\n"
        return task.oracle(context, "retuning")  # oracle problems call on lengths 2 and 1: oracle too

    results = run_engine(CallableBackend(complete), task, "retuning", problems,
                         lambda p: Limits(2 * len(p), 50, 60), progress=False)
    expected = {"oracle": None, "runaway": "max_new_tokens", "deep": "max_depth", "garbage": "unparsable_answer"}
    assert len(results) == 12
    for result in results:
        kind = kind_of_length[result.length]
        assert result.failure == expected[kind]
        assert result.correct == (kind == "oracle")


def test_format_trace_shows_the_call_tree():
    task = require("parity")
    results = evaluate(OracleBackend(task, "retuning"), task, "retuning", [3], 1, seed=0, progress=False)
    text = format_trace(results["problems"][0], width=0)
    lines = text.splitlines()
    bits = results["problems"][0]["problem"]
    assert lines[0].startswith(f"#0 length 3: expected {results['problems'][0]['expected']}")
    assert lines[1].startswith("[0] What is the parity of ")
    assert lines[2].startswith("  [1] What is the parity of " + str(bits[1:]).replace("(", "["))
    assert lines[3].startswith("    [2] ")
    assert lines[-1].startswith("[0] ...Return: ") and "\\nAnswer:" in lines[-1]
    assert len(lines) == 1 + 5


def test_first_wrong_step_names_where_a_solve_left_the_oracle():
    """A model that follows the oracle except in two places: the combine of every 2-digit
    sub-problem writes a wrong last digit, and a 5-digit problem's top-level call a wrong one.
    The results name that step for each wrong problem, and count them per length."""
    task = require("addition")

    def complete(context):
        expected = task.oracle(context, "retuning")
        length = task.record_length(context)
        if length == 2 and protocol.RETURN_TAG in context:
            return expected[:-1] + str((int(expected[-1]) + 1) % 10)
        if length == 5 and protocol.RETURN_TAG not in context:
            return expected[:-2] + str((int(expected[-2]) + 1) % 10) + "\n"
        return expected

    results = evaluate(CallableBackend(complete), task, "retuning", [1, 4, 5], 2, seed=0, progress=False)
    by_length = {n: [p for p in results["problems"] if p["length"] == n] for n in (1, 4, 5)}
    assert all(p["correct"] and p["first_wrong_step"] is None for p in by_length[1])
    for problem in by_length[4]:
        wrong = problem["first_wrong_step"]
        assert not problem["correct"]
        assert (wrong["kind"], wrong["depth"], wrong["sub_length"]) == ("combine", 2, 2)
        step = problem["trace"][wrong["step"]]
        assert step["completion"] == wrong["written"] != wrong["expected"]
        assert all(task.oracle(s["context"], "retuning") == s["completion"]
                   for s in problem["trace"][:wrong["step"]])
    for problem in by_length[5]:
        wrong = problem["first_wrong_step"]
        assert (wrong["step"], wrong["kind"], wrong["sub_length"]) == (0, "top-level call", 5)
    assert results["lengths"]["4"]["first_wrong_steps"] == {"combine": 2}
    assert results["lengths"]["5"]["first_wrong_steps"] == {"top-level call": 2}
    assert results["lengths"]["1"]["first_wrong_steps"] == {}
