"""End-to-end trainer behaviour on a very small Llama (CPU, a handful of steps per run)."""
import glob
import json
import os
import shutil
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainers
import utils
from modeling import LinePositions, load_checkpoint
from preference_datasets import DatasetError
from tests.test_train_fixtures import addition_records, write_dataset
from train import build, compose_config, run
from utils import uses_bf16_autocast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MODEL = ["model.llama_config.hidden_size=32", "model.llama_config.intermediate_size=64",
               "model.llama_config.num_hidden_layers=2", "model.llama_config.num_attention_heads=2"]
META = {"task": "addition", "method": "retuning", "preset": "test", "seed": 0, "train_lengths": [1, 2, 3]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_dataset(folder, "addition_retuning_test", addition_records(random.Random(0), [1, 2, 3], 12),
                         test=addition_records(random.Random(1), [3], 4), meta=META)


def config(tmp_path, dataset, *overrides, name="run"):
    torch.set_num_threads(1)
    return compose_config(SMALL_MODEL + [
        f"datasets=[{dataset}]", f"run_dir={tmp_path / name}", "batch_size=8", "gradient_accumulation_steps=1",
        "n_examples=64", "n_epochs=100", "eval_every=32", "log_every=2", "num_threads=1", "warmup_steps=2",
        "eval_batch_size=8", "mixed_precision=none", *overrides])  # fp32: tests compare numbers closely


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def assert_same_weights(a, b, exact=False, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)


def test_a_run_directory_holds_what_evaluation_and_resuming_need(tmp_path, dataset):
    run_dir = run(config(tmp_path, dataset, "save_every=24"))
    assert sorted(os.listdir(run_dir)) == ["config.yaml", "data_meta.json", "final", "metrics.jsonl",
                                            "step-3", "step-6"]
    assert json.loads(open(os.path.join(run_dir, "data_meta.json")).read()) == [{"path": dataset, **META}]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8] and [r["step"] for r in eval_rows] == [0, 4, 8]
    for key in ("train/loss", "lr", "grad_norm", "tokens_per_s", "records_per_s", "padding_share", "records"):
        assert key in train_rows[0]
    assert 0 <= train_rows[0]["padding_share"] < 1
    assert "lr: 0.001" in open(os.path.join(run_dir, "config.yaml")).read()  # tiny.yaml's own lr

    final = os.path.join(run_dir, "final")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "rng_state_0.pt"):
        assert os.path.isfile(os.path.join(final, name))
    assert json.load(open(os.path.join(final, "trainer_state.json")))["step"] == 8
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.num_hidden_layers == 2 and tokenizer.decode(tokenizer("7 + 8")["input_ids"]) == "7 + 8"
    optimizer_state = torch.load(os.path.join(final, "optimizer.pt"), weights_only=True)
    assert int(optimizer_state["optimizer"]["state"][0]["step"]) == 8
    assert not [name for name in os.listdir(run_dir) if name.endswith((".tmp", ".old"))]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path, dataset, reduction):
    # No clipping: within a batch the two reductions differ by a constant factor, which clipping
    # to the same norm would hide.
    common = ["n_examples=32", "eval_every=0", "save_every=0", "eval_at_start=false", "max_grad_norm=1e9",
              f"loss_reduction={reduction}"]
    one = run(config(tmp_path, dataset, *common, name="one"))
    four = run(config(tmp_path, dataset, *common, "gradient_accumulation_steps=4", name="four"))
    assert_same_weights(weights(f"{one}/final"), weights(f"{four}/final"))
    if reduction == "mean":  # the two reductions really train differently
        other = run(config(tmp_path, dataset, *common[:-1], "loss_reduction=sum", name="sum"))
        with pytest.raises(AssertionError):
            assert_same_weights(weights(f"{one}/final"), weights(f"{other}/final"))


@pytest.mark.parametrize("stride", [0, 4])  # ordinary positions; line positions that overlap long lines
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True])
def test_packed_rows_give_the_loss_and_gradient_of_the_padded_batch(tmp_path, dataset, stride, attention, lora):
    trainer = build(config(tmp_path, dataset, f"model.llama_config.line_position_stride={stride}",
                           f"lora.enabled={str(lora).lower()}", "lora.lora_dropout=0"))
    trainer.raw_model.set_attn_implementation(attention)
    by_length = trainer.train_data.lengths.argsort(kind="stable")
    indices = np.concatenate([by_length[:6], by_length[-2:]])  # short records share the longest's rows
    lengths = trainer.train_data.lengths[indices]

    def loss_and_gradient(packed):
        trainer.cfg.pack_records = packed
        trainer.optimizer.zero_grad(set_to_none=True)
        nll = trainer.nll(trainer.train_data, indices)
        nll.backward()
        return nll.detach(), torch.cat([p.grad.flatten() for p in trainer.params])

    padded_loss, padded_gradient = loss_and_gradient(False)
    packed_loss, packed_gradient = loss_and_gradient(True)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed_gradient, padded_gradient, rtol=1e-4, atol=1e-6)
    trainer.cfg.pack_records = True
    records, loss_tokens, real, computed = trainer.counts(trainer.train_data, indices)
    assert real == lengths.sum() and real <= computed < lengths.max() * len(indices)  # less padding computed
    trainer.raw_model.config._attn_implementation = "flash_attention_2"  # takes no 4D mask
    with pytest.raises(ValueError, match="pack_records=true needs sdpa or eager attention"):
        trainer.nll(trainer.train_data, indices)
    trainer.logger.close()


def test_mixed_precision_auto_takes_bf16_only_where_the_hardware_has_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    assert [uses_bf16_autocast(cpu, mode) for mode in ("auto", "bf16", "none")] == [True, True, False]
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert [uses_bf16_autocast(cpu, mode) for mode in ("auto", "bf16", "none")] == [False, True, False]
    with pytest.raises(ValueError, match="mixed_precision: expected one of auto, bf16, none, got 'fp16'"):
        uses_bf16_autocast(cpu, "fp16")


def test_bf16_autocast_on_a_cpu_uses_eager_attention_and_an_fp32_head_and_stays_close_to_fp32(tmp_path, dataset):
    fp32 = build(config(tmp_path, dataset, name="fp32"))
    bf16 = build(config(tmp_path, dataset, "mixed_precision=bf16", name="bf16"))
    assert fp32.raw_model.config._attn_implementation == "sdpa"
    assert bf16.raw_model.config._attn_implementation == "eager"  # CPU SDPA's bf16 backward is slow
    for trainer, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        with trainer.autocast():
            mlp = trainer.raw_model.model.layers[0].mlp
            assert mlp(torch.ones(1, 1, mlp.hidden_size)).dtype == dtype
            # the head stays fp32: with bf16 logits the tiny model's baseline addition stalls
            assert trainer.raw_model(input_ids=torch.tensor([[5, 6, 7]])).logits.dtype == torch.float32
    assert bf16.raw_model.state_dict().keys() == fp32.raw_model.state_dict().keys()
    indices = np.arange(8)
    loss32, loss16 = (trainer.nll(trainer.train_data, indices).item() for trainer in (fp32, bf16))
    assert abs(loss16 - loss32) < 0.02 * loss32
    for trainer in (fp32, bf16):
        trainer.logger.close()


def test_a_compiled_training_learns_the_weights_of_an_eager_one_and_saves_a_plain_checkpoint(tmp_path, dataset):
    # Packed rows with line positions and position gaps: the reproduction's Re-Tuning steps, whose
    # batches change rows, width and mask dtype from step to step.
    common = ["pack_records=true", "eval_every=0", "save_every=0", "eval_at_start=false",
              "position_gaps=[{after: '+', max: 3}]"]
    eager = run(config(tmp_path, dataset, *common, name="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, again = (run(config(tmp_path, dataset, *common, "compile=true", name=name)) for name in ("compiled", "again"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile, and did not fall back
    compiled, again, eager = (weights(f"{run_dir}/final") for run_dir in (compiled, again, eager))
    assert compiled.keys() == eager.keys()  # no "_orig_mod." prefixes
    assert_same_weights(eager, compiled, atol=1e-4)
    assert_same_weights(compiled, again, exact=True)  # same seed, same bytes


def test_compile_without_a_cpp_compiler_stops_before_anything_is_written(tmp_path, dataset, monkeypatch):
    from torch._inductor import config as inductor_config
    from train import SettingError
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-compiler++",))
    with pytest.raises(SettingError, match=re.escape("compile=true on a CPU needs a C++ compiler")):
        build(config(tmp_path, dataset, "compile=true"))
    assert not (tmp_path / "run").exists()
    build(config(tmp_path, dataset, "compile=false")).logger.close()  # no compiler needed without it


def test_the_tiny_model_trains_without_tf32_and_the_flag_reaches_torch(tmp_path, dataset):
    # TF32's 10-bit mantissa in the output layer stalled the tiny baseline on an H100, as bf16
    # logits did (docs/tiny_model.md); the llama configs keep the paper's TF32.
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for overrides, expected in (((), False), (("tf32=true",), True)):
            trainer = build(config(tmp_path, dataset, *overrides, name=f"tf32-{expected}"))
            assert torch.backends.cuda.matmul.allow_tf32 is expected and torch.backends.cudnn.allow_tf32 is expected
            trainer.logger.close()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert compose_config(["model=llama7b"]).tf32 is True


def test_a_microbatch_whose_records_cannot_share_a_row_stays_padded(tmp_path, dataset, monkeypatch):
    trainer = build(config(tmp_path, dataset))
    lengths = trainer.train_data.lengths
    longest = lengths.argsort(kind="stable")[-4:]  # no two of the longest fit in one row
    trainer.cfg.pack_records = False
    padded = trainer.nll(trainer.train_data, longest)

    def no_packing(*args, **kwargs):
        raise AssertionError("collate_packed called for a microbatch that packs nothing")

    monkeypatch.setattr("trainers.collate_packed", no_packing)
    trainer.cfg.pack_records = True
    assert trainer.packed_rows(trainer.train_data, longest) == 4
    torch.testing.assert_close(trainer.nll(trainer.train_data, longest), padded)
    assert trainer.counts(trainer.train_data, longest)[3] == lengths[longest].max() * 4
    shares = np.concatenate([lengths.argsort(kind="stable")[:2], longest[-1:]])
    with pytest.raises(AssertionError, match="collate_packed called"):
        trainer.nll(trainer.train_data, shares)  # two short records fit beside each other
    trainer.logger.close()


def gap_trainer(tmp_path, dataset, gaps, text):
    """A trainer with line positions and these position_gaps, the token ids of ``text`` (padded
    rows) and their plain line positions."""
    trainer = build(config(tmp_path, dataset, "model.llama_config.line_position_stride=64", f"position_gaps={gaps}"))
    ids = trainer.tokenizer(text, add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    return trainer, ids, trainer.line_positions.ids(ids)


def test_a_free_share_of_records_trains_at_the_evaluations_positions(tmp_path, dataset):
    # Every gap drawn at 0 at once, the evaluation's positions, was about 1 record in 10,000
    # (docs/tiny_model.md); position_gaps_free_share trains a share of the records with no gap.
    text = ["12 + 34\nSolution: Call: 2 + 4\n"] * 400
    for share, low, high in ((0.0, 0, 10), (0.25, 60, 140), (1.0, 400, 400)):
        trainer, ids, plain = gap_trainer(tmp_path / str(share), dataset, '[{after:"+",max:16},{after:"0123456789",max:16}]', text)
        trainer.cfg.position_gaps_free_share = share
        unmoved = int((trainer.position_ids(ids) == plain).all(dim=1).sum())
        assert low <= unmoved <= high, (share, unmoved)
        if share == 1.0:  # from a later step on only: before it every record draws its gaps
            trainer.cfg.position_gaps_free_from_step = trainer.step + 1
            assert int((trainer.position_ids(ids) == plain).all(dim=1).sum()) <= 10
            trainer.step += 1
            assert torch.equal(trainer.position_ids(ids), plain)
        trainer.raw_model.eval()
        assert torch.equal(trainer.position_ids(ids), plain)  # evaluation: never any gap
        trainer.logger.close()
    with pytest.raises(ValueError, match=re.escape("position_gaps_free_share must be a share in [0, 1], got 1.5")):
        build(config(tmp_path, dataset, "model.llama_config.line_position_stride=64", "position_gaps_free_share=1.5",
                     name="bad-share"))


def test_position_gaps_move_each_lines_tokens_from_its_first_marker_on_in_training_only(tmp_path, dataset):
    trainer, ids, plain = gap_trainer(tmp_path, dataset, '[{after:"+",max:16},{after:"0123456789",max:16}]',
                                      ["12 + 34\nSolution: Call: 2 + 4\n", "5 + 6\nSolution: "])
    draws = [trainer.position_ids(ids) - plain for _ in range(50)]
    for shift in draws:
        row = shift[0].tolist()
        digit_gap, plus_gap = row[0], row[3] - row[0]  # "1" (first digit), "+"
        assert row[:3] == [digit_gap] * 3 and row[3:8] == [digit_gap + plus_gap] * 5  # "+ 34\n"
        assert row[8:24] == [0] * 16  # "Solution: Call: " comes before the line's first digit
        assert row[24:26] == [digit_gap] * 2 and row[26:30] == [digit_gap + plus_gap] * 4
        assert 0 <= digit_gap <= 16 and 0 <= plus_gap <= 16
        # so the call's "2" and "4" sit as far from the "2" and "4" they copy as without gaps
    assert len({tuple(shift[0].tolist()) for shift in draws}) > 10  # drawn anew for each batch
    assert len({(shift[0, 0].item(), shift[1, 0].item()) for shift in draws}) > 10  # and per record
    trainer.model.eval()
    assert torch.equal(trainer.position_ids(ids), plain)  # held-out loss and inference: no gaps
    trainer.logger.close()
    with pytest.raises(ValueError, match="position_gaps"):
        build(config(tmp_path, dataset, "model.llama_config.line_position_stride=0",
                     'position_gaps=[{after:"+",max:4}]', name="ordinary"))


def test_a_position_gap_inside_a_run_keeps_right_aligned_copies_and_varies_the_runs_span(tmp_path, dataset):
    trainer, ids, plain = gap_trainer(tmp_path, dataset, '[{inside:"0123456789",before:" +",from_right:2,max:16}]',
                                      ["123 + 45\nSolution: Call: 23 + 5\n", "7 + 8\n9, 45 + 6\n"])
    cuts = set()
    for _ in range(60):
        row, short = (trainer.position_ids(ids) - plain).tolist()
        cut = 1 if row[1] else 2  # before "2" (k = 2) or before "3" (k = 1) of "123"
        gap = row[cut]
        assert row[:cut] == [0] * cut and row[cut:9] == [gap] * (9 - cut) and 0 <= gap <= 16
        assert row[9:25] == [0] * 16  # "Solution: Call: " stays, and so does "2" of "23" when k = 1
        assert row[25:32] == [gap if cut == 1 else 0] + [gap] * 6
        assert (row[1], row[2], row[7]) == (row[25], row[26], row[30])  # "23", "5" copied at their distance
        assert short[:6] == [short[0]] * 6  # a run shorter than k moves from its first token
        assert short[6:9] == [0] * 3 and short[10] == short[11]  # "9" does not end before " +"; "45" does
        cuts.add(cut if gap else 0)
    assert cuts == {0, 1, 2}
    trainer.model.eval()
    assert torch.equal(trainer.position_ids(ids), plain)
    trainer.logger.close()
    for entry, complaint in [('{after:"+",inside:"0123456789",before:" +",from_right:2,max:4}', "either after, or"),
                             ('{inside:"0123456789",max:4}', "either after, or"),
                             ('{inside:"0123456789",before:" +",from_right:0,max:4}', "from_right >= 1"),
                             ('{after:"+",max:-1}', "max >= 0")]:
        with pytest.raises(ValueError, match=f"position_gaps: .* needs .*{complaint}"):
            build(config(tmp_path, dataset, "model.llama_config.line_position_stride=64",
                         f"position_gaps=[{entry}]", name="malformed"))


def test_a_gap_before_a_newline_also_marks_the_run_that_ends_the_record(tmp_path, dataset):
    text = "Return: Carry 0, Output 46\nAnswer: Carry 0, Output 146"
    trainer, ids, _ = gap_trainer(tmp_path, dataset, '[{inside:"0123456789",before:"\\n",from_right:3,max:16}]', [text])
    ids = torch.cat([ids, torch.tensor([[trainer.tokenizer.eos_token_id]])], dim=1)  # as every training record ends
    plain = trainer.line_positions.ids(ids)
    returned, answer = text.index("46"), text.index("146")
    cuts = set()
    for _ in range(60):
        row = (trainer.position_ids(ids) - plain)[0].tolist()
        gap = row[returned + 1]  # "6", the last digit, moves whatever k
        assert 0 <= gap <= 16 and row[returned + 2] == row[-1] == gap  # and so do "\n" and the EOS
        assert row[:returned] == [0] * returned and row[returned + 3:answer] == [0] * (answer - returned - 3)
        assert row[answer + 1:answer + 3] == row[returned:returned + 2]  # "46" copied at its distance
        if gap:
            cuts.add(tuple(shift // gap for shift in row[answer:answer + 3]))
    assert cuts == {(0, 0, 1), (0, 1, 1), (1, 1, 1)}  # k = 1, 2, 3 in "146"
    trainer.logger.close()


def test_an_onward_gap_moves_the_rest_of_the_record_together(tmp_path, dataset):
    text = "12 + 34\nSolution: Call: 2 + 4\nReturn: Carry 0, Output 6\nAnswer: Carry 0, Output 46"
    trainer, ids, plain = gap_trainer(tmp_path, dataset, '[{after:"R",max:16,onward:true},{after:"+",max:16}]', [text])
    returned = text.index("Return")
    gaps = set()
    for _ in range(50):
        row = (trainer.position_ids(ids) - plain)[0].tolist()
        plus = row[3]  # the per-line gap after "+", the same in both lines that have one
        assert row[:returned] == [0] * 3 + [plus] * 5 + [0] * 18 + [plus] * 4  # up to the call's newline
        onward = row[returned]
        assert row[returned:] == [onward] * (len(text) - returned) and 0 <= onward <= 16
        # so "6" and its copy in the answer stay a line apart, and both move away from the call
        gaps.add(onward)
    assert len(gaps) > 8
    trainer.logger.close()


@pytest.mark.parametrize("lever", ["call_line_noise", "distractor_line"])
def test_noisy_lines_change_the_training_records_only(tmp_path, dataset, lever):
    plain = build(config(tmp_path, dataset, name="plain"))
    noisy = build(config(tmp_path, dataset, f"{lever}.share=1.0", f"{lever}.max_digits=20", name="noisy"))
    for trainer in (plain, noisy):
        trainer.logger.close()
    # The fixture's calls have at most 2 digits per operand: random widths of 1-20 lengthen them,
    # and a distractor line lengthens every call record's prompt.
    assert noisy.train_data.lengths.sum() > plain.train_data.lengths.sum()
    assert len(noisy.train_data) == len(plain.train_data)
    assert np.array_equal(noisy.eval_data.tokens, plain.eval_data.tokens)  # held-out loss as before


def test_position_gaps_can_grow_from_zero_over_the_first_steps(tmp_path, dataset):
    trainer, ids, plain = gap_trainer(tmp_path, dataset, '[{after:"+",max:40,grow_steps:100}]', ["12 + 34\nSolution: "])

    def largest_gap_at(step):
        trainer.step = step
        return max(int((trainer.position_ids(ids) - plain).max()) for _ in range(200))

    assert largest_gap_at(0) == 0
    assert largest_gap_at(25) == 10  # a quarter of the way: gaps of 0..10
    assert largest_gap_at(100) == largest_gap_at(5000) == 40
    trainer.logger.close()
    with pytest.raises(ValueError, match="grow_step"):  # a misspelt key is not silently ignored
        build(config(tmp_path, dataset, "model.llama_config.line_position_stride=64",
                     'position_gaps=[{after:"+",max:40,grow_step:100}]', name="misspelt"))


def test_metrics_are_mirrored_to_tensorboard_and_wandb(tmp_path, dataset, monkeypatch):
    """The same numbers at the same steps as metrics.jsonl; writers closed at the end. Neither
    package is a dependency, so stand-ins record what the trainer hands them."""
    scalars, closed, wandb_calls = [], [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            scalars.append((self.log_dir, key, value, step))

        def close(self):
            closed.append(self.log_dir)

    class WandbRun:
        def log(self, values, step):
            wandb_calls.append(("log", dict(values), step))

        def finish(self):
            wandb_calls.append(("finish",))

    def init(**settings):
        wandb_calls.append(("init", settings))
        return WandbRun()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", type(sys)("fake_tb"))
    sys.modules["torch.utils.tensorboard"].SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "wandb", type(sys)("fake_wandb"))
    sys.modules["wandb"].init = init
    run_dir = run(config(tmp_path, dataset, "tensorboard=true", "wandb.enabled=true",
                         "wandb.project=rt-test"))

    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    expected = [(os.path.join(run_dir, "tensorboard"), key, value, row["step"])
                for row in rows for key, value in row.items()
                if key not in ("step", "time") and isinstance(value, (int, float))]
    assert scalars == expected
    assert [s for s in scalars if s[1] == "eval/loss"] and closed == [os.path.join(run_dir, "tensorboard")]
    assert wandb_calls[0][0] == "init" and wandb_calls[0][1]["project"] == "rt-test"
    assert wandb_calls[0][1]["name"] == os.path.basename(run_dir) and wandb_calls[0][1]["config"]["lr"] == 1e-3
    logged = [(values, step) for _, values, step in wandb_calls[1:-1]]
    assert logged == [({k: v for k, v in row.items() if k not in ("step", "time")}, row["step"]) for row in rows]
    assert wandb_calls[-1] == ("finish",)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, dataset, monkeypatch):
    # Dropout makes the run depend on RNG state and data position too.
    overrides = ["save_every=24", "eval_every=24", "model.llama_config.attention_dropout=0.2"]
    whole = run(config(tmp_path, dataset, *overrides, name="whole"))

    save = trainers.Trainer.save

    def crash_after_first_checkpoint(self, name, step):
        save(self, name, step)
        raise KeyboardInterrupt("killed")  # the process dies right after writing step-3/

    monkeypatch.setattr(trainers.Trainer, "save", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path, dataset, *overrides, name="killed"))
    monkeypatch.setattr(trainers.Trainer, "save", save)
    assert not os.path.exists(tmp_path / "killed" / "final")
    # As if it had trained on a GPU: its optimizer state says cuda:0, and it resumes on this CPU.
    optimizer_file, = glob.glob(str(tmp_path / "killed" / "step-*" / "optimizer.pt"))
    optimizer_state = torch.load(optimizer_file, weights_only=True)
    with monkeypatch.context() as patched:
        patched.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(optimizer_state, optimizer_file)

    from train import SettingError
    other_data = write_dataset(tmp_path, "addition_baseline_other", addition_records(random.Random(5), [1, 2], 8))
    with pytest.raises(SettingError, match=r"trained datasets=\[.*addition_retuning_test.*\], not \[.*addition_baseline_other"):
        build(config(tmp_path, other_data, *overrides, f"resume={tmp_path / 'killed'}"))
    with pytest.raises(SettingError, match=r"trained lr=0.001, not 0.005; model.llama_config.hidden_size=32, not 48"):
        build(config(tmp_path, dataset, *overrides, "lr=0.005", "model.llama_config.hidden_size=48",
                     f"resume={tmp_path / 'killed'}"))
    with pytest.raises(SettingError, match="killd: no such run directory"):
        build(config(tmp_path, dataset, *overrides, f"resume={tmp_path / 'killd'}"))
    assert not os.path.exists(tmp_path / "killd")

    resumed = run(config(tmp_path, dataset, *overrides, f"resume={tmp_path / 'killed'}", name="ignored"))
    assert resumed == str(tmp_path / "killed") and not os.path.exists(tmp_path / "ignored")
    assert_same_weights(weights(f"{whole}/final"), weights(f"{resumed}/final"), exact=True)
    steps = [json.loads(line)["step"] for line in open(f"{resumed}/metrics.jsonl") if "train/loss" in line]
    assert steps == [2, 4, 6, 8]  # nothing logged twice across the interruption

    # Resuming a finished run leaves final/ as it is; asking for fewer steps than it took stops.
    final_state = os.path.join(resumed, "final", "trainer_state.json")
    written = os.stat(final_state).st_mtime_ns
    assert run(config(tmp_path, dataset, *overrides, f"resume={resumed}")) == resumed
    with pytest.raises(SettingError, match=r"has trained 8 steps, more than the 2 that n_examples=16"):
        build(config(tmp_path, dataset, *overrides, "n_examples=16", f"resume={resumed}"))
    assert os.stat(final_state).st_mtime_ns == written
    assert_same_weights(weights(f"{whole}/final"), weights(f"{resumed}/final"), exact=True)

    different = run(config(tmp_path, dataset, *overrides, "seed=1", name="seed1"))
    with pytest.raises(AssertionError):
        assert_same_weights(weights(f"{whole}/final"), weights(f"{different}/final"), exact=True)


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path, dataset, monkeypatch):
    """A kill half way through writing step-6/ leaves step-3/ and a half-written staging folder;
    resuming starts from step-3, writes step-6/ over that folder, and ends with the weights of
    an uninterrupted run."""
    overrides = ["save_every=24", "eval_every=24", "model.llama_config.attention_dropout=0.2"]
    whole = run(config(tmp_path, dataset, *overrides, name="whole"))
    write_weights = trainers.save_model

    def killed_while_writing_step_6(model, directory):
        write_weights(model, directory)
        if os.path.basename(directory) == "step-6.tmp":
            raise KeyboardInterrupt("killed")  # the weights are written, the optimizer state is not

    monkeypatch.setattr(trainers, "save_model", killed_while_writing_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path, dataset, *overrides, name="killed"))
    monkeypatch.setattr(trainers, "save_model", write_weights)
    killed = tmp_path / "killed"
    assert sorted(name for name in os.listdir(killed) if name.startswith("step-")) == ["step-3", "step-6.tmp"]
    assert trainers.latest_checkpoint(str(killed))[0] == str(killed / "step-3")

    resumed = run(config(tmp_path, dataset, *overrides, f"resume={killed}"))
    assert_same_weights(weights(f"{whole}/final"), weights(f"{resumed}/final"), exact=True)
    assert sorted(os.listdir(killed)) == ["config.yaml", "data_meta.json", "final", "metrics.jsonl", "step-3", "step-6"]


def test_keep_checkpoints_leaves_only_the_newest_checkpoints(tmp_path, dataset, monkeypatch):
    """keep_checkpoints=2: after every save only the two newest checkpoints are left, final/
    counting as one and never removed; null (the default) keeps every one."""
    save, seen = trainers.Trainer.save, []

    def save_and_look(self, name, step):
        save(self, name, step)
        seen.append(sorted(name for name in os.listdir(self.run_dir) if name.startswith("step-") or name == "final"))

    monkeypatch.setattr(trainers.Trainer, "save", save_and_look)
    run(config(tmp_path, dataset, "save_every=8", "eval_every=0", "keep_checkpoints=2", name="kept"))  # each step
    assert seen == [["step-1"]] + [[f"step-{n - 1}", f"step-{n}"] for n in range(2, 8)] + [["final", "step-7"]]
    seen.clear()
    run(config(tmp_path, dataset, "save_every=8", "eval_every=0", name="all"))
    assert seen[-1] == ["final"] + [f"step-{n}" for n in range(1, 8)]


def test_atomic_writes_leave_the_old_file_whole_when_stopped_half_way(tmp_path, monkeypatch):
    """config.yaml, trainer_state.json and the optimizer state go through a temporary file: a
    write stopped half way (a kill, a full disk) leaves the old file as it was, and no temporary."""
    path = tmp_path / "config.yaml"
    utils.atomic_write_text(str(path), "lr: 0.001\n")

    def stop(descriptor):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(utils.os, "fsync", stop)  # the new text written, not yet renamed
        with pytest.raises(KeyboardInterrupt):
            utils.atomic_write_text(str(path), "lr: 0.005\n")
    assert path.read_text() == "lr: 0.001\n" and os.listdir(tmp_path) == ["config.yaml"]

    state = tmp_path / "optimizer.pt"
    utils.atomic_torch_save({"step": torch.tensor(3)}, str(state))

    def save_half(value, file):
        with open(file, "wb") as handle:
            handle.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(utils.torch, "save", save_half)
        with pytest.raises(KeyboardInterrupt):
            utils.atomic_torch_save({"step": torch.tensor(6)}, str(state))
    assert int(torch.load(state, weights_only=True)["step"]) == 3
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "optimizer.pt"]


def test_lora_run_saves_an_adapter_with_its_base_beside_it(tmp_path, dataset):
    run_dir = run(config(tmp_path, dataset, "lora.enabled=true", "lora.lora_r=4", "lora.lora_alpha=8",
                         "n_examples=16", "eval_every=0", "lr=0.01"))
    final = os.path.join(run_dir, "final")
    assert os.path.isfile(os.path.join(final, "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(final, "model.safetensors"))
    assert os.path.isfile(os.path.join(run_dir, "base_model", "model.safetensors"))
    model, tokenizer = load_checkpoint(final)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "base_model"))
    ids = torch.tensor([tokenizer("12 + 34\nSolution: ")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)  # the adapter was trained
    # Copied out of its run directory, the adapter says where its base should be.
    alone = shutil.copytree(final, tmp_path / "copied" / "final")
    with pytest.raises(FileNotFoundError, match=r"base model '../base_model' is not at .*copied/base_model"):
        load_checkpoint(str(alone))


def test_learning_rate_schedules():
    paper = [trainers.learning_rate(s, 2e-4, 100, warmup_steps=1) for s in range(4)]
    assert paper == [1e-4, 2e-4, 2e-4, 2e-4]
    cosine = [trainers.learning_rate(s, 1.0, 10, 4, "cosine", 0.1) for s in range(10)]
    assert cosine[:4] == [0.2, 0.4, 0.6, 0.8] and cosine[4] == 1.0
    assert cosine[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(cosine[4:], cosine[5:]))


def test_held_out_loss_is_taken_with_line_positions_and_every_line_in_view(tmp_path, dataset):
    """The tiny model's line positions jump at every newline; the logged held-out loss must be
    the one where each token sees the whole record (not each line alone, which is what
    transformers makes of jumping positions without an attention mask)."""
    run_dir = run(config(tmp_path, dataset, "model.llama_config.line_position_stride=32", "n_examples=32"))
    model, tokenizer = load_checkpoint(os.path.join(run_dir, "final"))
    lines = LinePositions.of(model, tokenizer)
    assert lines is not None and lines.stride == 32

    def held_out_loss(with_mask: bool) -> float:
        total = 0.0
        records = json.loads(open(dataset.replace("_train", "_test")).read())
        for record in records:
            prompt = tokenizer(record["input"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + tokenizer(record["output"], add_special_tokens=False)["input_ids"]
                                + [tokenizer.eos_token_id]])
            mask = torch.ones_like(ids) if with_mask else None
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=lines.ids(ids),
                               use_cache=False).logits
            targets = ids[0, len(prompt):]
            total += float(torch.nn.functional.cross_entropy(logits[0, len(prompt) - 1:-1], targets,
                                                             reduction="sum"))
        return total / len(records)

    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    logged = [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
    assert logged == pytest.approx(held_out_loss(with_mask=True), rel=1e-4)
    assert abs(logged - held_out_loss(with_mask=False)) > 1e-3


def test_a_malformed_dataset_stops_before_training(tmp_path, dataset):
    bad = tmp_path / "bad_train.json"
    bad.write_text(json.dumps([{"input": "1 + 1\nAnswer: ", "output": "2"}, {"input": "2 + 2\nAnswer: "}]))
    with pytest.raises(DatasetError, match=r"bad_train.json: record 1 has no 'output' key"):
        run(config(tmp_path, f"{dataset},{bad}"))
    assert not os.path.exists(tmp_path / "run" / "final") and not os.path.exists(tmp_path / "run" / "config.yaml")


def test_command_line_keeps_relative_paths_and_reports_bad_files_in_one_line(tmp_path, dataset):
    (tmp_path / "data").mkdir()
    for suffix in ("train", "test", "meta"):
        source = dataset.replace("_train.json", f"_{suffix}.json")
        (tmp_path / "data" / os.path.basename(source)).write_text(open(source).read())
    relative = "data/" + os.path.basename(dataset)
    command = [sys.executable, os.path.join(ROOT, "train.py"), *SMALL_MODEL, f"datasets=[{relative}]",
               "exp_name=cli", "batch_size=8", "n_examples=16", "eval_every=0", "num_threads=1"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.isfile(tmp_path / "runs" / "cli" / "final" / "model.safetensors")
    assert json.load(open(tmp_path / "runs" / "cli" / "data_meta.json"))[0]["path"] == relative
    assert sorted(os.listdir(tmp_path)) == ["data", "runs"]  # Hydra wrote no outputs/ of its own

    # The same command again does not train over the finished run; overwrite=true starts it over.
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    assert again.stderr.strip().splitlines()[-1].startswith("error: run_dir=runs/cli holds a run (final")
    final_weights = weights(tmp_path / "runs" / "cli" / "final")
    over = subprocess.run([*command, "overwrite=true", "seed=1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert over.returncode == 0, over.stderr[-2000:]
    with pytest.raises(AssertionError):
        assert_same_weights(final_weights, weights(tmp_path / "runs" / "cli" / "final"))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "runs" / "cli" / "metrics.jsonl")]
    assert steps == sorted(steps)  # the old run's log went with it

    # resume= continues the run as it was configured: its n_examples and lr, not the defaults.
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *SMALL_MODEL,
                              f"datasets=[{relative}]", "resume=runs/cli", "n_epochs=3"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    saved = OmegaConf.load(tmp_path / "runs" / "cli" / "config.yaml")
    assert (saved.n_examples, saved.batch_size, saved.seed, saved.n_epochs) == (16, 8, 1, 3)
    refused = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *SMALL_MODEL,
                              f"datasets=[{relative}]", "resume=runs/cli", "lr=0.01"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.stderr.strip().splitlines()[-1].startswith("error: resume=runs/cli trained lr=0.001, not 0.01")

    (tmp_path / "data" / "broken_train.json").write_text("[{\"input\": \"1\", ")
    command[command.index(f"datasets=[{relative}]")] = "datasets=[data/broken_train.json]"
    command[command.index("exp_name=cli")] = "exp_name=broken"
    failed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert failed.stderr.strip().splitlines()[-1].startswith("error: data/broken_train.json: not JSON")


@pytest.mark.parametrize("model", sorted(name[:-5] for name in os.listdir(os.path.join(ROOT, "config", "model"))))
def test_every_model_config_composes_with_the_papers_key_names(model):
    cfg = compose_config([f"model={model}"])
    assert cfg.model.name == model
    for key in ("exp_name", "datasets", "seed", "batch_size", "gradient_accumulation_steps", "eval_batch_size",
                "n_eval_examples", "n_examples", "n_epochs", "eval_every", "lr", "warmup_steps", "max_grad_norm",
                "max_length", "max_prompt_length", "lora.enabled", "lora.lora_r", "lora.lora_alpha", "lora.lora_dropout"):
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    if model == "tiny":
        assert cfg.model.from_scratch and not cfg.lora.enabled and cfg.lr == 1e-3
    else:  # hub models: the paper's LoRA settings, target modules named in the YAML
        assert not cfg.model.from_scratch and cfg.model.name_or_path
        assert (cfg.lora.enabled, cfg.lora.lora_r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (True, 64, 64, 0.05)
        assert cfg.model.lora_target_modules
        assert (cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.max_grad_norm, cfg.batch_size) == (2e-4, 0.01, 1, 10.0, 128)
        assert (cfg.n_examples, cfg.n_epochs, cfg.eval_every, cfg.loss_reduction) == (500000, 5, 7936, "sum")
    if model.startswith("llama"):  # the paper's fp32 weights with TF32 matmuls, no bf16 autocast
        assert list(cfg.model.lora_target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert (cfg.model.dtype, cfg.mixed_precision, cfg.tf32) == ("float32", "none", True)


def test_without_held_out_records_no_eval_loss_is_invented_and_bad_options_fail_early(tmp_path):
    plain = write_dataset(tmp_path, "plain", addition_records(random.Random(0), [1, 2], 10))  # no _test file
    run_dir = run(config(tmp_path, plain, "n_eval_examples=0", "n_examples=16"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert rows and not [row for row in rows if "eval/loss" in row]
    with pytest.raises(ValueError, match="loss_reduction must be one of sum, mean, got 'average'"):
        run(config(tmp_path, plain, "n_eval_examples=0", "loss_reduction=average", name="bad"))
    assert not os.path.exists(tmp_path / "bad" / "final")


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size must be a whole number >= 1, got 0"),
    ("n_examples=0", "n_examples must be a whole number >= 1 or null, got 0"),
    ("lr=abc", "lr must be a positive number, got 'abc'"),
    ("keep_checkpoints=-1", "keep_checkpoints must be a whole number >= 0 or null"),
    ("mixed_precision=fp8", "mixed_precision must be one of auto, bf16, none, got 'fp8'"),
    ("distractor_line.share=1.5", "distractor_line.share must be a share in [0, 1], got 1.5"),
    ("compile=yes", "compile must be true or false, got 'yes'"),
    ("gradient_accumulation_steps=3", "batch_size=8 must split evenly into gradient_accumulation_steps=3"),
    pytest.param("device=cuda", "device=cuda: this torch", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a machine with a GPU runs device=cuda")),
])
def test_a_bad_setting_stops_the_run_before_anything_is_written(tmp_path, dataset, override, message):
    from train import SettingError
    with pytest.raises(SettingError, match=re.escape(message)):
        build(config(tmp_path, dataset, override))
    assert not (tmp_path / "run").exists()


def test_a_model_that_cannot_be_loaded_is_one_line_and_leaves_no_run_directory(tmp_path, dataset):
    from train import SettingError
    missing = tmp_path / "no_such_model"
    with pytest.raises(SettingError, match=re.escape(f"model.name_or_path={missing}: cannot load it (")):
        build(config(tmp_path, dataset, "model.from_scratch=false", f"model.name_or_path={missing}"))
    assert not (tmp_path / "run").exists()
