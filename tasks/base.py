"""What every task module provides. A fourth task subclasses Task and registers itself.

The generator, the trainer's metadata and the evaluation engine only ever talk to a task through
these methods, so each task's text format is written exactly once, in its own module.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

from tasks import protocol

METHODS = ("baseline", "scratchpad", "retuning")
Record = tuple[str, str]  # (input, output): the prompt and what the model must write after it


class Task:
    """One problem family. ``Problem`` is whatever the task likes (a tuple, a list); it is
    rendered to text only through the methods below."""

    name: str = ""

    # --- problems -------------------------------------------------------------------------
    def sample(self, rng: random.Random, length: int) -> Any:
        """A problem of ``length`` for evaluation (e.g. both operands exactly n digits)."""
        raise NotImplementedError

    def length(self, problem: Any) -> int:
        """The problem's length, the x axis of every accuracy plot."""
        raise NotImplementedError

    def solution(self, problem: Any) -> Any:
        """The correct answer, computed directly (the value ``parse_answer`` must return)."""
        raise NotImplementedError

    # --- text -----------------------------------------------------------------------------
    def question(self, problem: Any) -> str:
        """The Re-Tuning question text, e.g. ``"73199 + 21439"``."""
        raise NotImplementedError

    def prompt(self, problem: Any, method: str) -> str:
        """The first context a model sees for ``method``; Re-Tuning poses ``question``."""
        raise NotImplementedError

    def oracle(self, context: str, method: str) -> str:
        """The completion a perfect model writes after ``context`` (any context of a solve)."""
        raise NotImplementedError

    def parse_answer(self, text: str, method: str) -> Any:
        """The answer value in a model's final text; raises ValueError when unparsable."""
        raise NotImplementedError

    # --- derived, shared by every task ----------------------------------------------------
    def records(self, problem: Any, method: str) -> list[Record]:
        """Every training record of one problem: the oracle's trace through the protocol."""
        if method == "retuning":
            trace = protocol.solve(self.question(problem), lambda c: self.oracle(c, method))
            return trace.steps
        context = self.prompt(problem, method)
        return [(context, self.oracle(context, method))]

    def answer_for(self, problem: Any, final_text: str, method: str) -> Any:
        """The answer value of a final text written for ``problem``: ``parse_answer``'s, unless
        the text's meaning or its right form depends on the problem (addition's ``Carry c`` counts
        10^L; a parity scratchpad writes one value per bit)."""
        return self.parse_answer(final_text, method)

    def is_correct(self, problem: Any, final_text: str, method: str) -> bool:
        try:
            return self.answer_for(problem, final_text, method) == self.solution(problem)
        except ValueError:
            return False

    # --- datasets: data_generation/ drives these for every task alike ---------------------
    presets: tuple[str, ...] = ("paper", "small")

    def training_problems(self, method: str, preset: str, rng: random.Random,
                          lengths: list[int] | None = None) -> Iterator[Any]:
        """The preset's training problems in order, per-problem repeats and operand swaps applied
        (SPEC sampling). ``lengths`` overrides the preset's problem lengths where that makes sense."""
        raise NotImplementedError

    def shared_draw(self, preset: str) -> bool:
        """Whether the three methods get the same problems from the same seed (meta records it)."""
        return False

    def deduplicates(self, preset: str) -> bool:
        """Whether the preset's Re-Tuning records are de-duplicated by input (SPEC: yes)."""
        return True

    def record_length(self, record_input: str) -> int:
        """The length of the (sub-)problem a Re-Tuning record's input poses, for per-length
        counts: ``"007 + 234\\nSolution: "`` -> 3."""
        raise NotImplementedError

    def retuning_copies(self, record_input: str, preset: str, rng: random.Random) -> int:
        """Copies kept of one distinct Re-Tuning record after de-duplication (0 drops it): the
        SPEC's per-record re-weighting. Called once per distinct input, in first-seen order."""
        return 1
