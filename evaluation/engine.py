"""The batched Call/Return engine: many problems solved at once, a model calling itself.

Each problem keeps a stack of open contexts (its recursion); only the innermost one can
generate. A *round* gathers that innermost context of every unfinished problem, whatever its
depth, and hands them to the backend in one ``generate`` call (which batches them). Then each
completion is read with the protocol (``tasks.protocol``):

* ``"Call: Q\\n"``   -> a new context ``"Q\\nSolution: "`` is pushed;
* an answer R       -> the context is popped; its parent continues from
  ``parent + completion + "Return: R\\nAnswer: "``, reusing the parent's KV cache;
* the top context answering ends the problem.

Baseline and scratchpad are the same engine with a single generation per problem. A problem that
breaks a limit (depth, calls, new tokens), writes a malformed call or an unparsable answer is
marked failed with that reason, and the others go on.

``solve_sequentially`` runs the same problems through ``protocol.solve`` one at a time (the
original code's way); a test holds its answers and traces equal to the engine's.
"""
from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tqdm import tqdm

from evaluation.backends import Backend, Completion, Request
from tasks import protocol
from tasks.protocol import ProtocolError


# --- limits ---------------------------------------------------------------------------------
@dataclass
class Limits:
    """Per-problem limits: call depth, total calls, new tokens per generation."""

    max_depth: int
    max_calls: int
    max_new_tokens: int


@dataclass
class LimitRules:
    """How a problem's limits follow from its length n (``config/evaluation/<task>.yaml``):
    depth ``depth_per_length * n + depth_fixed`` (SPEC: 2n for addition and parity, 35 for DP),
    calls likewise, and new tokens per generation ``new_tokens_margin`` times the oracle's
    longest completion for that problem plus ``new_tokens_extra`` (or ``new_tokens_fixed``)."""

    depth_per_length: float = 2
    depth_fixed: int = 0
    calls_per_length: float = 4
    calls_fixed: int = 8
    new_tokens_margin: float = 1.5
    new_tokens_extra: int = 16
    new_tokens_fixed: int | None = None

    def for_problem(self, task, method: str, problem: Any, backend: Backend) -> Limits:
        n = task.length(problem)
        if self.new_tokens_fixed is not None:
            new_tokens = int(self.new_tokens_fixed)
        else:
            longest = max(backend.count_tokens(output) for _, output in task.records(problem, method))
            new_tokens = int(self.new_tokens_margin * (longest + 1)) + int(self.new_tokens_extra)
        return Limits(max_depth=int(self.depth_per_length * n + self.depth_fixed),
                      max_calls=int(self.calls_per_length * n + self.calls_fixed),
                      max_new_tokens=new_tokens)


# --- results --------------------------------------------------------------------------------
@dataclass
class Step:
    """One generation: the context, what the model wrote, and the call depth of the context."""

    depth: int
    context: str
    completion: str


@dataclass
class ProblemResult:
    index: int
    problem: Any
    length: int
    expected: Any
    limits: Limits
    trace: list[Step] = field(default_factory=list)
    final_text: str | None = None
    predicted: Any = None
    correct: bool = False
    failure: str | None = None
    failure_message: str = ""
    calls: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    prompt_tokens_computed: int = 0
    finished_at_s: float = 0.0
    first_wrong_step: dict | None = None  # a wrong Re-Tuning solve: see ``first_wrong_step``

    @property
    def done(self) -> bool:
        return self.final_text is not None or self.failure is not None


def _score(result: ProblemResult, task, method: str) -> None:
    """Parse the final text and compare it with the task's solution."""
    try:
        result.predicted = task.answer_for(result.problem, result.final_text, method)
    except ValueError as error:
        result.failure, result.failure_message = "unparsable_answer", str(error)
        return
    result.correct = result.predicted == result.expected


def first_wrong_step(result: ProblemResult, task) -> dict | None:
    """Where a Re-Tuning solve first left the oracle's path: its first generation whose completion
    differs from what ``task.oracle`` writes in the same context (every earlier context is then a
    gold one, which the oracle reads). For ``3220368 + 6205929``, gone wrong at the top::

        {"step": 0, "depth": 0, "kind": "top-level call", "sub_length": 7,
         "expected": "Call: 220368 + 205929\\n", "written": "Call: 03688 + 25929\\n"}

    ``kind`` is ``call``, ``base case`` (an answer before any Return) or ``combine`` (an answer
    after one), ``top-level`` at depth 0. None when every step matched the oracle.
    """
    for number, step in enumerate(result.trace):
        expected = task.oracle(step.context, "retuning")
        if step.completion == expected:
            continue
        kind = ("call" if protocol.find_call(expected) is not None
                else "combine" if protocol.RETURN_TAG in step.context else "base case")
        try:
            sub_length = task.record_length(step.context)
        except NotImplementedError:
            sub_length = None
        return dict(step=number, depth=step.depth, kind=("top-level " if step.depth == 0 else "") + kind,
                    sub_length=sub_length, expected=expected, written=step.completion)
    return None


# --- the batched engine ---------------------------------------------------------------------
@dataclass
class _Frame:
    """An open context of one problem: its text, depth, the completion it is waiting on (after a
    call), and cache keys (its own, and the parent context it extends)."""

    context: str
    depth: int
    key: int
    parent_key: int | None = None
    completion: str = ""


class _Solve:
    """One problem's recursion state in the batched engine."""

    def __init__(self, result: ProblemResult, first_context: str, recursive: bool, keys):
        self.result = result
        self.recursive = recursive
        self.keys = keys
        self.stack = [_Frame(first_context, 0, next(keys))]

    def request(self) -> Request:
        frame = self.stack[-1]
        # Only a context that calls is continued, so only then is its cache worth keeping.
        return Request(frame.context, self.result.limits.max_new_tokens,
                       key=frame.key if self.recursive else None, parent=frame.parent_key,
                       keep_if=_calls)

    def advance(self, completion: Completion) -> list[int]:
        """Apply one completion; returns the cache keys that will never be continued."""
        result, frame = self.result, self.stack[-1]
        result.trace.append(Step(frame.depth, frame.context, completion.text))
        result.generated_tokens += completion.n_generated
        result.prompt_tokens += completion.prompt_tokens
        result.prompt_tokens_computed += completion.prompt_tokens_computed
        if completion.error or not completion.hit_eos:
            reason = completion.error or "max_new_tokens"
            return self._fail(reason, f"generation stopped without EOS at depth {frame.depth}")
        if not self.recursive:
            result.final_text = completion.text
            return []
        try:
            called = protocol.find_call(completion.text)
        except ProtocolError as error:
            return self._fail(error.reason, str(error))
        if called is None:
            self.stack.pop()
            if not self.stack:
                result.final_text = completion.text
                return [frame.key]
            parent = self.stack[-1]
            parent.context = protocol.append_return(parent.context, parent.completion,
                                                    protocol.read_answer(completion.text))
            parent.parent_key, parent.key = parent.key, next(self.keys)
            return [frame.key]
        result.calls += 1
        if result.calls > result.limits.max_calls:
            return self._fail("max_calls", f"more than {result.limits.max_calls} calls")
        if frame.depth + 1 > result.limits.max_depth:
            return self._fail("max_depth", f"recursion deeper than {result.limits.max_depth}")
        frame.completion = completion.text
        self.stack.append(_Frame(protocol.pose(called), frame.depth + 1, next(self.keys)))
        return []

    def _fail(self, reason: str, message: str) -> list[int]:
        self.result.failure, self.result.failure_message = reason, message
        keys = [frame.key for frame in self.stack]
        self.stack = []
        return keys


def _new_results(task, method: str, problems: Sequence[Any], limits_for) -> list[ProblemResult]:
    return [ProblemResult(index, problem, task.length(problem), task.solution(problem),
                          limits_for(problem)) for index, problem in enumerate(problems)]


def run_engine(backend: Backend, task, method: str, problems: Sequence[Any],
               limits_for: Callable[[Any], Limits], progress: bool = True) -> list[ProblemResult]:
    """Solve ``problems`` together, one round of generations at a time (see module docstring)."""
    results = _new_results(task, method, problems, limits_for)
    recursive = method == "retuning"
    keys = itertools.count()
    solves = [_Solve(result, task.prompt(result.problem, method), recursive, keys)
              for result in results]
    start = time.perf_counter()
    bar = tqdm(total=len(solves), desc=f"{task.name} {method}", unit="problem", disable=not progress)
    pending = solves
    while pending:
        completions = backend.generate([solve.request() for solve in pending])
        still = []
        for solve, completion in zip(pending, completions):
            backend.release(solve.advance(completion))
            if solve.result.done:
                solve.result.finished_at_s = time.perf_counter() - start
                if solve.result.failure is None:
                    _score(solve.result, task, method)
                bar.update(1)
            else:
                still.append(solve)
        pending = still
    bar.close()
    return results


# --- the reference: one problem at a time ---------------------------------------------------
def solve_sequentially(backend: Backend, task, method: str, problems: Sequence[Any],
                       limits_for: Callable[[Any], Limits], progress: bool = True) -> list[ProblemResult]:
    """The plain recursion, one problem and one context at a time, through ``protocol.solve``
    (the original code's way). Same results as ``run_engine`` for a deterministic model."""
    results = _new_results(task, method, problems, limits_for)
    start = time.perf_counter()
    for result in tqdm(results, desc=f"{task.name} {method} (sequential)", disable=not progress):
        depth = [0]  # protocol.solve goes one deeper after a call, one up after an answer

        def generate(context: str) -> str:
            (completion,) = backend.generate([Request(context, result.limits.max_new_tokens)])
            result.trace.append(Step(depth[0], context, completion.text))
            result.generated_tokens += completion.n_generated
            result.prompt_tokens += completion.prompt_tokens
            result.prompt_tokens_computed += completion.prompt_tokens_computed
            if completion.error or not completion.hit_eos:
                raise ProtocolError(completion.error or "max_new_tokens",
                                    f"generation stopped without EOS at depth {depth[0]}")
            depth[0] += 1 if method == "retuning" and _calls(completion.text) else -1
            return completion.text

        try:
            if method == "retuning":
                trace = protocol.solve(task.question(result.problem), generate,
                                       result.limits.max_depth, result.limits.max_calls)
                result.calls = trace.calls
            else:
                generate(task.prompt(result.problem, method))
            result.final_text = result.trace[-1].completion
        except ProtocolError as error:
            result.failure, result.failure_message = error.reason, str(error)
            if method == "retuning":
                result.calls = sum(1 for step in result.trace if _calls(step.completion))
        if result.failure is None:
            _score(result, task, method)
        result.finished_at_s = time.perf_counter() - start
    return results


def _calls(completion: str) -> bool:
    try:
        return protocol.find_call(completion) is not None
    except ProtocolError:
        return False


# --- evaluation: sample, run, summarise -----------------------------------------------------
SAMPLING = "one stream per length, random.Random(f'{seed}/{length}')"  # recorded in results.json


def sample_problems(task, lengths: Sequence[int], samples: int, seed: int) -> list[Any]:
    """``samples`` problems of each length, each length drawn from its own stream (``SAMPLING``):
    the problems of a length are the same whatever other lengths are asked, and fewer samples
    are the first of more (SPEC's 20 Re-Tuning problems per length are the first 20 of the
    baseline's 100), so methods evaluated with different settings share their problems."""
    problems = []
    for n in lengths:
        rng = random.Random(f"{seed}/{n}")
        problems += [task.sample(rng, n) for _ in range(samples)]
    return problems


def evaluate(backend: Backend, task, method: str, lengths: Sequence[int], samples: int, seed: int = 0,
             rules: LimitRules | None = None, progress: bool = True, sequential: bool = False,
             info: dict | None = None) -> dict:
    """Sample problems, solve them with ``backend`` and return the results dict written to
    ``results.json`` (see ``summarize``). The Python entry point of every evaluation script."""
    rules = rules or LimitRules()
    problems = sample_problems(task, lengths, samples, seed)
    limits_for = lambda problem: rules.for_problem(task, method, problem, backend)  # noqa: E731
    start = time.perf_counter()
    runner = solve_sequentially if sequential else run_engine
    results = runner(backend, task, method, problems, limits_for, progress=progress)
    wall = time.perf_counter() - start
    if method == "retuning":
        for result in results:
            if not result.correct:
                result.first_wrong_step = first_wrong_step(result, task)
    settings = dict(lengths=list(lengths), samples=samples, seed=seed, sampling=SAMPLING, limits=vars(rules),
                    engine="sequential" if sequential else "batched")
    return summarize(results, task.name, method, wall, {**settings, **(info or {})})


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def summarize(results: Sequence[ProblemResult], task_name: str, method: str, wall_time_s: float,
              settings: dict) -> dict:
    """The results.json content: settings, overall and per-length figures, every problem.

    All lengths run together in one engine run, so a length's ``wall_time_s`` is the time from the
    start until its last problem finished."""
    by_length: dict[int, list[ProblemResult]] = {}
    for result in results:
        by_length.setdefault(result.length, []).append(result)

    def figures(group: Sequence[ProblemResult]) -> dict:
        failures = Counter(r.failure for r in group if r.failure)
        first_wrong = Counter(r.first_wrong_step["kind"] for r in group if r.first_wrong_step)
        correct = sum(result.correct for result in group)
        return dict(problems=len(group), correct=correct, accuracy=correct / len(group),
                    failures=dict(sorted(failures.items())),
                    first_wrong_steps=dict(sorted(first_wrong.items())),
                    mean_calls=sum(r.calls for r in group) / len(group),
                    mean_generated_tokens=sum(r.generated_tokens for r in group) / len(group),
                    wall_time_s=round(max(r.finished_at_s for r in group), 4))

    prompt_tokens = sum(r.prompt_tokens for r in results)
    computed = sum(r.prompt_tokens_computed for r in results)
    overall = figures(results) if results else {}
    overall.update(wall_time_s=round(wall_time_s, 4),
                   problems_per_s=len(results) / wall_time_s if wall_time_s > 0 else None,
                   prompt_tokens=prompt_tokens, prompt_tokens_computed=computed,
                   prompt_tokens_recomputed_share=computed / prompt_tokens if prompt_tokens else None)
    return {
        "task": task_name,
        "method": method,
        "settings": _jsonable(settings),
        "summary": overall,
        "lengths": {str(n): figures(group) for n, group in sorted(by_length.items())},
        "problems": [{
            "index": r.index, "length": r.length, "problem": _jsonable(r.problem),
            "expected": _jsonable(r.expected), "predicted": _jsonable(r.predicted),
            "final_text": r.final_text, "correct": r.correct, "failure": r.failure,
            "failure_message": r.failure_message, "calls": r.calls,
            "generated_tokens": r.generated_tokens, "limits": vars(r.limits),
            "first_wrong_step": r.first_wrong_step,
            "trace": [{"depth": s.depth, "context": s.context, "completion": s.completion}
                      for s in r.trace],
        } for r in results],
    }


def format_trace(problem: dict, width: int = 100) -> str:
    """A problem of results.json as a readable call tree, one line per generation, indented by
    depth; a continuation shows only what was appended to its context::

        #3 addition, length 2: expected 80, predicted 80 (correct)
        [0] 37 + 43\\nSolution:  =>  Call: 7 + 3\\n
          [1] 7 + 3\\nSolution:  =>  Carry 1, Output 0
        [0] ...Return: Carry 1, Output 0\\nAnswer:  =>  Carry 0, Output 80
    """
    status = "correct" if problem["correct"] else (f"failed: {problem['failure']}" if problem["failure"]
                                                   else "wrong")
    lines = [f"#{problem['index']} length {problem['length']}: expected {problem['expected']}, "
             f"predicted {problem['predicted']} ({status})"]
    if problem.get("failure_message"):
        lines.append(f"   {problem['failure_message']}")
    for step in problem["trace"]:
        context, depth = step["context"], step["depth"]
        at = context.rfind(protocol.RETURN_TAG)
        shown = context if at < 0 else "..." + context[at:]
        left = shown.encode("unicode_escape").decode()
        right = step["completion"].encode("unicode_escape").decode()
        line = f"{'  ' * depth}[{depth}] {left}  =>  {right}"
        lines.append(line if len(line) <= width or width <= 0 else line[:width - 3] + "...")
    return "\n".join(lines)
