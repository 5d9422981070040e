"""The README's "Adding a task" example is real: its code block, run as a module, goes through
the generator and the evaluation engine like a built-in task."""
import importlib.util
import json
import os
import re
import sys

import pytest

import tasks
from data_generation.pipeline import generate
from evaluation.backends import OracleBackend
from evaluation.engine import evaluate
from tasks import get_task

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.fixture(autouse=True)
def forget_the_task():
    yield  # other tests see only the built-in tasks
    tasks._REGISTRY.pop("listsum", None)
    sys.modules.pop("readme_listsum", None)


def load_readme_task(tmp_path):
    text = open(README).read()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S)
                if block.startswith("# tasks/listsum.py"))
    path = tmp_path / "listsum.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("readme_listsum", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return get_task("listsum")


def test_readme_task_generates_records_that_sum_correctly(tmp_path):
    task = load_readme_task(tmp_path)
    assert task.records((3, 1, 4), "retuning") == [
        ("Sum [3, 1, 4]\nSolution: ", "Call: Sum [1, 4]\n"),
        ("Sum [1, 4]\nSolution: ", "Call: Sum [4]\n"),
        ("Sum [4]\nSolution: ", "4"),
        ("Sum [1, 4]\nSolution: Call: Sum [4]\nReturn: 4\nAnswer: ", "5"),
        ("Sum [3, 1, 4]\nSolution: Call: Sum [1, 4]\nReturn: 5\nAnswer: ", "8"),
    ]
    meta = generate(task, "retuning", "small", 0, str(tmp_path), progress=False)
    assert meta["train_lengths"] == list(range(1, 9))
    records = json.load(open(tmp_path / "listsum_retuning_small_train.json"))
    assert len(records) == meta["n_train"] > 0
    for record in records:
        if "Return: " in record["input"]:  # a combine step: first item plus the returned sum
            first = int(record["input"][5])
            returned = int(record["input"].split("Return: ")[1].split("\n")[0])
            assert int(record["output"]) == first + returned


def test_readme_task_is_solved_by_the_engine_far_beyond_training(tmp_path):
    task = load_readme_task(tmp_path)
    for method in ("baseline", "scratchpad", "retuning"):
        results = evaluate(OracleBackend(task, method), task, method, [1, 5, 30], 4, seed=1, progress=False)
        assert results["summary"]["accuracy"] == 1.0, method
    assert results["lengths"]["30"]["mean_calls"] == 29
