"""Which line of a failed Re-Tuning addition combine makes it fail? Re-runs the combines where
an evaluation first went wrong, each with one line of its context changed, and counts how many
come out right (docs/tiny_model.md: the long combines break on the digits of their call line).

    python evaluation/probe_addition_combines.py results/addition/retuning/results.json \
        runs/addition_retuning_small_tiny_seed0 --min-length 12

A combine context has four lines; ``call digits as dots`` turns

    604171964500 + 207576187239
    Solution: Call: 04171964500 + 07576187239
    Return: Carry 0, Output 11748151739
    Answer:

into the same text with ``Solution: Call: ........... + ...........`` as its second line.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.backends import Backend, Request  # noqa: E402
from tasks.protocol import CALL_TAG, SOLUTION_CUE  # noqa: E402

CALL_PREFIX = SOLUTION_CUE.lstrip("\n") + CALL_TAG  # "Solution: Call: ", the call line's start


def _dots(text: str) -> str:
    return re.sub(r"\d", ".", text)


def _edit_operands(first: Callable[[str], str], second: Callable[[str], str]):
    """An edit of the call line's two operands: with ``first = second = lambda x: x[-5:]``,
    ``Solution: Call: 04171964500 + 07576187239`` -> ``Solution: Call: 64500 + 87239``."""
    def edit(lines: list[str]) -> list[str]:
        a, b = lines[1][len(CALL_PREFIX):].split(" + ")
        return [lines[0], f"{CALL_PREFIX}{first(a)} + {second(b)}", *lines[2:]]
    return edit


def _keep(n: int) -> Callable[[str], str]:
    return lambda operand: operand[-n:]


def _same(operand: str) -> str:
    return operand


# Each edit takes the context's four lines (problem, call, return, "Answer: ") and gives new ones.
EDITS: dict[str, Callable[[list[str]], list[str]]] = {
    "as evaluated": lambda lines: lines,
    "call line replaced by a 1-digit call": lambda lines: [lines[0], CALL_PREFIX + "2 + 4", *lines[2:]],
    "call operands cut to 8 digits": _edit_operands(_keep(8), _keep(8)),
    "call operands cut to 5 digits": _edit_operands(_keep(5), _keep(5)),
    "first call operand cut to 5 digits": _edit_operands(_keep(5), _same),
    "second call operand cut to 5 digits": _edit_operands(_same, _keep(5)),
    "call digits as dots": _edit_operands(_dots, _dots),
    "first call operand's digits as dots": _edit_operands(_dots, _same),
    "problem line replaced by 12 + 34": lambda lines: ["12 + 34", *lines[1:]],
}


def failed_combines(results: dict, min_length: int) -> list[tuple[str, str]]:
    """(context, expected completion) of each problem of ``min_length`` digits or more whose
    first wrong step is a combine, from an evaluation's ``results.json``."""
    if results.get("task") != "addition" or results.get("method") != "retuning":
        raise SystemExit(f"error: this probe reads Re-Tuning addition results, not "
                         f"{results.get('task')} / {results.get('method')}")
    found = []
    for problem in results["problems"]:
        step = problem.get("first_wrong_step")
        if step and "combine" in step["kind"] and problem["length"] >= min_length:
            found.append((problem["trace"][step["step"]]["context"], step["expected"]))
    return found


def probe(backend: Backend, combines: list[tuple[str, str]]) -> dict[str, int]:
    """For each edit of ``EDITS``, how many of the combines the backend completes exactly right.
    Edits that change the answer (the problem line) count against the original answer."""
    right = {}
    for name, edit in EDITS.items():
        contexts = ["\n".join(edit(context.split("\n"))) for context, _ in combines]
        completions = backend.generate([Request(c, max_new_tokens=len(e) + 8) for c, (_, e) in zip(contexts, combines)])
        right[name] = sum(done.text == expected for done, (_, expected) in zip(completions, combines))
    return right


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="an addition Re-Tuning results.json")
    parser.add_argument("checkpoint", help="the checkpoint that was evaluated (or its run directory)")
    parser.add_argument("--min-length", type=int, default=12, help="problems of this many digits or more")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        with open(args.results) as handle:
            results = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: {args.results}: {error}")
    combines = failed_combines(results, args.min_length)
    if not combines:
        raise SystemExit(f"error: {args.results}: no problem of {args.min_length}+ digits first failed at a combine")
    from evaluation.cli import model_backend, resolve_checkpoint
    backend = model_backend(resolve_checkpoint(args.checkpoint)[0], device="auto", dtype="auto",
                            batch_size=args.batch_size, temperature=0.0, seed=0, reuse_cache=False,
                            sequential=False, info={})
    for name, count in probe(backend, combines).items():
        print(f"{name:38s} {count:4d} / {len(combines)} right")


if __name__ == "__main__":
    main()
