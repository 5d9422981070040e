"""A tiny model trained in seconds on a task's oracle records, for the engine's tests and benchmark.

It goes through the project's trainer (``train.py``'s ``run``) with a smaller model and a short
budget, so that the model writes calls and answers in the task's format and the engine has
realistic work to do. Records come from ``task.records`` (the same text as the generated
datasets)::

    input  "37 + 43\\nSolution: "        output "Call: 7 + 3\\n"

The model uses ordinary positions (``line_position_stride=0``) so that ``model.generate``, the
one-at-a-time reference the engine is compared with, decodes it as the engine does.
"""
from __future__ import annotations

import functools
import json
import os
import random
import tempfile

TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            line_position_stride=0)


def training_records(task, method: str, lengths, problems: int, seed: int) -> list[dict]:
    """The records of ``problems`` problems with lengths drawn uniformly from ``lengths``."""
    rng = random.Random(seed)
    records = []
    for _ in range(problems):
        records += [{"input": i, "output": o}
                    for i, o in task.records(task.sample(rng, rng.choice(list(lengths))), method)]
    return records


def train_quick_model(task, method: str, lengths, steps: int, seed: int = 0, batch_size: int = 16,
                      lr: float = 3e-3, llama_config: dict | None = None, problems: int = 2000):
    """A char-level Llama trained on ``task``'s ``method`` records for ``steps`` steps of
    ``batch_size`` (constant ``lr``, one thread); returns ``(model, tokenizer)`` in eval mode.
    Same arguments, same model on one kind of CPU. (lr 1e-2, the default until session 25,
    taught the tests' parity model to call on AMD CPUs and left it writing no call at all on an
    Intel Xeon with AMX, whose fp32 kernels round otherwise; 3e-3 teaches it there, a smaller
    step being less at the mercy of rounding. No AMD CPU was at hand to check it on.)"""
    from modeling import load_checkpoint
    from train import compose_config, run
    records = training_records(task, method, lengths, problems, seed)
    model_overrides = [f"model.llama_config.{key}={value}" for key, value in (llama_config or TINY).items()]
    with tempfile.TemporaryDirectory() as folder:
        data_path = os.path.join(folder, "quick_train.json")
        with open(data_path, "w") as handle:
            json.dump(records, handle)
        cfg = compose_config(model_overrides + [
            f"datasets=[{data_path}]", f"run_dir={os.path.join(folder, 'run')}", f"seed={seed}",
            f"batch_size={batch_size}", "gradient_accumulation_steps=1", f"n_examples={steps * batch_size}",
            f"lr={lr}", "lr_schedule=constant", "warmup_steps=0", "weight_decay=0", "loss_reduction=mean",
            "n_eval_examples=0", "eval_every=0", "eval_at_start=false", "num_threads=1",
            # Packing (or bf16) gives the same gradients up to rounding, but 300 steps at lr 1e-2
            # amplify rounding into another model; the tests' expectations were set on padded
            # fp32 batches.
            "pack_records=false", "mixed_precision=none",
            f"log_every={steps + 1}"])
        model, tokenizer = load_checkpoint(os.path.join(run(cfg), "final"))
    model.config.use_cache = True
    return model, tokenizer


@functools.lru_cache(maxsize=4)
def cached_quick_model(task_name: str, method: str, lengths: tuple[int, ...], steps: int, seed: int = 0):
    """``train_quick_model``, trained once per process and shared by the tests that need it."""
    from tasks import get_task
    return train_quick_model(get_task(task_name), method, lengths, steps=steps, seed=seed)
