"""The combine probe: which line of a failed combine's context is to blame."""
import re

import pytest

from evaluation.backends import CallableBackend, OracleBackend, Request
from evaluation.probe_addition_combines import EDITS, failed_combines, probe
from tasks import get_task

CONTEXT = ("604171964500 + 207576187239\nSolution: Call: 04171964500 + 07576187239\n"
           "Return: Carry 0, Output 11748151739\nAnswer: ")


def results_with(context, expected, length=12, kind="top-level combine"):
    trace = [{"depth": 0, "context": "604171964500 + 207576187239\nSolution: ", "completion": "Call: ..."},
             {"depth": 0, "context": context, "completion": "garbage"}]
    return {"task": "addition", "method": "retuning", "problems": [
        {"length": length, "trace": trace, "first_wrong_step": {"step": 1, "kind": kind, "expected": expected}},
        {"length": length, "trace": trace, "first_wrong_step": None},  # solved
        {"length": 3, "trace": trace, "first_wrong_step": {"step": 1, "kind": kind, "expected": expected}},
        {"length": length, "trace": trace, "first_wrong_step": {"step": 0, "kind": "top-level call", "expected": "x"}}]}


def test_the_probe_finds_the_line_a_model_trips_on():
    oracle = OracleBackend(get_task("addition"), "retuning")
    expected = oracle.generate([Request(CONTEXT)])[0].text
    assert expected == "Carry 0, Output 811748151739"
    combines = failed_combines(results_with(CONTEXT, expected), min_length=12)
    assert combines == [(CONTEXT, expected)]  # solved, too short and call failures left out

    def trips_on_long_call_runs(context):
        """Right unless the call line holds a run of more than 5 digits, like the tiny model."""
        call_line = context.split("\n")[1]
        if max((len(run) for run in re.findall(r"\d+", call_line)), default=0) > 5:
            return "Carry 0, Out7111111748151739"
        return oracle.complete(context)

    right = probe(CallableBackend(trips_on_long_call_runs), combines)
    assert set(right) == set(EDITS)
    assert right["as evaluated"] == 0 and right["call operands cut to 8 digits"] == 0
    assert right["call line replaced by a 1-digit call"] == right["call operands cut to 5 digits"] == 1
    assert right["call digits as dots"] == 1 and right["first call operand's digits as dots"] == 0
    assert right["problem line replaced by 12 + 34"] == 0  # another problem, another answer


def test_the_edits_change_only_their_line():
    lines = CONTEXT.split("\n")
    assert EDITS["call operands cut to 5 digits"](lines)[1] == "Solution: Call: 64500 + 87239"
    assert EDITS["call digits as dots"](lines)[1] == "Solution: Call: ........... + ..........."
    assert EDITS["first call operand cut to 5 digits"](lines)[1] == "Solution: Call: 64500 + 07576187239"
    for name, edit in EDITS.items():
        edited = edit(lines)
        assert len(edited) == 4 and edited[2:] == lines[2:], name


def test_other_results_are_refused():
    with pytest.raises(SystemExit, match="parity / retuning"):
        failed_combines({"task": "parity", "method": "retuning", "problems": []}, 12)
