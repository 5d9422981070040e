"""Reading, validating, tokenizing and batching training records (preference_datasets.py)."""
import random
import re

import numpy as np
import pytest
import torch

from modeling import LinePositions, build_char_tokenizer
from tasks import protocol
from preference_datasets import (IGNORE_INDEX, DatasetError, batch_plan, collate, collate_packed, dataset_meta,
                                 pack_rows,
                                 load_splits, microbatches, padding_share, read_records, sibling_path,
                                 steps_per_epoch, tokenize_records, with_distractor_lines,
                                 with_noisy_call_lines)
from tests.test_train_fixtures import addition_records, write_dataset


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_labels_of_a_literal_example_mask_the_prompt_and_keep_eos(tokenizer):
    data = tokenize_records([("07 + 58\nAnswer: ", "65"), ("1 + 2\nAnswer: ", "3")], tokenizer, 2048, 256)
    batch = collate(data, [0, 1], tokenizer.pad_token_id)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert batch["input_ids"][0].tolist() == ids("07 + 58\nAnswer: 65") + [eos]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 16 + ids("65") + [eos]
    # The shorter record is right-padded with EOS ids that are *not* in the loss.
    assert batch["input_ids"][1].tolist() == ids("1 + 2\nAnswer: 3") + [eos] + [eos] * 3
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 14 + ids("3") + [eos] + [IGNORE_INDEX] * 3
    assert data.label_counts().tolist() == [3, 2]
    assert data.n_truncated == 0


def test_long_records_are_truncated_and_counted(tokenizer):
    data = tokenize_records([("abcdefgh", "123456"), ("ab", "1")], tokenizer, max_length=8, max_prompt_length=4)
    first = data.tokens[data.starts[0]:data.starts[0] + data.lengths[0]].tolist()
    assert tokenizer.decode(first[:4]) == "efgh"  # the prompt keeps its end, next to the output
    assert data.lengths.tolist() == [8, 4] and data.prompt_lengths.tolist() == [4, 2]
    assert data.n_truncated == 1


@pytest.mark.parametrize("content, message", [
    ("not json at all", "not JSON"),
    ("[]", "no records"),
    ('{"input": "a", "output": "b"}', "expected a JSON list"),
    ('[{"input": "a", "output": "b"}, {"input": "a"}]', "record 1 has no 'output' key"),
    ('[{"input": "a", "output": "b"}, {"input": 3, "output": "b"}]', "record 1 'input' is int, not a string"),
    ('[{"input": "a", "output": "b"}, ["a", "b"]]', "record 1 is list, not an object"),
])
def test_malformed_files_name_the_file_and_record(tmp_path, content, message):
    path = tmp_path / "bad_train.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as error:
        read_records(str(path))
    assert str(path) in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_jsonl_is_read_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "x_train.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n\n{"input": "c", "output": "d"}\n')
    assert read_records(str(path)) == [("a", "b"), ("c", "d")]
    path.write_text('{"input": "a", "output": "b"}\n{"input": \n')
    with pytest.raises(DatasetError, match=re.escape(f"{path}: line 2 is not JSON")):
        read_records(str(path))
    missing = tmp_path / "missing.json"
    with pytest.raises(DatasetError, match=re.escape(f"{missing}: cannot read")):
        read_records(str(missing))


def test_a_malformed_meta_file_is_named(tmp_path):
    """A dataset's _meta.json is read for the run's data_meta.json: a broken one names itself."""
    train = write_dataset(tmp_path, "x", [{"input": "a", "output": "b"}])
    meta = tmp_path / "x_meta.json"
    for content, message in [("{not json", "not JSON"), ("[1, 2]", "expected a JSON object")]:
        meta.write_text(content)
        with pytest.raises(DatasetError, match=re.escape(f"{meta}: {message}")):
            dataset_meta([train])


def test_sibling_files_and_metadata(tmp_path):
    assert sibling_path("data/addition_retuning_small_train.json", "test") == "data/addition_retuning_small_test.json"
    assert sibling_path("data/addition_retuning_small_train.jsonl", "meta") == "data/addition_retuning_small_meta.json"
    meta = {"task": "addition", "method": "retuning", "train_lengths": [1, 2, 3]}
    with_meta = write_dataset(tmp_path, "a", [{"input": "x", "output": "y"}], meta=meta)
    without = write_dataset(tmp_path, "b", [{"input": "x", "output": "y"}])
    assert dataset_meta([with_meta, without]) == [{"path": with_meta, **meta}, {"path": without}]


def test_held_out_records_come_from_the_test_file_else_a_seeded_slice(tmp_path):
    records = addition_records(random.Random(0), [2, 3], 20)  # 3 + 5 records per problem
    test = addition_records(random.Random(1), [3], 2)
    with_test = write_dataset(tmp_path, "t", records, test=test)
    train, held_out = load_splits([with_test], n_eval_examples=100, seed=0)
    assert len(train) == len(records) and held_out == [(r["input"], r["output"]) for r in test]

    no_test = write_dataset(tmp_path, "n", records)
    train, held_out = load_splits([no_test], n_eval_examples=12, seed=0)
    assert len(held_out) == 12 and len(train) == len(records) - 12
    assert sorted(train + held_out) == sorted((r["input"], r["output"]) for r in records)
    assert load_splits([no_test], 12, seed=0) == (train, held_out)
    assert load_splits([no_test], 12, seed=1)[1] != held_out
    assert len(load_splits([no_test], 1000, seed=0)[1]) == len(records) // 10  # at most a tenth

    # Two datasets are mixed; the held-out set is cut to n_eval_examples.
    train, held_out = load_splits([with_test, no_test], n_eval_examples=5, seed=0)
    assert len(train) == 2 * len(records) - 5 and len(held_out) == 5


def test_batch_plan_is_a_seeded_partition_grouped_by_length():
    lengths = np.random.default_rng(0).integers(5, 200, size=1000)
    batch_size = 16
    plan = batch_plan(lengths, batch_size, seed=3, epoch=0, window=32)
    assert len(plan) == steps_per_epoch(1000, batch_size) == 62
    flat = np.concatenate(plan)
    assert len(set(flat.tolist())) == len(flat) == 62 * 16  # no record twice in an epoch
    assert all(np.array_equal(a, b) for a, b in zip(plan, batch_plan(lengths, batch_size, 3, 0, window=32)))
    assert not np.array_equal(np.concatenate(batch_plan(lengths, batch_size, 3, 1, window=32)), flat)
    random_plan = batch_plan(lengths, batch_size, seed=3, epoch=0, group_by_length=False)

    class Data:  # padding_share only needs the lengths
        pass
    data = Data()
    data.lengths = lengths
    grouped_share, random_share = padding_share(data, plan), padding_share(data, random_plan)
    assert grouped_share < 0.05 and random_share > 0.3


def test_microbatches_split_a_global_batch_exactly():
    batch = np.arange(24)
    parts = [microbatches(batch, rank, 2, 3) for rank in range(2)]
    assert all(len(p) == 3 and all(len(m) == 4 for m in p) for p in parts)
    assert sorted(np.concatenate([m for p in parts for m in p]).tolist()) == list(range(24))
    assert parts[0][0].tolist() == [0, 1, 2, 3] and parts[1][0].tolist() == [4, 5, 6, 7]


def test_pack_rows_places_every_record_once_within_capacity():
    assert pack_rows(np.array([5, 2, 3, 4]), 5) == [[0], [3], [2, 1]]
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 40, size=rng.integers(1, 50))
        rows = pack_rows(lengths, int(lengths.max()))
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(lengths[row].sum() <= lengths.max() for row in rows)


def test_packed_records_keep_their_tokens_labels_positions_and_see_only_themselves(tokenizer):
    data = tokenize_records([("123\n", "ab"), ("1\n", "a"), ("\n", "b")], tokenizer, 100, 100)
    assert data.lengths.tolist() == [7, 4, 3]  # EOS included
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    packed = collate_packed(data, [0, 1, 2], tokenizer.pad_token_id, LinePositions(newline, 10).ids)
    ids, labels, allowed = packed["input_ids"], packed["labels"], packed["allowed"]
    assert ids.shape == (2, 7) and allowed.shape == (2, 7, 7)  # rows [123\nab</s>], [1\na</s> \nb</s>]
    assert tokenizer.decode(ids[1].tolist()) == "1\na</s>\nb</s>"
    assert packed["position_ids"][1].tolist() == [0, 1, 10, 11, 0, 10, 11]  # each record its own lines
    learnt = ids[1].where(labels[1] != IGNORE_INDEX, -1).tolist()
    assert learnt == [-1, -1, ids[1, 2], tokenizer.eos_token_id, -1, ids[1, 5], tokenizer.eos_token_id]
    second = torch.zeros(7, 7, dtype=torch.bool)
    second[:4, :4] = torch.ones(4, 4, dtype=torch.bool).tril()
    second[4:, 4:] = torch.ones(3, 3, dtype=torch.bool).tril()
    assert torch.equal(allowed[1], second)  # causal inside each record, nothing across
    assert torch.equal(allowed[0], torch.ones(7, 7, dtype=torch.bool).tril())
    padded = collate(data, [0, 1, 2], tokenizer.pad_token_id)
    assert sorted((l != IGNORE_INDEX).sum().item() for l in labels) == [3, 4]
    assert (padded["labels"] != IGNORE_INDEX).sum() == (labels != IGNORE_INDEX).sum()


def test_noisy_call_lines_change_only_the_call_digits_of_combine_records():
    records = [(r["input"], r["output"]) for r in addition_records(random.Random(0), [2, 3, 4], 10)]
    combines = [i for i, (prompt, _) in enumerate(records) if "\nReturn: " in prompt]
    assert 0 < len(combines) < len(records)
    noisy = with_noisy_call_lines(records, share=1.0, max_digits=7, seed=0)
    widths = set()
    for i, ((prompt, output), (new_prompt, new_output)) in enumerate(zip(records, noisy)):
        assert new_output == output
        if i not in combines:
            assert new_prompt == prompt
            continue
        old_lines, new_lines = prompt.split("\n"), new_prompt.split("\n")
        assert len(new_lines) == len(old_lines) and new_lines[0] == old_lines[0]
        assert new_lines[2:] == old_lines[2:]  # the return line and the answer cue
        head, _, call = new_lines[1].partition("Solution: Call: ")
        a, plus, b = call.partition(" + ")
        assert head == "" and plus and a.isdigit() and b.isdigit() and len(a) == len(b) <= 7
        widths.add(len(a))
    assert widths == set(range(1, 8))  # every width drawn, not only the problem's own
    assert with_noisy_call_lines(records, 1.0, 7, seed=0) == noisy  # same seed, same records
    assert with_noisy_call_lines(records, 1.0, 7, seed=1) != noisy
    assert with_noisy_call_lines(records, 0.0, 7, seed=0) == records
    half = with_noisy_call_lines(records, 0.5, 7, seed=0)
    changed = sum(new != old for new, old in zip(half, records))
    assert 0.3 * len(combines) < changed < 0.7 * len(combines)
    # A call after other text on its line (DP's) is found by the protocol's rule, not addition's.
    context = protocol.append_return(protocol.pose("Create dp array [5, -1, 4]"),
                                     "Call with array minus first element. " + protocol.call_line("Create dp array [-1, 4]"),
                                     "[4, 4]")
    (noisy_context, _), = with_noisy_call_lines([(context, "[9, 4, 4]")], 1.0, 3, seed=0)
    kept, _, call = noisy_context.split("\n")[1].partition("Call: Create dp array [")
    assert kept == "Solution: Call with array minus first element. " and noisy_context != context
    assert re.fullmatch(r"-[0-9]{1,3}, [0-9]{1,3}\]", call), call
    with pytest.raises(ValueError, match="call_line_noise.share"):
        with_noisy_call_lines(records, 1.5, 7, seed=0)
    with pytest.raises(ValueError, match="call_line_noise.max_digits"):
        with_noisy_call_lines(records, 0.5, 0, seed=0)


def test_distractor_lines_put_random_digits_above_the_problem_of_call_records_only():
    records = [(r["input"], r["output"]) for r in addition_records(random.Random(0), [2, 3, 4], 10)]
    calls = [i for i, (_, output) in enumerate(records) if output.startswith("Call: ")]
    assert 0 < len(calls) < len(records)
    distracted = with_distractor_lines(records, share=1.0, max_digits=9, seed=0)
    widths = set()
    for i, ((prompt, output), (new_prompt, new_output)) in enumerate(zip(records, distracted)):
        assert new_output == output
        if i not in calls:
            assert new_prompt == prompt
            continue
        line, _, rest = new_prompt.partition("\n")
        assert rest == prompt and line.isdigit() and 1 <= len(line) <= 9
        widths.add(len(line))
    assert widths == set(range(1, 10))
    assert with_distractor_lines(records, 1.0, 9, seed=0) == distracted  # same seed, same records
    assert with_distractor_lines(records, 1.0, 9, seed=1) != distracted
    assert with_distractor_lines(records, 0.0, 9, seed=0) == records
    quarter = with_distractor_lines(records, 0.25, 9, seed=0)
    changed = sum(new != old for new, old in zip(quarter, records))
    assert 0.1 * len(calls) < changed < 0.4 * len(calls)
    # DP's calls follow a note on their line; they are call records all the same.
    dp_call = (protocol.pose("Create dp array [5, -1, 4]"),
               "Call with array minus first element. " + protocol.call_line("Create dp array [-1, 4]"))
    (prompt, _), = with_distractor_lines([dp_call], 1.0, 3, seed=0)
    assert prompt.endswith("\n" + dp_call[0]) and prompt != dp_call[0]
    with pytest.raises(ValueError, match="distractor_line.share"):
        with_distractor_lines(records, -0.1, 9, seed=0)
    with pytest.raises(ValueError, match="distractor_line.max_digits"):
        with_distractor_lines(records, 0.5, 0, seed=0)
