"""What ``evaluate_addition.py``, ``evaluate_dp.py`` and ``evaluate_parity.py`` share: flags,
checkpoint and run-metadata reading, writing ``results.json`` and ``accuracy.png``.

    python evaluation/evaluate_addition.py --checkpoint runs/add_rt
    python evaluation/evaluate_parity.py --checkpoint runs/par_rt/step-7936 --lengths 2-40 --samples 50
    python evaluation/evaluate_addition.py --show-trace 3 --out results/add_rt    # from results.json
    python evaluation/evaluate_dp.py --oracle --method retuning --lengths 2-24      # the task's oracle

Defaults (lengths, problems per length, limits) come from ``config/evaluation/<task>.yaml``; the
task, method and trained lengths from the run's ``data_meta.json``; flags override both.
``evaluate_checkpoint`` is the same thing as a Python call.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from evaluation.engine import LimitRules, evaluate, format_trace
from tasks import METHODS, get_task, parse_lengths
from utils import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "config" / "evaluation"
EVAL_DTYPES = ("auto", "float32", "float16", "bfloat16")
EVAL_DEVICES = r"auto|cpu|cuda(:\d+)?|mps"  # a pattern: cuda:1 too


# --- small parsers --------------------------------------------------------------------------


def load_eval_config(task_name: str) -> dict:
    """``config/evaluation/<task>.yaml`` as a plain dict."""
    from omegaconf import OmegaConf
    path = CONFIG_DIR / f"{task_name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no evaluation config for task {task_name!r}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


# --- checkpoints and run metadata -----------------------------------------------------------
def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None, str]:
    """``(checkpoint dir, run dir or None, run name)`` for a run directory (its ``final/``) or one
    checkpoint folder (``step-<n>/``, ``final/``, or any saved model). The run name of a step
    checkpoint carries the step: ``runs/add_rt/step-7936`` -> ``"add_rt_step-7936"``."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"error: --checkpoint {path}: no such directory")
    if _is_checkpoint(path):
        parent = path.resolve().parent
        run_dir = parent if (parent / "data_meta.json").is_file() or (parent / "config.yaml").is_file() else None
        if run_dir is None:
            return path, None, path.resolve().name
        name = run_dir.name if path.resolve().name == "final" else f"{run_dir.name}_{path.resolve().name}"
        return path, run_dir, name
    if _is_checkpoint(path / "final"):
        return path / "final", path, path.resolve().name
    steps = sorted((p.name for p in path.glob("step-*") if _is_checkpoint(p)),
                   key=lambda name: int(name.split("-")[1]) if name.split("-")[1].isdigit() else -1)
    if steps:
        raise SystemExit(f"error: --checkpoint {path}: no final/ checkpoint; pass one of "
                         f"{', '.join(str(path / s) for s in steps)}")
    raise SystemExit(f"error: --checkpoint {path}: neither a run directory (with final/) nor a "
                     f"checkpoint (config.json or adapter_config.json)")


def read_run_metadata(run_dir: Path | None, task_name: str) -> dict:
    """``{"methods": [...], "train_lengths": [...]}`` of the run's datasets for ``task_name``,
    from ``data_meta.json`` (a list with one object per training dataset); empty when absent, and
    with empty lists when no dataset names a task (``[{"path": "my_records.json"}]``)."""
    if run_dir is None or not (run_dir / "data_meta.json").is_file():
        return {}
    file = run_dir / "data_meta.json"
    try:
        with open(file) as handle:
            entries = json.load(handle)
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: {file}: not valid JSON ({error})")
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise SystemExit(f"error: {file}: expected a list of objects, one per training dataset")
    mine = [e for e in entries if e.get("task") == task_name]
    # A dataset the generators did not write (a user's own .json) names no task: no evidence
    # against task_name, so only datasets of other tasks are an error.
    found = sorted({e["task"] for e in entries if e.get("task")})
    if found and not mine:
        raise SystemExit(f"error: {file}: the run was trained on task {', '.join(found)}, "
                         f"not {task_name}")
    methods = sorted({e["method"] for e in mine if e.get("method")})
    lengths = sorted({int(n) for e in mine for n in (e.get("train_lengths") or [])})
    return {"methods": methods, "train_lengths": lengths}


# --- running --------------------------------------------------------------------------------
def warn_where_limits_stop_the_oracle(task, method: str, lengths: list[int], seed: int, rules: LimitRules) -> None:
    """A warning on stderr where the limits stop even a perfect model at the longest length (DP's
    fixed depth of 35, SPEC's, cuts every list of 36 items or more), so that its 0% there is not
    read as the model's."""
    from evaluation.backends import OracleBackend
    longest = max(lengths)
    result = evaluate(OracleBackend(task, method), task, method, [longest], 1, seed, rules, progress=False)
    stopped = result["lengths"][str(longest)]["failures"]
    if stopped:
        print(f"warning: at length {longest} the limits stop even the task's oracle ({', '.join(stopped)}); "
              "every problem that long counts as wrong: raise --max-depth / --max-calls / "
              "--max-new-tokens or evaluate shorter lengths", file=sys.stderr)


def pick_dtype(dtype: str, device: str) -> str:
    """``auto``: float16 on a GPU (as the paper evaluated), float32 on a CPU."""
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    return dtype


def evaluate_checkpoint(task_name: str, checkpoint: str | None = None, method: str | None = None,
                        lengths=None, samples: int | None = None, seed: int = 0,
                        batch_size: int | None = None, temperature: float = 0.0,
                        device: str = "auto", dtype: str = "auto", out: str | None = None,
                        train_lengths=None, limits: dict | None = None, reuse_cache: bool = True,
                        sequential: bool = False, oracle: bool = False, progress: bool = True,
                        kv_cache_budget: int | None = None) -> dict:
    """Evaluate a checkpoint (or, with ``oracle``, the task's oracle) and write
    ``<out>/results.json`` and ``<out>/accuracy.png``; returns the results dict."""
    task = get_task(task_name)
    config = load_eval_config(task_name)
    info: dict = {"task": task_name}
    if oracle:
        run_name = f"{task_name}_oracle"
        meta = {}
    else:
        if checkpoint is None:
            raise SystemExit("error: --checkpoint is required (or --oracle)")
        checkpoint_dir, run_dir, run_name = resolve_checkpoint(checkpoint)
        meta = read_run_metadata(run_dir, task_name)
        info.update(checkpoint=str(checkpoint_dir), run_dir=str(run_dir) if run_dir else None)
    if method is None:
        methods = meta.get("methods") or []
        if len(methods) != 1:
            where = "the run's data_meta.json" if meta else "no data_meta.json"
            raise SystemExit(f"error: --method is needed ({where} gives {methods or 'no method'})")
        method = methods[0]
    if method not in METHODS:
        raise SystemExit(f"error: --method {method!r}: one of {', '.join(METHODS)}")
    if oracle:
        run_name = f"{task_name}_{method}_oracle"
    defaults = config["methods"][method]
    lengths = parse_lengths(lengths if lengths is not None else defaults["lengths"])
    samples = int(samples if samples is not None else defaults["samples"])
    if samples < 1:
        raise SystemExit(f"error: --samples must be >= 1, got {samples}")
    trained = parse_lengths(train_lengths) if train_lengths else meta.get("train_lengths") or None
    rules = LimitRules(**{**config["limits"], **{k: v for k, v in (limits or {}).items() if v is not None}})
    batch_size = int(batch_size or config.get("batch_size", 64))

    warn_where_limits_stop_the_oracle(task, method, lengths, seed, rules)
    if oracle:
        from evaluation.backends import OracleBackend
        backend = OracleBackend(task, method)
    else:
        backend = model_backend(checkpoint_dir, device, dtype, batch_size, temperature, seed,
                                 reuse_cache, sequential, info, kv_cache_budget)
    info.update(method=method, train_lengths=trained, length_label=config.get("length_label"),
                temperature=temperature, batch_size=batch_size, run_name=run_name,
                kv_reuse=reuse_cache and not sequential)
    results = evaluate(backend, task, method, lengths, samples, seed, rules, progress=progress,
                       sequential=sequential, info=info)
    write_results(results, Path(out) if out else REPO_ROOT / "results" / run_name)
    return results


def model_backend(checkpoint_dir: Path, device: str, dtype: str, batch_size: int, temperature: float,
                  seed: int, reuse_cache: bool, sequential: bool, info: dict,
                  kv_cache_budget: int | None = None):
    import torch
    from evaluation.backends import HFBackend, HFSequentialBackend
    from modeling import load_checkpoint
    from utils import pick_device  # the trainer's rule: auto = a GPU where CUDA sees one
    device = str(pick_device(device))
    dtype = pick_dtype(dtype, device)
    torch.manual_seed(seed)
    try:
        model, tokenizer = load_checkpoint(str(checkpoint_dir), dtype=dtype, merge_lora=True)
    except FileNotFoundError as error:  # a LoRA checkpoint copied without its base beside it
        raise SystemExit(f"error: {error}") from None
    model.to(device)
    info.update(device=device, dtype=dtype)
    if sequential:
        return HFSequentialBackend(model, tokenizer, temperature=temperature)
    return HFBackend(model, tokenizer, batch_size=batch_size, temperature=temperature, seed=seed,
                     reuse_cache=reuse_cache, cache_budget_tokens=kv_cache_budget)


def write_results(results: dict, out_dir: Path) -> None:
    """``results.json`` and ``accuracy.png`` in ``out_dir``, each written whole or not at all."""
    from evaluation.plot import plot_accuracy
    atomic_write_text(str(out_dir / "results.json"), json.dumps(results, indent=1) + "\n")
    plot_accuracy([results], out_dir / "accuracy.png")


# --- command line ---------------------------------------------------------------------------
def build_parser(task_name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"evaluate_{task_name}.py",
        description=f"Evaluate a trained model on {task_name} with the batched Call/Return engine; "
                    f"writes results.json and accuracy.png. Defaults: config/evaluation/{task_name}.yaml.")
    parser.add_argument("--checkpoint", help="a run directory (its final/) or one step-<n>/ folder")
    parser.add_argument("--oracle", action="store_true", help="evaluate the task's oracle instead of a model")
    parser.add_argument("--method", choices=METHODS, help="default: from the run's data_meta.json")
    parser.add_argument("--lengths", help="problem lengths, a range or list: 2-40, 2,5,10")
    parser.add_argument("--samples", type=int, help="problems per length")
    parser.add_argument("--seed", type=int, default=0, help="problem sampling (and decoding) seed")
    parser.add_argument("--batch-size", type=int, help="contexts per forward pass")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=EVAL_DTYPES,
                        help="auto: float16 on a GPU, float32 on a CPU")
    parser.add_argument("--out", help="results directory (default results/<run name>)")
    parser.add_argument("--train-lengths", help="trained lengths to shade (default: data_meta.json)")
    parser.add_argument("--max-depth", type=int, help="recursion depth limit (default: config)")
    parser.add_argument("--max-calls", type=int, help="calls per problem limit (default: config)")
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per generation (default: "
                                                           "1.5 x the oracle's longest + 16)")
    parser.add_argument("--no-kv-reuse", action="store_true",
                        help="re-encode every continuation instead of reusing its parent's cache")
    parser.add_argument("--kv-cache-budget", type=int, metavar="TOKENS",
                        help="most tokens of suspended contexts' KV caches kept for reuse (default: "
                             "no bound; set one for large models, whose deep recursions hold many)")
    parser.add_argument("--sequential", action="store_true",
                        help="one problem and one context at a time with model.generate (slow reference)")
    parser.add_argument("--show-trace", type=int, metavar="N",
                        help="print problem N's call tree (from --out's results.json if no --checkpoint)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(task_name: str, argv: list[str] | None = None) -> dict | None:
    args = build_parser(task_name).parse_args(argv)
    if args.show_trace is not None and not args.checkpoint and not args.oracle:
        if not args.out:
            raise SystemExit("error: --show-trace without --checkpoint reads --out's results.json; pass --out")
        from evaluation.plot import load_results
        show_trace(load_results(args.out), args.show_trace)
        return None
    if not args.checkpoint and not args.oracle:
        raise SystemExit("error: --checkpoint is required (or --oracle)")
    for flag in ("samples", "batch_size", "max_depth", "max_calls", "max_new_tokens", "kv_cache_budget"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.temperature < 0:
        raise SystemExit(f"error: --temperature must be 0 (greedy) or more, got {args.temperature}")
    if not re.fullmatch(EVAL_DEVICES, args.device):
        raise SystemExit(f"error: --device must be auto, cpu, cuda, cuda:N or mps, got {args.device!r}")
    limits = {"new_tokens_fixed": args.max_new_tokens}
    if args.max_depth is not None:
        limits.update(depth_per_length=0, depth_fixed=args.max_depth)
    if args.max_calls is not None:
        limits.update(calls_per_length=0, calls_fixed=args.max_calls)
    if args.quiet:  # transformers' own bars too (loading the weights)
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()
    try:
        results = evaluate_checkpoint(
            task_name, args.checkpoint, args.method, args.lengths, args.samples, args.seed,
            args.batch_size, args.temperature, args.device, args.dtype, args.out, args.train_lengths,
            limits, reuse_cache=not args.no_kv_reuse, sequential=args.sequential, oracle=args.oracle,
            progress=not args.quiet, kv_cache_budget=args.kv_cache_budget)
    except ValueError as error:  # bad --lengths and the like: one line, no traceback
        raise SystemExit(f"error: {error}")
    print(summary_table(results))
    if args.show_trace is not None:
        show_trace(results, args.show_trace)
    return results


def summary_table(results: dict) -> str:
    """Per-length accuracy, failures and costs as aligned text lines."""
    lines = [f"{results['task']} {results['method']}: "
             f"{results['summary']['correct']}/{results['summary']['problems']} correct "
             f"({100 * results['summary']['accuracy']:.1f}%), "
             f"{results['summary']['wall_time_s']:.1f} s, "
             f"{results['summary']['problems_per_s']:.2f} problems/s",
             f"{'length':>6} {'acc%':>6} {'calls':>6} {'tokens':>7}  failures"
             + ("  | first wrong step" if results["method"] == "retuning" else "")]
    for n, row in results["lengths"].items():
        failures = ", ".join(f"{k} {v}" for k, v in row["failures"].items()) or "-"
        first_wrong = ", ".join(f"{k} {v}" for k, v in row.get("first_wrong_steps", {}).items())
        lines.append(f"{n:>6} {100 * row['accuracy']:6.1f} {row['mean_calls']:6.1f} "
                     f"{row['mean_generated_tokens']:7.1f}  {failures}"
                     + (f"  | {first_wrong}" if first_wrong else ""))
    return "\n".join(lines)


def show_trace(results: dict, index: int) -> None:
    problems = results["problems"]
    if not 0 <= index < len(problems):
        raise SystemExit(f"error: --show-trace {index}: the results hold problems 0..{len(problems) - 1}")
    print(format_trace(problems[index], width=0))


def script_main(task_name: str) -> None:
    """Entry point of ``evaluate_<task>.py`` (run as a script: the repository root is put on the path)."""
    main(task_name, sys.argv[1:])
