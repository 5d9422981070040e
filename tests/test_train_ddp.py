"""torchrun DDP on 2 CPU processes (gloo) trains the same weights as 1 process, same global batch.

About 15 s: two fresh Python processes import torch and transformers; the training is 6 steps.
"""
import json
import os
import random
import subprocess
import sys

import pytest

from tests.test_train import ROOT, SMALL_MODEL, assert_same_weights, config, weights
from tests.test_train_fixtures import addition_records, write_dataset
from train import run


def test_two_gloo_processes_match_one_process(tmp_path):
    dataset = write_dataset(tmp_path, "addition_retuning_ddp", addition_records(random.Random(0), [1, 2, 3], 10),
                            test=addition_records(random.Random(1), [2], 3))
    common = ["n_examples=48", "eval_every=24", "save_every=0", "gradient_accumulation_steps=2",
              "loss_reduction=sum"]
    single = run(config(tmp_path, dataset, *common, name="single"))

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train.py"), *SMALL_MODEL, f"datasets=[{dataset}]", f"run_dir={tmp_path / 'ddp'}",
               "batch_size=8", "n_epochs=100", "log_every=2", "num_threads=1", "warmup_steps=2",
               # 9 held-out records in batches of 4: one process evaluates 2 batches, the other 1
               "eval_batch_size=4", "mixed_precision=none", *common]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) on cpu" in done.stdout
    # Each process computed half of every microbatch; summation order differs, nothing else.
    assert_same_weights(weights(f"{single}/final"), weights(f"{tmp_path / 'ddp'}/final"), atol=2e-6)
    assert os.path.isfile(tmp_path / "ddp" / "final" / "rng_state_1.pt")

    # The held-out loss is split across the processes and summed back: the same numbers.
    single_eval, ddp_eval = ([json.loads(line)["eval/loss"] for line in open(f"{d}/metrics.jsonl") if "eval/loss" in line]
                             for d in (single, tmp_path / "ddp"))
    assert len(single_eval) == len(ddp_eval) == 3
    assert ddp_eval == [pytest.approx(loss, abs=1e-4) for loss in single_eval]


def test_two_processes_finish_when_one_has_no_held_out_batch(tmp_path):
    """One batch of held-out records for two processes: the second evaluates nothing and waits in
    the sum while the first evaluates; with DDP's forward (a collective) there, both hung."""
    dataset = write_dataset(tmp_path, "addition_retuning_ddp", addition_records(random.Random(0), [1, 2, 3], 10),
                            test=addition_records(random.Random(1), [2], 3))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train.py"), *SMALL_MODEL, f"datasets=[{dataset}]", f"run_dir={tmp_path / 'ddp'}",
               "batch_size=8", "n_examples=32", "eval_every=16", "save_every=0", "num_threads=1",
               "eval_batch_size=256"]  # the trainer's own precision: bf16 autocast where the CPU has it
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    evals = [json.loads(line)["eval/loss"] for line in open(tmp_path / "ddp" / "metrics.jsonl") if "eval/loss" in line]
    assert len(evals) >= 2 and all(0 < loss < 100 for loss in evals)
