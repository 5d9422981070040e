"""Check the GPU path at the paper's scale, with no download: LoRA training of a LLaMA-7B-shaped
model through ``train.py model=llama7b`` (fp32 weights + TF32 as the paper, and bf16 weights),
then recursive evaluation of the adapter with ``evaluate_addition.py`` in fp16.

    python bench/gpu_check.py --out gpu_check            # on a machine with one 40 GB+ GPU
    python bench/gpu_check.py --runs bf16:4,bf16:8,bf16:16,bf16:32 --no-eval   # microbatch sweep

The weights are random (LLaMA-7B's shape: hidden 4096, 32 layers, 32 heads, intermediate
11008, vocabulary 32000) and saved as a local Hugging Face checkpoint, so the run goes through
exactly the ``from_pretrained`` path a user's ``huggyllama/llama-7b`` takes; only the tokenizer is
the project's character tokenizer. Prints tokens/s, records/s and peak GPU memory per setting, and for each run the speedup of its
microbatch size over the paper's microbatch of 4 with the same weights' dtype (the named baseline; the global batch and so
the loss are the same, only the split into accumulation steps differs).
``--small`` shrinks the model to check the script itself on a CPU; without it the script needs
CUDA. Everything it makes (data, the random checkpoint, runs, logs, ``report.json`` with the
model's shape) stays under ``--out``; a rerun keeps the checkpoint and trains the runs again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000, max_position_embeddings=2048)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=32000, max_position_embeddings=2048)


def make_random_checkpoint(path: str, shape: dict) -> float:
    """A randomly initialised Llama saved in bf16 with the char tokenizer; returns seconds taken."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from modeling import build_char_tokenizer
    start = time.time()
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # else this process keeps ~26 GB that the training runs below need
    return time.time() - start


def run(command: list[str], log_path: str) -> float:
    start = time.time()
    with open(log_path, "w") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}; see {log_path}")
    return time.time() - start


def train_metrics(run_dir: str) -> dict:
    """Mean throughput over the logged training steps after the first (warm-up) one."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = [row for row in rows if "tokens_per_s" in row][1:] or [row for row in rows if "tokens_per_s" in row]
    peak = max((row.get("cuda_max_memory_gb", 0) for row in rows), default=0)
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in train) / len(train),
            "records_per_s": sum(r["records_per_s"] for r in train) / len(train),
            "padding_share": sum(r["padding_share"] for r in train) / len(train),
            "cuda_max_memory_gb": peak, "steps_logged": len(train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--small", action="store_true", help="a tiny model: checks the script on a CPU")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--runs", default="fp32:4,bf16:4",
                        help="training runs as weights:microbatch, comma-separated (fp32 runs use TF32)")
    parser.add_argument("--train-args", default="", help="extra train.py overrides, space-separated")
    parser.add_argument("--no-eval", action="store_true", help="skip the recursive evaluation")
    args = parser.parse_args()
    import torch
    if not args.small and not torch.cuda.is_available():
        sys.exit("error: no CUDA device: this check builds a LLaMA-7B-shaped model (--small checks "
                 "the script on a CPU)")
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    python = sys.executable
    shape = SMALL if args.small else LLAMA_7B
    report: dict = {"model_shape": shape}

    data = os.path.join(work, "data")
    run([python, "data_generation/generate_addition.py", "--methods", "retuning", "--preset", "small",
         "--out-dir", data, "--quiet"], os.path.join(out, "generate.log"))
    # Named by its shape, so that a checkpoint of the other size is never taken for this one.
    checkpoint = os.path.join(work, "random-" + "-".join(f"{key[0]}{value}" for key, value in shape.items()))
    if not os.path.exists(os.path.join(checkpoint, "config.json")):
        report["make_checkpoint_s"] = make_random_checkpoint(checkpoint, shape)

    batch = 32  # a small global batch keeps the check short
    dtypes = {"fp32": "float32", "bf16": "bfloat16"}
    settings = [(f"{weights}_micro{micro}", dtypes[weights], int(micro))
                for weights, micro in (run.split(":") for run in args.runs.split(","))]
    for name, dtype, micro in settings:
        run_dir = os.path.join(work, f"runs/{name}")
        seconds = run([python, "train.py", "model=llama7b", f"model.name_or_path={checkpoint}",
                       "model.tokenizer=char", f"model.dtype={dtype}",
                       f"datasets=[{data}/addition_retuning_small_train.json]", f"run_dir={run_dir}",
                       f"batch_size={batch}", f"gradient_accumulation_steps={batch // micro}",
                       f"n_examples={batch * args.steps}", "eval_every=100000", "n_eval_examples=64",
                       "eval_batch_size=16", "log_every=1", "eval_at_start=false", "overwrite=true", *args.train_args.split()],
                      os.path.join(out, f"train_{name}.log"))
        report[name] = {"wall_s": seconds, **train_metrics(run_dir)}
        baseline = name.split("_")[0] + "_micro4"
        if name != baseline and baseline in report:
            report[name]["speedup_over_micro4"] = report[name]["records_per_s"] / report[baseline]["records_per_s"]
        print(name, json.dumps(report[name]), flush=True)
    with open(os.path.join(out, "report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    if args.no_eval:
        return

    # The last run's adapter, evaluated recursively in fp16 on the GPU.
    seconds = run([python, "evaluation/evaluate_addition.py", "--checkpoint", os.path.join(work, "runs", settings[-1][0]),
                   "--lengths", "2-4", "--samples", "4", "--dtype", "float16" if not args.small else "float32",
                   "--max-new-tokens", "24", "--out", os.path.join(out, "eval"), "--quiet"],
                  os.path.join(out, "evaluate.log"))
    results = json.load(open(os.path.join(out, "eval", "results.json")))
    report["evaluate"] = {"wall_s": seconds, "device": results["settings"].get("device"),
                          "dtype": results["settings"].get("dtype"), "problems": results["summary"]["problems"],
                          "failures": results["summary"]["failures"]}
    with open(os.path.join(out, "report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
