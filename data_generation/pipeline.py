"""One task, one method, one preset -> ``<task>_<method>_<preset>_{train,test,meta}.json``.

The pipeline every task shares (a task only supplies the ``tasks.base.Task`` methods):

1. training problems: ``task.training_problems(method, preset, rng, lengths)``, the SPEC's
   sampling with its per-problem repeats and operand swaps;
2. records: ``task.records(problem, method)`` for each; for Re-Tuning the records are
   de-duplicated by input (first occurrence kept, unless ``task.deduplicates(preset)`` says no)
   and each distinct input is kept ``task.retuning_copies(input, preset, rng)`` times, asked in
   first-seen order. A task may offer ``fast_retuning`` to do exactly this in bulk;
3. held-out problems: ``task.sample(rng, n)`` for each training length n, skipping any problem
   whose prompt was a training input (for Re-Tuning: posed at any depth of a training solve)
   as long as the problem space allows (all 81 one-digit additions are in the paper set, for
   one: such lengths are filled up with training problems, counted in the meta file); where
   untrained problems are rare, the search goes on in a stream of the length's own;
4. the meta file: seed, lengths, counts, character and token statistics.

Besides the records, the pipeline asks the task ``deduplicates(preset)``, ``shared_draw(preset)``
and ``record_length(record_input)`` (Re-Tuning records are counted under the length of the
sub-problem they pose), and uses ``fast_retuning(preset, rng, record_piece)``, a bulk renderer,
where a task has one (see tasks.addition.BulkRetuning).

Files are JSON lists of ``{"input", "output"}`` records, the format of the paper's notebooks
(``json.load`` reads theirs and ours alike), laid out one record a line so that they stream and
diff well::

    [
    {"input": "9 + 9\\nSolution: ", "output": "Carry 1, Output 8"},
    {"input": "3 + 4\\nSolution: ", "output": "Carry 0, Output 7"}
    ]

Each file is written to a temporary file beside it and renamed into place once complete (the meta
file last), so an interrupted run leaves the previous files or none, never half of one.

Random streams: ``random.Random("<task>|<preset>|<seed>|<stream>")`` (string seeds hash with
SHA-512, the same on every machine and Python run). The training problems and the held-out
problems do not depend on the method, so the methods of a task share one draw wherever the task's
sampling is the same for them; the Re-Tuning re-weighting has its own stream.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import secrets
from collections import Counter
from json.encoder import encode_basestring_ascii
from typing import Any, Iterable, Iterator

from tqdm import tqdm

from tasks.base import Task

# Bump when a training file's records change: reproduce.py then makes its data anew, and refuses
# to resume a run trained on the old. (Test files, which serve only the held-out loss, changed
# without a bump where rare untrained problems came to be searched for: paper presets only.)
GENERATOR_VERSION = 1
TOKENIZER = ("character-level: one token per character of input and of output, plus one EOS "
             "token ending each output; tokens.max_input counts the input, tokens.max_output the "
             "output with its EOS, tokens.output_total the tokens the loss is taken on")
TEST_ATTEMPTS_PER_PROBLEM = 50  # draws per wanted held-out problem before searching on; as many
                               # in a row with nothing unseen, and a length counts as used up


def stream(task: Task, preset: str, seed: int, name: str) -> random.Random:
    """The random stream ``name`` of one dataset: ``stream(addition, "paper", 0, "train")``."""
    return random.Random(f"{task.name}|{preset}|{seed}|{name}")


def record_piece(input_text: str, output_text: str) -> str:
    """One record as it appears in a file, after the separator of the previous one::

        record_piece("9 + 9\\nSolution: ", "Carry 1, Output 8")
        == ',\\n{"input": "9 + 9\\\\nSolution: ", "output": "Carry 1, Output 8"}'
    """
    return (',\n{"input": ' + encode_basestring_ascii(input_text) + ', "output": '
            + encode_basestring_ascii(output_text) + "}")


# --- files -----------------------------------------------------------------------------------
class AtomicFile:
    """A text file written under a temporary name in its folder and renamed into place by
    ``commit``; ``discard`` removes the temporary file. Writes are buffered in large blocks."""

    def __init__(self, path: str):
        self.path = path
        folder, name = os.path.split(os.path.abspath(path))
        # Opened with "x" (not mkstemp) so that the file gets the usual permissions.
        self.temporary = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self.handle = open(self.temporary, "x", encoding="utf-8", newline="\n", buffering=1 << 20)

    def write(self, text: str) -> None:
        self.handle.write(text)

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.temporary, self.path)

    def discard(self) -> None:
        self.handle.close()
        if os.path.exists(self.temporary):
            os.unlink(self.temporary)


class RecordListFile(AtomicFile):
    """A JSON list of records, fed with ``record_piece`` texts (each begins with ``",\\n"``)."""

    def __init__(self, path: str):
        super().__init__(path)
        self.empty = True

    def write(self, pieces: str) -> None:
        if pieces and self.empty:
            self.empty = False
            super().write("[" + pieces[1:])  # the first record has no separator before it
        elif pieces:
            super().write(pieces)

    def commit(self) -> None:
        super().write("[\n]\n" if self.empty else "\n]\n")
        super().commit()


# --- statistics ------------------------------------------------------------------------------
class Tally:
    """Records per length and character/token statistics, from ``(length, input chars,
    output chars, copies)`` tuples."""

    def __init__(self):
        self.sizes: Counter[tuple[int, int, int]] = Counter()

    def add(self, length: int, input_chars: int, output_chars: int, copies: int = 1) -> None:
        self.sizes[length, input_chars, output_chars] += copies

    def records(self) -> int:
        return sum(self.sizes.values())

    def per_length(self) -> dict[str, int]:
        counts: Counter[int] = Counter()
        for (length, _, _), copies in self.sizes.items():
            counts[length] += copies
        return {str(length): counts[length] for length in sorted(counts)}

    def summary(self) -> dict[str, dict[str, Any]]:
        n = self.records()
        sizes = [(i, o, c) for (_, i, o), c in self.sizes.items()]
        chars = sum((i + o) * c for i, o, c in sizes)
        outputs = sum((o + 1) * c for i, o, c in sizes)
        return {
            "chars": {"total": chars, "mean": round(chars / n, 3) if n else 0,
                      "max": max((i + o for i, o, _ in sizes), default=0)},
            "tokens": {"total": chars + n, "mean": round((chars + n) / n, 3) if n else 0,
                       "max": max((i + o + 1 for i, o, _ in sizes), default=0),
                       "max_input": max((i for i, _, _ in sizes), default=0),
                       "max_output": max((o + 1 for _, o, _ in sizes), default=0),
                       "output_total": outputs},
        }


# --- records ---------------------------------------------------------------------------------
class GenericRecords:
    """Records of each problem through ``task.records``; for Re-Tuning de-duplicated and
    re-weighted as the module docstring says. ``pieces(problem)`` is the text to append."""

    def __init__(self, task: Task, method: str, preset: str, rng: random.Random, deduplicate: bool):
        self.task, self.method, self.preset, self.rng = task, method, preset, rng
        self.deduplicate = deduplicate and method == "retuning"
        self.inputs: set[str] = set()  # every training input: the de-duplication and the held-out check
        self.sizes: Counter[tuple[int, int, int]] = Counter()

    def length_of(self, problem: Any, record_input: str) -> int:
        if self.method == "retuning":
            return self.task.record_length(record_input)
        return self.task.length(problem)

    def pieces(self, problem: Any) -> str:
        out = []
        for record_input, output in self.task.records(problem, self.method):
            copies = 1
            if self.deduplicate:
                if record_input in self.inputs:
                    continue
                copies = self.task.retuning_copies(record_input, self.preset, self.rng)
            self.inputs.add(record_input)
            if copies:
                out.append(record_piece(record_input, output) * copies)
                self.sizes[self.length_of(problem, record_input), len(record_input), len(output)] += copies
        return "".join(out)

    def trained(self, problem: Any) -> bool:
        return self.task.prompt(problem, self.method) in self.inputs

    def tally(self) -> Iterator[tuple[int, int, int, int]]:
        for (length, input_chars, output_chars), copies in self.sizes.items():
            yield length, input_chars, output_chars, copies


def deduplicates(task: Task, method: str, preset: str) -> bool:
    """Re-Tuning records are de-duplicated unless the task says otherwise for the preset."""
    return method == "retuning" and task.deduplicates(preset)


def training_source(task: Task, method: str, preset: str, seed: int):
    """The fast bulk renderer where the task has one and it applies, else ``GenericRecords``."""
    rng = stream(task, preset, seed, f"{method}-weights")
    deduplicate = deduplicates(task, method, preset)
    if deduplicate and hasattr(task, "fast_retuning"):
        return task.fast_retuning(preset, rng, record_piece)
    return GenericRecords(task, method, preset, rng, deduplicate)


def held_out_problems(task: Task, preset: str, seed: int, lengths: Iterable[int], per_length: int,
                      trained) -> tuple[list[Any], Counter]:
    """``per_length`` distinct problems of each length from ``task.sample``, none ``trained``
    where the problem space allows. A length whose untrained problems are too rare to be found in
    ``TEST_ATTEMPTS_PER_PROBLEM`` draws per wanted problem (1,089 of the 65,536 16-bit lists and
    11 of the 32,768 15-bit ones for the paper's parity Re-Tuning set) searches on in a stream of
    its own until that many draws in a row bring no problem it has not seen; one still short
    (all 81 one-digit additions are trained) is filled up with trained problems, which the
    second value counts per length."""
    rng = stream(task, preset, seed, "test")
    problems, in_training = [], Counter()
    for n in lengths:
        new: dict[str, Any] = {}
        old: dict[str, Any] = {}

        def draw(source: random.Random) -> bool:
            """One draw into ``new`` or ``old``; whether it was a problem not seen before."""
            problem = task.sample(source, n)
            key = task.question(problem)
            if key in new or key in old:
                return False
            (old if trained(problem) else new)[key] = problem
            return True

        patience = TEST_ATTEMPTS_PER_PROBLEM * per_length
        for _ in range(patience):
            if len(new) == per_length:
                break
            draw(rng)
        # The search on draws from a stream of this length's own, so that the other lengths'
        # problems stay those of the shared stream.
        more, stale = stream(task, preset, seed, f"test-{n}"), 0
        while len(new) < per_length and stale < patience:
            stale = 0 if draw(more) else stale + 1
        reused = list(old.values())[:per_length - len(new)]
        problems.extend([*new.values(), *reused])
        in_training[n] = len(reused)
    return problems, in_training


# --- size limits -----------------------------------------------------------------------------
def lengths_note(lengths: list[int] | None) -> str:
    return f" of lengths {lengths[0]}-{lengths[-1]}" if lengths else ""


def draw_training_problems(task: Task, method: str, preset: str, seed: int,
                           lengths: list[int] | None, max_problems: int | None) -> list:
    """The preset's training problems, stopped one past ``max_problems``: the paper's DP preset
    lists every list of each length, 11**n of them, which for ``--lengths 2-12`` would never end."""
    drawn = task.training_problems(method, preset, stream(task, preset, seed, "train"), lengths)
    problems = list(itertools.islice(drawn, None if max_problems is None else max_problems + 1))
    if not problems:
        raise ValueError(f"{task.name} {preset}: no training problems for lengths {lengths}")
    if max_problems is not None and len(problems) > max_problems:
        raise ValueError(f"more than {max_problems:,} training problems{lengths_note(lengths)}; "
                         "draw fewer lengths or raise --max-problems")
    return problems


def estimated_train_bytes(task: Task, method: str, problems: list, samples: int = 50) -> float:
    """About how large the training file grows: the records of ``samples`` problems spread evenly
    over the draw, scaled to all of them (more than the file where Re-Tuning drops repeats)."""
    picked = problems[::max(1, len(problems) // samples)]
    size = sum(len(record_piece(record_input, output)) for problem in picked
               for record_input, output in task.records(problem, method))
    return size * len(problems) / len(picked)


# --- one dataset -----------------------------------------------------------------------------
def file_names(task: Task, method: str, preset: str) -> dict[str, str]:
    stem = f"{task.name}_{method}_{preset}"
    return {split: f"{stem}_{split}.json" for split in ("train", "test", "meta")}


def problems_within_limits(task: Task, method: str, preset: str, seed: int, lengths: list[int] | None,
                           max_problems: int | None = None, max_bytes: float | None = None) -> list:
    """The training problems of one dataset; ValueError (from the task) for settings it cannot
    sample, and for a set over ``max_problems`` problems or an estimated ``max_bytes`` of file."""
    problems = draw_training_problems(task, method, preset, seed, lengths, max_problems)
    if max_bytes is not None and (size := estimated_train_bytes(task, method, problems)) > max_bytes:
        raise ValueError(f"the training file would grow to about {size / 1e9:,.3g} GB "
                         f"({len(problems):,} problems{lengths_note(lengths)}), over the limit of "
                         f"{max_bytes / 1e9:,.3g} GB; draw shorter lengths or raise --max-gb")
    return problems


def generate(task: Task, method: str, preset: str, seed: int, out_dir: str,
             lengths: list[int] | None = None, test_per_length: int = 100,
             progress: bool = True, max_problems: int | None = None,
             max_bytes: float | None = None, problems: list | None = None) -> dict[str, Any]:
    """Write the three files of one dataset and return its meta. ``problems``: those
    ``problems_within_limits`` drew for these settings, else it draws them here, raising its
    ValueErrors before any file is opened."""
    if problems is None:
        problems = problems_within_limits(task, method, preset, seed, lengths, max_problems, max_bytes)
    names = file_names(task, method, preset)
    paths = {split: os.path.join(out_dir, name) for split, name in names.items()}
    files: list[AtomicFile] = []
    try:
        train = RecordListFile(paths["train"])
        files.append(train)
        source = training_source(task, method, preset, seed)
        bar = tqdm(problems, desc=f"{task.name} {method} {preset}", unit=" problems",
                   mininterval=0.5, disable=None if progress else True)
        for problem in bar:
            train.write(source.pieces(problem))
        tally = Tally()
        for entry in source.tally():
            tally.add(*entry)

        # Lengths trained on: of the problems drawn and, for Re-Tuning, of every sub-problem posed.
        train_lengths = sorted({task.length(problem) for problem in problems}
                               | {int(length) for length in tally.per_length()})
        test_problems, test_in_training = held_out_problems(
            task, preset, seed, train_lengths, test_per_length, source.trained)
        test = RecordListFile(paths["test"])
        files.append(test)
        test_tally = Tally()
        for problem in test_problems:
            for record_input, output in task.records(problem, method):
                test.write(record_piece(record_input, output))
                test_tally.add(task.length(problem), len(record_input), len(output))

        per_length = Counter(task.length(problem) for problem in test_problems)
        meta = {
            "task": task.name, "method": method, "preset": preset, "seed": seed,
            "train_lengths": train_lengths,
            "requested_lengths": sorted(set(lengths)) if lengths else None,
            "n_train": tally.records(), "n_test": test_tally.records(),
            "n_train_problems": len(problems), "n_test_problems": len(test_problems),
            "records_per_length": tally.per_length(),
            **tally.summary(),
            "tokenizer": TOKENIZER,
            "shared_draw": task.shared_draw(preset),
            "deduplicated": deduplicates(task, method, preset),
            "test_problems_per_length": {str(n): per_length[n] for n in train_lengths},
            "test_in_training_per_length": {str(n): test_in_training[n] for n in train_lengths},
            "test_records_per_length": test_tally.per_length(),
            "test": test_tally.summary(),
            "test_note": ("held-out problems come from task.sample at each training length and "
                          "are not training problems (for Re-Tuning: not posed at any depth of a "
                          "training solve) wherever the problem space allows; where nearly all "
                          "problems of a length are in training, the set is filled up with "
                          "training problems, counted in test_in_training_per_length"),
            "files": {"train": names["train"], "test": names["test"]},
            "generator_version": GENERATOR_VERSION,
        }
        meta_file = AtomicFile(paths["meta"])
        files.append(meta_file)
        meta_file.write(json.dumps(meta, indent=2) + "\n")
        for file in files:  # the meta file last: its presence means the other two are complete
            file.commit()
        files.clear()
        return meta
    finally:
        for file in files:
            file.discard()
