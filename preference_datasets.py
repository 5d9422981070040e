"""Training data: reading {"input", "output"} files, tokenizing them the paper's way, batching.

The name is the original code's; here there are no preferences, only supervised records.

* ``read_records(path)`` reads a ``.json`` list or a ``.jsonl`` file and validates every record.
* ``with_noisy_call_lines`` gives a share of the combine records call lines of random digits,
  ``with_distractor_lines`` a share of the call records a line of random digits above the
  problem (training-only levers; the held-out records are never changed).
* ``tokenize_records`` tokenizes prompt and output separately (no BOS) and appends EOS:
  ``("07 + 58\\nAnswer: ", "65")`` with the char tokenizer -> 16 prompt ids, then ids of
  ``"6"``, ``"5"``, ``"</s>"``; labels are -100 on the 16 prompt ids (and on padding).
* ``batch_plan`` orders one epoch into global batches, grouped by length so that padding is a
  small share of the tokens computed; ``microbatches`` splits a global batch across processes and
  gradient-accumulation steps; ``collate`` pads a microbatch into tensors, or
  ``collate_packed`` packs several records into each row with attention kept inside each record.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from tasks.protocol import CALL_TAG, RETURN_TAG

IGNORE_INDEX = -100
TRAIN_SUFFIX = "_train"


class DatasetError(ValueError):
    """A data file that cannot be trained on; the message names the file and the record."""


# --- files ---------------------------------------------------------------------------------

def read_records(path: str) -> list[tuple[str, str]]:
    """The (input, output) pairs of a ``.json`` list or a ``.jsonl`` file, validated.

    ``[{"input": "9 + 9\\nSolution: ", "output": "Carry 1, Output 8"}]``
    -> ``[("9 + 9\\nSolution: ", "Carry 1, Output 8")]``.
    Raises DatasetError naming the file (and record index) for a file that is missing, not JSON,
    not a list of objects, empty, or has a record without a string ``input`` / ``output``.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror or error})") from None
    if path.endswith(".jsonl"):
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}: line {line_number} is not JSON ({error.msg})") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: not JSON ({error.msg} at line {error.lineno} "
                               f"column {error.colno})") from None
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    if not rows:
        raise DatasetError(f"{path}: no records")
    records = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DatasetError(f"{path}: record {index} is {type(row).__name__}, not an object")
        for key in ("input", "output"):
            if key not in row:
                raise DatasetError(f"{path}: record {index} has no {key!r} key")
            if not isinstance(row[key], str):
                raise DatasetError(f"{path}: record {index} {key!r} is "
                                   f"{type(row[key]).__name__}, not a string")
        records.append((row["input"], row["output"]))
    return records


def sibling_path(path: str, kind: str) -> str:
    """The file of another split beside a training file, same extension:
    ``sibling_path("data/addition_retuning_small_train.json", "test")``
    -> ``"data/addition_retuning_small_test.json"``; the meta file is always ``.json``."""
    stem, extension = os.path.splitext(path)
    if stem.endswith(TRAIN_SUFFIX):
        stem = stem[: -len(TRAIN_SUFFIX)]
    return f"{stem}_{kind}{'.json' if kind == 'meta' else extension}"


def dataset_meta(paths: list[str]) -> list[dict]:
    """One entry per dataset, ``{"path": <as given>, **<its _meta.json>}`` (just the path when
    there is no meta file). This becomes ``<run_dir>/data_meta.json``; evaluation reads it."""
    entries = []
    for path in paths:
        entry = {"path": path}
        meta_path = sibling_path(path, "meta")
        if os.path.isfile(meta_path):
            try:
                with open(meta_path, encoding="utf-8") as handle:
                    meta = json.load(handle)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{meta_path}: not JSON ({error.msg})") from None
            if not isinstance(meta, dict):
                raise DatasetError(f"{meta_path}: expected a JSON object")
            entry.update({key: value for key, value in meta.items() if key != "path"})
        entries.append(entry)
    return entries


def load_splits(paths: list[str], n_eval_examples: int, seed: int):
    """Training and held-out records of several datasets, mixed.

    Each dataset's held-out records are its ``_test`` file when present, else a deterministic
    (seeded) slice of ``n_eval_examples`` records (at most a tenth) taken out of its training records. The mixed
    held-out set is cut to ``n_eval_examples`` by a seeded choice. Returns (train, eval) lists.
    """
    if not paths:
        raise DatasetError("no datasets given: pass datasets=[data/<name>_train.json]")
    train, held_out = [], []
    for number, path in enumerate(paths):
        records = read_records(path)
        test_path = sibling_path(path, "test")
        if test_path != path and os.path.isfile(test_path):
            held_out += read_records(test_path)
        elif n_eval_examples > 0:
            n_held = min(n_eval_examples, len(records) // 10)  # never more than a tenth of the data
            order = np.random.default_rng([seed, number, 1]).permutation(len(records))
            held_out += [records[i] for i in order[:n_held]]
            records = [records[i] for i in sorted(order[n_held:])]
        train += records
    if len(held_out) > n_eval_examples:
        keep = np.random.default_rng([seed, 2]).choice(len(held_out), n_eval_examples, replace=False)
        held_out = [held_out[i] for i in sorted(keep)]
    return train, held_out


def _check_noise(option: str, share: float, max_digits: int) -> None:
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{option}.share must be in [0, 1], got {share}")
    if share and max_digits < 1:
        raise ValueError(f"{option}.max_digits must be at least 1, got {max_digits}")


def _digit_run(rng: np.random.Generator, n: int) -> str:
    """n random digits, e.g. ``"4751093826617"``."""
    return "".join(map(str, rng.integers(0, 10, n)))


def with_noisy_call_lines(records: list[tuple[str, str]], share: float, max_digits: int,
                          seed: int) -> list[tuple[str, str]]:
    """Training records where, in a seeded ``share`` of the combine steps (inputs where a
    ``Return:`` line answers a call), every digit run of each answered call's sub-question is
    replaced by random digits, n of them for each run, n drawn in 1..``max_digits`` per record. A
    combine reads the problem and the returned answer, never its call, so its output stays right;
    the model sees call lines longer than any trained problem makes (docs/tiny_model.md, *call
    lines that lie*). For example
    ``"03 + 10\\nSolution: Call: 3 + 0\\nReturn: Carry 0, Output 3\\nAnswer: "`` may become
    ``"03 + 10\\nSolution: Call: 876475938 + 242194892\\nReturn: Carry 0, Output 3\\nAnswer: "``.
    Other records, the text of a call line before its ``Call: ``, and every output are kept.
    """
    _check_noise("call_line_noise", share, max_digits)
    # A call is CALL_TAG + sub-question + "\n" (tasks.protocol.call_line), answered by the Return after it.
    answered_call = re.compile(re.escape(CALL_TAG) + r"[^\n]*(?=\n" + re.escape(RETURN_TAG) + ")")
    rng = np.random.default_rng([seed, 3])
    noisy = []
    for prompt, output in records:
        if not answered_call.search(prompt) or rng.random() >= share:
            noisy.append((prompt, output))
            continue
        n = int(rng.integers(1, max_digits + 1))
        random_run = lambda _: _digit_run(rng, n)  # noqa: E731
        noisy.append((answered_call.sub(lambda call: re.sub(r"[0-9]+", random_run, call[0]), prompt), output))
    return noisy


def with_distractor_lines(records: list[tuple[str, str]], share: float, max_digits: int,
                          seed: int) -> list[tuple[str, str]]:
    """Training records where, in a seeded ``share`` of the call steps (outputs holding a
    ``Call: ``), a line of n random digits, n drawn in 1..``max_digits`` per record, is put above
    the problem: ``"73 + 21\\nSolution: "`` may become ``"4751093826617\\n73 + 21\\nSolution: "``,
    its output ``"Call: 3 + 1\\n"`` kept. A call reads only the line above its own; the model then
    meets runs of digits longer than any trained problem's in its context while it writes the
    call's words, as it does under a long problem (docs/tiny_model.md, *A line of digits above*).
    Other records and every output are kept.
    """
    _check_noise("distractor_line", share, max_digits)
    rng = np.random.default_rng([seed, 7])
    distracted = []
    for prompt, output in records:
        if CALL_TAG in output and rng.random() < share:
            prompt = _digit_run(rng, int(rng.integers(1, max_digits + 1))) + "\n" + prompt
        distracted.append((prompt, output))
    return distracted


# --- tokens --------------------------------------------------------------------------------

@dataclass
class TokenizedRecords:
    """All records' token ids in one flat array: record i is ``tokens[starts[i]:starts[i] + lengths[i]]``,
    its first ``prompt_lengths[i]`` ids the prompt, the rest the output and EOS."""

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    n_truncated: int = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def label_counts(self) -> np.ndarray:
        """Tokens in the loss per record: every output token and EOS that has a token before it."""
        return self.lengths - np.maximum(self.prompt_lengths, 1)


def tokenize_records(records: list[tuple[str, str]], tokenizer, max_length: int,
                     max_prompt_length: int) -> TokenizedRecords:
    """Tokenize prompt and output separately, no special tokens, then append EOS to the output.

    A prompt longer than ``max_prompt_length`` keeps its end (the part next to the output); then
    an output that would pass ``max_length`` is cut. Such records are counted in ``n_truncated``.
    """
    if not records:
        empty = np.zeros(0, dtype=np.int64)
        return TokenizedRecords(empty, empty, empty, empty)
    prompts = tokenizer([r[0] for r in records], add_special_tokens=False)["input_ids"]
    outputs = tokenizer([r[1] for r in records], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    pieces, prompt_lengths, n_truncated = [], [], 0
    for prompt, output in zip(prompts, outputs):
        output = output + [eos]
        if len(prompt) > max_prompt_length or len(prompt) + len(output) > max_length:
            n_truncated += 1
            prompt = prompt[-max_prompt_length:] if max_prompt_length > 0 else []
            output = output[: max(1, max_length - len(prompt))]
        pieces.append(prompt + output)
        prompt_lengths.append(len(prompt))
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    starts = np.zeros(len(pieces), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    tokens = np.fromiter((t for piece in pieces for t in piece), dtype=np.int64, count=int(lengths.sum()))
    return TokenizedRecords(tokens, starts, lengths, np.array(prompt_lengths, dtype=np.int64), n_truncated)


def collate(data: TokenizedRecords, indices, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (-100 on prompt and padding) for some records.

    For ids ``[p0 p1 o0 EOS]`` with a 2-token prompt, padded to 6:
    input_ids ``[p0 p1 o0 EOS pad pad]``, labels ``[-100 -100 o0 EOS -100 -100]``.
    """
    indices = np.asarray(indices)
    lengths = data.lengths[indices]
    width = int(lengths.max())
    positions = np.arange(width)
    inside = positions[None, :] < lengths[:, None]
    gather = np.where(inside, data.starts[indices][:, None] + positions[None, :], 0)
    input_ids = np.where(inside, data.tokens[gather], pad_id)
    in_loss = inside & (positions[None, :] >= data.prompt_lengths[indices][:, None])
    labels = np.where(in_loss, input_ids, IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


def pack_rows(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """First-fit decreasing: positions into ``lengths`` grouped into rows of at most ``capacity``
    tokens. Lengths ``[5, 2, 3, 4]``, capacity 5 -> ``[[0], [3], [2, 1]]``."""
    rows, room = [], []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        fits = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fits is None:
            rows.append([])
            room.append(capacity)
            fits = len(rows) - 1
        rows[fits].append(int(i))
        room[fits] -= int(lengths[i])
    return rows


def collate_packed(data: TokenizedRecords, indices, pad_id: int, position_ids=None) -> dict[str, torch.Tensor]:
    """The records of ``collate`` packed several to a row (``pack_rows``, rows as wide as the
    longest record), each keeping its own position ids and seeing only itself.

    Records ``[a0 a1 a2]`` (prompt ``a0``) and ``[b0 b1]`` (prompt ``b0``) in one row of 5:
    input_ids ``[a0 a1 a2 b0 b1]``, labels ``[-100 a1 a2 -100 b1]``, position_ids
    ``[0 1 2 0 1]`` (or ``position_ids(padded records)``, e.g. line positions), and ``allowed``,
    a ``[rows, 5, 5]`` bool: query i may attend to key j when both are in the same record and
    j <= i (padding only to padding and itself, so no row of the mask is empty). Losses summed over
    these labels equal those of the padded batch.
    """
    padded = collate(data, indices, pad_id)
    width = padded["input_ids"].shape[1]
    positions = (position_ids(padded["input_ids"]) if position_ids is not None
                 else torch.arange(width).expand_as(padded["input_ids"]))
    lengths = data.lengths[np.asarray(indices)]
    rows = pack_rows(lengths, width)
    row_of, column_of = np.zeros(len(lengths), dtype=np.int64), np.zeros(len(lengths), dtype=np.int64)
    for r, members in enumerate(rows):
        row_of[members] = r
        column_of[members] = np.concatenate([[0], np.cumsum(lengths[members])[:-1]])
    inside = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])
    target_rows = torch.from_numpy(row_of[:, None].repeat(width, axis=1))[inside]
    target_columns = torch.from_numpy(column_of[:, None] + np.arange(width)[None, :])[inside]
    padded["labels"][:, 0] = IGNORE_INDEX  # a record's first token must not be learnt from the one before it
    segment = torch.arange(len(lengths)).unsqueeze(1).expand_as(inside)
    out = {}
    for name, source, fill in [("input_ids", padded["input_ids"], pad_id), ("labels", padded["labels"], IGNORE_INDEX),
                               ("position_ids", positions, 0), ("segment", segment, -1)]:
        out[name] = torch.full((len(rows), width), fill, dtype=torch.long)
        out[name][target_rows, target_columns] = source[inside].long()
    same_record = out["segment"][:, :, None] == out.pop("segment")[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    out["allowed"] = (same_record & causal) | torch.eye(width, dtype=torch.bool)
    return out


# --- batches -------------------------------------------------------------------------------

def steps_per_epoch(n_records: int, batch_size: int) -> int:
    """Full global batches per epoch; an epoch's last partial batch is dropped (each epoch is
    shuffled anew, so no record is always left out)."""
    return n_records // batch_size


def batch_plan(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
               group_by_length: bool = True, window: int = 64) -> list[np.ndarray]:
    """One epoch's global batches of record indices, the same for the same (seed, epoch).

    Records are shuffled; with ``group_by_length`` each run of ``window`` batches is sorted by
    length and cut into batches, whose order is then shuffled, so a batch holds records of
    similar length (little padding) while the epoch still visits records in random order.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    n_batches = steps_per_epoch(len(lengths), batch_size)
    if group_by_length:
        span = batch_size * max(1, window)
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(span, len(order), span))])
        batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]
        return [batches[i] for i in rng.permutation(n_batches)]
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def microbatches(batch: np.ndarray, rank: int, world_size: int, accumulation: int) -> list[np.ndarray]:
    """This process's microbatches of a global batch: contiguous slices, so records of similar
    length (neighbours after grouping) share a microbatch. Needs an exact split."""
    size = len(batch) // (world_size * accumulation)
    return [batch[(k * world_size + rank) * size:(k * world_size + rank + 1) * size]
            for k in range(accumulation)]


def padding_share(data: TokenizedRecords, batches) -> float:
    """Share of padding among the tokens a model computes over these (micro)batches."""
    real = sum(int(data.lengths[b].sum()) for b in batches)
    computed = sum(int(data.lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / computed if computed else 0.0
