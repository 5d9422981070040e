"""The Call/Return protocol (SPEC.md section 1): the one place where its text rules live.

A problem Q is posed as ``Q + "\\nSolution: "``. A completion either answers, or ends in a line
``"Call: " + sub_question + "\\n"``. The sub-question is solved in a fresh context, and the parent
continues from ``context + completion + "Return: " + answer + "\\nAnswer: "``.

Both the data generator (driving the protocol with a task's oracle) and the evaluation engine
(driving it with a model) use these functions, so training text and inference text are the same
by construction. Example of one solve of ``"73199 + 21439"`` (two of its steps)::

    "73199 + 21439\\nSolution: "                                     -> "Call: 3199 + 1439\\n"
    "73199 + 21439\\nSolution: Call: 3199 + 1439\\nReturn: Carry 0, Output 4638\\nAnswer: "
                                                                    -> "Carry 0, Output 94638"
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

SOLUTION_CUE = "\nSolution: "
ANSWER_CUE = "\nAnswer: "
CALL_TAG = "Call: "
RETURN_TAG = "Return: "
ANSWER_TAG = "Answer: "


class ProtocolError(ValueError):
    """A completion that breaks the protocol (malformed call, runaway recursion, ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def pose(question: str) -> str:
    """The context in which a (sub-)problem is solved: ``"9 + 9"`` -> ``"9 + 9\\nSolution: "``."""
    return question + SOLUTION_CUE


def question_of(context: str) -> str:
    """The question a context poses: ``"9 + 9\\nSolution: Call: ..."`` -> ``"9 + 9"``."""
    return context.split(SOLUTION_CUE, 1)[0]


def find_call(completion: str) -> str | None:
    """The sub-question a completion calls, or None when it answers.

    ``"Call with array minus first element. Call: Create dp array [-1, 4]\\n"``
    -> ``"Create dp array [-1, 4]"``. Raises ProtocolError("malformed_call") for a ``Call: `` with
    an empty question, without the newline that ends a call line, or with text after it.
    """
    at = completion.rfind(CALL_TAG)
    if at < 0:
        return None
    line = completion[at + len(CALL_TAG):]
    sub_question = line[:-1]
    if not line.endswith("\n") or not sub_question.strip() or "\n" in sub_question:
        raise ProtocolError("malformed_call", repr(completion[at:]))
    return sub_question


def call_line(sub_question: str) -> str:
    """The line that calls a sub-problem: ``call_line("3199 + 1439") == "Call: 3199 + 1439\\n"``."""
    return CALL_TAG + sub_question + "\n"


def append_return(context: str, completion: str, returned: str) -> str:
    """The parent's next context once its call came back with ``returned``::

        append_return("3 + 4\\nSolution: ", "Call: ...\\n", "Carry 0, Output 7")
        == "3 + 4\\nSolution: Call: ...\\nReturn: Carry 0, Output 7\\nAnswer: "
    """
    return context + completion + RETURN_TAG + returned + ANSWER_CUE


def returned_answers(context: str) -> list[str]:
    """The answers pasted back into a context so far, in order (what an oracle step reads)::

        returned_answers("3 + 4\\nSolution: Call: ...\\nReturn: Carry 0, Output 7\\nAnswer: ")
        == ["Carry 0, Output 7"]
    """
    return [part.split(ANSWER_CUE, 1)[0] for part in context.split(RETURN_TAG)[1:]]


def read_answer(completion: str) -> str:
    """What a finished context hands back: the text after its last ``Answer: ``, else all of it.

    ``"Append 1 if False else 2.\\nAnswer: [1, 2, 1]"`` -> ``"[1, 2, 1]"``;
    ``"Carry 0, Output 4638"`` -> ``"Carry 0, Output 4638"``.
    """
    at = completion.rfind(ANSWER_TAG)
    return completion if at < 0 else completion[at + len(ANSWER_TAG):]


@dataclass
class Trace:
    """Every (context, completion) pair of one solve, in the order they were generated."""

    steps: list[tuple[str, str]] = field(default_factory=list)
    answer: str | None = None
    calls: int = 0


def solve(question: str, generate: Callable[[str], str], max_depth: int = sys.maxsize,
          max_calls: int = sys.maxsize) -> Trace:
    """Solve ``question`` one generation at a time, recursing on each call (the reference recursion).

    ``generate(context) -> completion`` is a task's oracle (then the trace's steps are exactly the
    problem's Re-Tuning training records) or a model. Raises ProtocolError on a broken limit; an
    oracle's trace has none (addition recurses as deep as the problem is long), a model's
    evaluation passes its own.
    """
    trace = Trace()
    # The open contexts, outermost first, each with the completion that made its call: a stack
    # rather than Python recursion, so a 1,000-digit sum (1,000 levels) solves too.
    waiting: list[tuple[str, str]] = []
    context = pose(question)
    while True:
        completion = generate(context)
        trace.steps.append((context, completion))
        called = find_call(completion)
        if called is None:
            answer = read_answer(completion)
            if not waiting:
                trace.answer = answer
                return trace
            parent, call = waiting.pop()
            context = append_return(parent, call, answer)
            continue
        trace.calls += 1
        if trace.calls > max_calls:
            raise ProtocolError("max_calls", f"more than {max_calls} calls")
        if len(waiting) + 1 > max_depth:
            raise ProtocolError("max_depth", f"recursion deeper than {max_depth}")
        waiting.append((context, completion))
        context = pose(called)
