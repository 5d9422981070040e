"""Small Re-Tuning addition records for the trainer's tests, made without the data generator.

``addition_records(rng, lengths, per_length)`` drives ``tasks.protocol.solve`` with a tiny
addition oracle (SPEC.md section 2), so the records have the real format; the test below pins it
to the SPEC's literal examples.
"""
import json
import random

from tasks import protocol


def _addition_oracle(context: str) -> str:
    a, b = protocol.question_of(context).split(" + ")
    width = len(a)
    if width == 1 or protocol.RETURN_TAG in context:
        total = int(a) + int(b)
        return f"Carry {total // 10 ** width}, Output {total % 10 ** width:0{width}d}"
    return f"{protocol.CALL_TAG}{a[1:]} + {b[1:]}\n"


def addition_records(rng: random.Random, lengths, per_length: int) -> list[dict]:
    """Re-Tuning records of ``per_length`` random problems of each operand length."""
    records = []
    for length in lengths:
        for _ in range(per_length):
            a, b = (f"{rng.randrange(10 ** length):0{length}d}" for _ in range(2))
            trace = protocol.solve(f"{a} + {b}", _addition_oracle)
            records += [{"input": i, "output": o} for i, o in trace.steps]
    return records


def write_dataset(folder, name: str, train: list[dict], test: list[dict] | None = None,
                  meta: dict | None = None) -> str:
    """Write ``<name>_train.json`` (and ``_test``/``_meta``) in ``folder``; returns the train path."""
    path = folder / f"{name}_train.json"
    path.write_text(json.dumps(train))
    if test is not None:
        (folder / f"{name}_test.json").write_text(json.dumps(test))
    if meta is not None:
        (folder / f"{name}_meta.json").write_text(json.dumps(meta))
    return str(path)


def test_fixture_records_match_the_spec_examples():
    trace = protocol.solve("73199 + 21439", _addition_oracle)
    assert trace.steps[0] == ("73199 + 21439\nSolution: ", "Call: 3199 + 1439\n")
    assert trace.steps[-1] == ("73199 + 21439\nSolution: Call: 3199 + 1439\n"
                               "Return: Carry 0, Output 4638\nAnswer: ", "Carry 0, Output 94638")
    assert ("9 + 9\nSolution: ", "Carry 1, Output 8") in protocol.solve("99 + 99", _addition_oracle).steps
    assert len(addition_records(random.Random(0), [5], 1)) == 2 * 5 - 1
