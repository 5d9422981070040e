"""Training throughput: random batches padded (the named baseline), random batches packed several
records to a row (``pack_records``), length-grouped batches, and packed batches under bf16 autocast
(``mixed_precision=bf16``; the others fp32), eager and compiled (``compile=true``), on the same
data; and tokens per record of each method (the paper's point that Re-Tuning trains on fewer
tokens than the scratchpad).

    python bench/bench_train.py                                # addition, small preset, tiny model, CPU
    python bench/bench_train.py --task dp --steps 60 --batch-size 32
    python bench/bench_train.py --data-dir data --preset paper  # existing files, no generation

Every throughput run uses the real trainer with the same config and seed, differing only in
``group_by_length``, ``pack_records``, ``mixed_precision`` and ``compile``; its first two steps
are a warm-up and are left out. tokens/s counts real (non-padding) tokens, so padding removed
shows up as speed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modeling import build_char_tokenizer  # noqa: E402
from preference_datasets import read_records, tokenize_records  # noqa: E402
from tasks.base import METHODS  # noqa: E402
from train import build, compose_config  # noqa: E402
from utils import cpu_has_native_bf16  # noqa: E402


def dataset_paths(task: str, args, folder: str) -> dict[str, str]:
    """The training file of each method, generated into ``folder`` unless --data-dir has them."""
    source = args.data_dir or folder
    if not args.data_dir:
        subprocess.run([sys.executable, os.path.join(ROOT, "data_generation", "generate.py"), "--task", task,
                        "--preset", args.preset, "--seed", str(args.seed), "--out-dir", folder],
                       check=True, stdout=subprocess.DEVNULL)
    paths = {m: os.path.join(source, f"{task}_{m}_{args.preset}_train.json") for m in METHODS}
    return {m: p for m, p in paths.items() if os.path.isfile(p)}


def tokens_per_record(task: str, paths: dict[str, str], tokenizer) -> None:
    print(f"\n{task}: tokens per record (character tokenizer; EOS counted; loss tokens = output + EOS)")
    print(f"{'method':<11}{'records':>9}{'problems':>9}{'mean tok':>10}{'max tok':>9}{'mean loss tok':>15}"
          f"{'tokens/problem':>16}")
    for method, path in paths.items():
        data = tokenize_records(read_records(path), tokenizer, max_length=10 ** 9, max_prompt_length=10 ** 9)
        meta_path = path.replace("_train.json", "_meta.json")
        problems = json.load(open(meta_path)).get("n_train_problems") if os.path.isfile(meta_path) else None
        total = int(data.lengths.sum())
        per_problem = f"{total / problems:16.1f}" if problems else f"{'-':>16}"
        print(f"{method:<11}{len(data):>9}{problems or '-':>9}{data.lengths.mean():>10.1f}{data.lengths.max():>9}"
              f"{(data.lengths - data.prompt_lengths).mean():>15.1f}{per_problem}")


# fp32 unless named: "packed, bf16" differs from "random, packed" only in bf16 autocast, and
# "bf16, compiled" from it only in torch.compile (whose compile its warm-up steps take).
BATCHINGS = {"random": ["group_by_length=false", "pack_records=false", "mixed_precision=none"],
             "random, packed": ["group_by_length=false", "pack_records=true", "mixed_precision=none"],
             "length-grouped": ["group_by_length=true", "pack_records=false", "mixed_precision=none"],
             "packed, bf16": ["group_by_length=false", "pack_records=true", "mixed_precision=bf16"],
             "bf16, compiled": ["group_by_length=false", "pack_records=true", "mixed_precision=bf16", "compile=true"]}


def throughput(path: str, args, folder: str, batching: str, round_: int) -> dict:
    """Train ``args.steps`` steps; real tokens per second of wall time and of process CPU time
    (the latter is steadier on a shared machine), and the padding share of computed tokens."""
    cfg = compose_config([f"model={args.model}", f"datasets=[{path}]", f"run_dir={folder}/run-{batching.replace(', ', '-')}-{round_}",
                          f"batch_size={args.batch_size}", "gradient_accumulation_steps=1",
                          f"n_examples={args.steps * args.batch_size}", "n_epochs=1000", "eval_every=0",
                          "save_every=0", "eval_at_start=false", f"log_every={args.steps}", "n_eval_examples=8",
                          *BATCHINGS[batching], f"seed={args.seed}",
                          f"num_threads={args.threads}" if args.threads else "num_threads=null"])
    trainer = build(cfg)
    trainer.total_steps = 2  # warm-up: the first steps pay for allocations
    trainer.train()
    trainer.total_steps, trainer.start_step = args.steps, 2
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    trainer.logger.close()
    plan = [trainer.batch_at(step) for step in range(2, args.steps)]
    _, _, tokens, computed = sum(trainer.counts(trainer.train_data, b) for b in plan)
    return {"wall": tokens / wall, "cpu": tokens / cpu, "padding": 1 - tokens / computed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="addition", help="the task of the throughput runs")
    parser.add_argument("--token-tasks", default="addition,dp,parity", help="tasks of the tokens-per-record table")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--data-dir", help="use <task>_<method>_<preset>_train.json files from here")
    parser.add_argument("--method", default="retuning", help="the training file the throughput runs use")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the batchings this many times")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_char_tokenizer()
        for task in [t for t in args.token_tasks.split(",") if t]:
            tokens_per_record(task, dataset_paths(task, args, folder), tokenizer)
        paths = dataset_paths(args.task, args, folder)
        if args.method not in paths:
            sys.exit(f"error: no {args.method} training file for {args.task} / {args.preset}")
        results = {batching: [] for batching in BATCHINGS}
        for round_ in range(args.rounds):
            for batching in BATCHINGS:
                results[batching].append(throughput(paths[args.method], args, folder, batching, round_))
    print(f"\nThroughput on {os.path.basename(paths[args.method])}, model={args.model}, batch {args.batch_size}, "
          f"{args.steps - 2} timed steps x {args.rounds} rounds (medians; real tokens = not padding)")
    print(f"{'batches':<16}{'tokens/s wall':>15}{'tokens/CPU-s':>14}{'padding share':>15}{'vs random (wall)':>18}")
    median = {b: {k: statistics.median(r[k] for r in results[b]) for k in ("wall", "cpu", "padding")} for b in results}
    for batching, m in median.items():
        print(f"{batching:<16}{m['wall']:>15.0f}{m['cpu']:>14.0f}{m['padding']:>15.1%}"
              f"{m['wall'] / median['random']['wall']:>17.2f}x")
    bf16_ratio = median["packed, bf16"]["wall"] / median["random, packed"]["wall"]
    print(f"bf16 autocast vs fp32, both packed: {bf16_ratio:.2f}x (this CPU {'has' if cpu_has_native_bf16() else 'lacks'}"
          " native bf16; mixed_precision=auto uses it only if it has)")
    compile_ratio = median["bf16, compiled"]["wall"] / median["packed, bf16"]["wall"]
    print(f"torch.compile vs eager, both packed bf16: {compile_ratio:.2f}x (compile time left out)")


if __name__ == "__main__":
    main()
