"""Benchmark: the batched Call/Return engine against one-problem-at-a-time recursion.

    python bench/bench_engine.py                       # trains a tiny model first (~3 min)
    python bench/bench_engine.py --checkpoint /tmp/add_model --samples 5
    python bench/bench_engine.py --train-steps 1500 --save-model /tmp/add_model

Same model, same problems (addition Re-Tuning, lengths 2-20, 20 problems per length, seed 0),
greedy, one process, measured in this order:

* ``batched``: ``run_engine`` + ``HFBackend`` (every context needing a generation in one round,
  batched, KV cache of a parent reused by its continuation);
* ``batched, no KV reuse``: the same, every continuation re-encoded from scratch;
* ``sequential``: ``protocol.solve`` per problem with ``model.generate`` per context (the original
  code's way), the named baseline.

After an untimed warm-up on one problem per length, each batched engine is timed twice
(alternating) and its faster run kept; the sequential run (minutes) is timed once.

It prints problems/s of each, the speedup over ``sequential``, the share of prompt tokens
encoded with KV reuse against re-encoding every continuation, and how many problems got a
different answer (greedy: should be none). The model is a tiny char-level Llama trained here (through the
project's trainer) for ``--train-steps`` on addition Re-Tuning records of lengths 1-20, so that it calls itself through
every problem length like a trained model does (its sums are mostly wrong: only throughput is
measured); or any checkpoint passed with ``--checkpoint``. Threads default to 1: on a 2-core
machine shared with other jobs, two threads oversubscribe and make every timing erratic.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluation.backends import HFBackend, HFSequentialBackend  # noqa: E402
from evaluation.cli import load_eval_config  # noqa: E402
from evaluation.engine import LimitRules, run_engine, sample_problems, solve_sequentially  # noqa: E402
from evaluation.quick_model import TINY, train_quick_model  # noqa: E402
from tasks import get_task, parse_lengths  # noqa: E402


def load_model(args):
    if args.checkpoint:
        from evaluation.cli import resolve_checkpoint
        from modeling import load_checkpoint
        model, tokenizer = load_checkpoint(resolve_checkpoint(args.checkpoint)[0], dtype="float32", merge_lora=True)
        return model, tokenizer, f"checkpoint {args.checkpoint}"
    config = dict(TINY, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                  num_hidden_layers=args.layers)
    print(f"training a tiny model for {args.train_steps} steps on addition Re-Tuning records, "
          f"lengths 1-20 ...", flush=True)
    start = time.perf_counter()
    model, tokenizer = train_quick_model(get_task("addition"), "retuning", range(1, 21),
                                         steps=args.train_steps, seed=args.seed, lr=5e-3,
                                         batch_size=32, llama_config=config)
    seconds = time.perf_counter() - start
    if args.save_model:
        model.save_pretrained(args.save_model)
        tokenizer.save_pretrained(args.save_model)
    return model, tokenizer, (f"tiny Llama (hidden {args.hidden}, {args.layers} layers) trained "
                              f"{args.train_steps} steps / {seconds:.0f} s")


def measure(name, runner, backend, task, problems, limits_for):
    start = time.perf_counter()
    results = runner(backend, task, "retuning", problems, limits_for, progress=False)
    seconds = time.perf_counter() - start
    print(f"  {name}: {seconds:.1f} s", flush=True)
    return dict(name=name, seconds=seconds, results=results,
                prompt_tokens=sum(r.prompt_tokens for r in results),
                computed=sum(r.prompt_tokens_computed for r in results))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a saved model (or a run directory: its final/) to use instead of training one")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--save-model", help="save the model trained here (reuse with --checkpoint)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lengths", default="2-20")
    parser.add_argument("--samples", type=int, default=20, help="problems per length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-sequential", action="store_true", help="batched runs only (no ratio)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    task = get_task("addition")
    model, tokenizer, description = load_model(args)
    model.eval()
    model.set_attn_implementation("eager")  # both engines alike (HFBackend's CPU default)
    problems = sample_problems(task, parse_lengths(args.lengths), args.samples, args.seed)
    rules = LimitRules(**load_eval_config("addition")["limits"])
    sizing = HFSequentialBackend(model, tokenizer)
    limits = {id(p): rules.for_problem(task, "retuning", p, sizing) for p in problems}
    limits_for = lambda problem: limits[id(problem)]  # noqa: E731

    print(f"model: {description}; {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"problems: addition Re-Tuning, lengths {args.lengths}, {args.samples} per length "
          f"({len(problems)}), greedy, {args.threads} thread(s), batch size {args.batch_size}")
    # Warm-up (untimed): the first forward passes of a process pay for allocator and kernel setup.
    warm = problems[::args.samples]
    for reuse in (True, False):
        run_engine(HFBackend(model, tokenizer, batch_size=args.batch_size, reuse_cache=reuse), task,
                   "retuning", warm, limits_for, progress=False)
    solve_sequentially(HFSequentialBackend(model, tokenizer), task, "retuning", warm[:2], limits_for,
                       progress=False)
    # The two batched runs take seconds, so a burst of load from other jobs moves them a lot:
    # each is measured twice, alternating, and the faster kept (the sequential run is long).
    batched = {}
    for _ in range(2):
        for name, reuse in (("batched", True), ("batched, no KV reuse", False)):
            run = measure(name, run_engine, HFBackend(model, tokenizer, batch_size=args.batch_size,
                                                      reuse_cache=reuse), task, problems, limits_for)
            if name not in batched or run["seconds"] < batched[name]["seconds"]:
                batched[name] = run
    runs = list(batched.values())
    if not args.skip_sequential:
        runs.append(measure("sequential (model.generate)", solve_sequentially,
                            HFSequentialBackend(model, tokenizer), task, problems, limits_for))

    first = runs[0]["results"]
    print(f"\nworkload: {sum(r.calls for r in first) / len(first):.1f} calls and "
          f"{sum(r.generated_tokens for r in first) / len(first):.0f} generated tokens per problem, "
          f"{sum(len(r.trace) for r in first)} generations, accuracy "
          f"{100 * sum(r.correct for r in first) / len(first):.1f}%")
    baseline = runs[-1]
    print(f"\n{'engine':<28} {'seconds':>8} {'problems/s':>11} {'speedup':>8} "
          f"{'prompt tokens encoded':>22} {'share':>6} {'answers differ':>15}")
    for run in runs:
        speedup = baseline["seconds"] / run["seconds"] if not args.skip_sequential else float("nan")
        differ = sum((a.final_text, a.failure) != (b.final_text, b.failure)
                     for a, b in zip(run["results"], baseline["results"]))
        print(f"{run['name']:<28} {run['seconds']:8.1f} {len(problems) / run['seconds']:11.2f} "
              f"{speedup:7.1f}x {run['computed']:>22,} {run['computed'] / run['prompt_tokens']:6.1%} "
              f"{differ:>15}")
    print(f"\nKV reuse encodes {runs[0]['computed']:,} of {runs[0]['prompt_tokens']:,} prompt tokens "
          f"({runs[0]['computed'] / runs[0]['prompt_tokens']:.1%}); re-encoding every continuation "
          f"encodes all of them (100%).")


if __name__ == "__main__":
    main()
