"""The tiny model learns: a few hundred steps on small Re-Tuning addition records bring the held-out
loss (on problems it never saw) far below its starting value. Bounded: about 20-40 s on 2 cores."""
import json
import random

from tests.test_train import config
from tests.test_train_fixtures import addition_records, write_dataset
from train import run


def test_tiny_model_brings_held_out_loss_well_below_its_start(tmp_path):
    dataset = write_dataset(tmp_path, "addition_retuning_small", addition_records(random.Random(0), [1, 2, 3, 4], 150),
                            test=addition_records(random.Random(1), [2, 3, 4], 20))
    run_dir = run(config(tmp_path, dataset, "model.llama_config.hidden_size=64",
                         "model.llama_config.intermediate_size=256", "batch_size=32", "n_examples=9600",
                         "eval_every=3200", "save_every=0", "lr=3e-3", "warmup_steps=20", "log_every=50"))
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    held_out = [row["eval/loss"] for row in rows if "eval/loss" in row]
    assert [row["step"] for row in rows if "eval/loss" in row] == [0, 100, 200, 300]
    assert held_out[0] > 4.0  # about ln(98): uniform over the vocabulary at the start
    assert held_out[-1] < 0.15 * held_out[0], held_out  # measured: 4.59 -> 0.43
    assert held_out[1] > held_out[-1]
