"""A tiny model trained in seconds on a task's oracle records, for the engine's tests and benchmark.

Not the project's trainer (``train.py``): a plain loop with no checkpoints, just enough that the
model writes calls and answers in the task's format, so the engine has realistic work to do.
Records come from ``task.records`` (the same text as the generated datasets); the loss is on the
output and EOS only, as in training::

    input  "37 + 43\\nSolution: "        output "Call: 7 + 3\\n</s>"
"""
from __future__ import annotations

import functools
import random
import time

import torch

from modeling import build_char_tokenizer, build_tiny_model

TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=4096, tie_word_embeddings=False)


def training_records(task, method: str, lengths, problems: int, seed: int) -> list[tuple[str, str]]:
    """The records of ``problems`` problems with lengths drawn uniformly from ``lengths``."""
    rng = random.Random(seed)
    records = []
    for _ in range(problems):
        records.extend(task.records(task.sample(rng, rng.choice(list(lengths))), method))
    return records


def train_quick_model(task, method: str, lengths, seconds: float = 10.0, max_steps: int = 10_000,
                      seed: int = 0, batch_size: int = 32, lr: float = 3e-3, llama_config=None,
                      problems: int = 2000):
    """A char-level Llama trained on ``task``'s ``method`` records for about ``seconds`` (or
    ``max_steps``); returns ``(model, tokenizer)`` in eval mode. Same seed and steps, same model."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(llama_config or TINY, tokenizer, seed)
    records = training_records(task, method, lengths, problems, seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    model.train()
    start, step = time.perf_counter(), 0
    while step < max_steps and time.perf_counter() - start < seconds:
        batch = rng.sample(records, min(batch_size, len(records)))
        prompts = tokenizer([r[0] for r in batch], add_special_tokens=False)["input_ids"]
        outputs = tokenizer([r[1] for r in batch], add_special_tokens=False)["input_ids"]
        width = max(len(p) + len(o) + 1 for p, o in zip(prompts, outputs))
        ids = torch.full((len(batch), width), eos)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (prompt, output) in enumerate(zip(prompts, outputs)):
            sequence = prompt + output + [eos]
            ids[row, :len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt):len(sequence)] = torch.tensor(output + [eos])
            mask[row, :len(sequence)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    model.eval()
    model.config.use_cache = True
    model.quick_training = {"steps": step, "final_loss": float(loss.detach()), "seconds": time.perf_counter() - start}
    return model, tokenizer


@functools.lru_cache(maxsize=4)
def cached_quick_model(task_name: str, method: str, lengths: tuple[int, ...], steps: int, seed: int = 0):
    """``train_quick_model`` for exactly ``steps`` steps (no time limit, so the same model on
    every machine), trained once per process and shared by the tests that need it."""
    from tasks import get_task
    torch.set_num_threads(1)
    return train_quick_model(get_task(task_name), method, lengths, seconds=float("inf"),
                             max_steps=steps, seed=seed, batch_size=16, lr=1e-2)
