"""The paper's comparison in one command: for each task, generate the data of the three methods,
train a model on each, evaluate each in and beyond the trained lengths, and compare.

    python reproduce.py                              # addition, tiny model, CPU
    python reproduce.py task=all                     # addition, DP and parity
    python reproduce.py task=parity model=llama7b    # the paper's setting on a GPU

Writes, per task, ``results/<task>/comparison.png`` (accuracy by length, one line per method,
trained lengths shaded), ``results/<task>/summary.md`` (accuracy in and beyond the trained lengths,
training tokens, time and peak memory per method) and ``results/<task>/<method>/results.json``;
another preset, model or seed than the default's writes to
``results/<task>_<preset>_<model>_seed<seed>/``.
Every step writes its outputs whole or not at all, and a step whose outputs exist is skipped, so
an interrupted run picks up where it stopped (an interrupted training resumes from its last
checkpoint). Trainings and evaluations run as child processes (``train.py`` and
``evaluation/evaluate_<task>.py``), ``jobs`` of them at once. Settings: ``config/reproduce/config.yaml``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from data_generation.pipeline import GENERATOR_VERSION, file_names, generate
from evaluation.cli import EVAL_DEVICES, EVAL_DTYPES
from evaluation.engine import SAMPLING
from evaluation.plot import METHOD_NAMES, load_results, plot_accuracy
from tasks import get_task, parse_lengths, task_names
from tasks.base import METHODS
from train import config_differences, saved_config
from utils import atomic_write_json, atomic_write_text

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL_CONFIG_DIR = os.path.join(REPO_ROOT, "config", "model")  # train.py's model=<name> files
STATS_FILE = "reproduce_stats.json"  # beside a run's final/: wall time and peak memory of training


def task_settings(cfg: DictConfig, task_name: str) -> tuple[str, DictConfig]:
    preset = cfg.preset or ("small" if cfg.model == "tiny" else "paper")
    try:
        return preset, cfg.tasks[task_name][preset]
    except Exception:
        raise SystemExit(f"error: config/reproduce/config.yaml has no tasks.{task_name}.{preset} settings")


def make_data(cfg: DictConfig, task_name: str, method: str, preset: str, settings: DictConfig) -> str:
    """The dataset's training file, generated unless a complete one with these settings exists:
    in ``data/`` for seed 0, in ``data/seed<seed>/`` for another, so that reproductions of two
    seeds at once never write the files the other trains on."""
    task = get_task(task_name)
    names = file_names(task, method, preset)
    folder = data_folder(cfg)
    train_path, meta_path = (os.path.join(folder, names[split]) for split in ("train", "meta"))
    if os.path.exists(meta_path) and made_with(data_meta(train_path), cfg, settings):
        return train_path  # the meta file is written last: its presence means complete
    os.makedirs(folder, exist_ok=True)
    lengths = parse_lengths(settings.lengths) if settings.lengths else None
    generate(task, method, preset, cfg.seed, folder, lengths)
    return train_path


def data_folder(cfg: DictConfig) -> str:
    """``data`` for seed 0, ``data/seed3`` for seed 3."""
    return cfg.data_dir if cfg.seed == 0 else os.path.join(cfg.data_dir, f"seed{cfg.seed}")


def made_with(meta: dict, cfg: DictConfig, settings: DictConfig) -> bool:
    """Whether a dataset's meta says it was made with this seed, these lengths and this generator."""
    lengths = parse_lengths(settings.lengths) if settings.lengths else None
    return (meta.get("seed"), meta.get("requested_lengths"), meta.get("generator_version")) == (
        cfg.seed, lengths, GENERATOR_VERSION)


def data_meta(train_path: str) -> dict:
    """The meta file written beside a training file (``x_train.json`` -> ``x_meta.json``)."""
    with open(train_path.replace("_train.json", "_meta.json")) as handle:
        return json.load(handle)


def accumulation_steps(model: str, overrides: dict) -> int:
    """The ``gradient_accumulation_steps`` train.py will run with: an override's, else
    ``config/model/<model>.yaml``'s, else ``config/config.yaml``'s (32 for ``model=llama7b``)."""
    if "gradient_accumulation_steps" in overrides:
        return int(overrides["gradient_accumulation_steps"])
    for path in (os.path.join(MODEL_CONFIG_DIR, f"{model}.yaml"), os.path.join(REPO_ROOT, "config", "config.yaml")):
        value = OmegaConf.load(path).get("gradient_accumulation_steps")
        if value is not None:
            return int(value)
    return 1


def training_budget(settings: DictConfig, meta: dict, accumulation: int = 1) -> dict:
    """The same compute for every method: ``train_steps`` optimizer steps of about
    ``tokens_per_step`` tokens each, so a method with short records (the baseline) gets larger
    batches and one with long records (the scratchpad) smaller ones. The batch is a multiple of
    ``accumulation``, which train.py splits it into. Empty (train.py's own batch and budget) when
    ``train_steps`` is null."""
    if not settings.get("train_steps"):
        return {}
    tokens_per_record = meta["tokens"]["mean"]
    batch_size = accumulation * max(1, round(settings.tokens_per_step / tokens_per_record / accumulation))
    return {"batch_size": batch_size, "n_examples": batch_size * settings.train_steps}


RUNNING: set[subprocess.Popen] = set()  # children to stop when this run is interrupted
STOPPING = threading.Event()             # set once interrupted: no child starts after it


def stop_children() -> None:
    """SIGTERM to every running child: an interrupted reproduce.py leaves no training or
    evaluation running on its own, to write into directories a later run reads."""
    STOPPING.set()
    for child in list(RUNNING):
        if child.poll() is None:
            child.terminate()


def run_child(args: list[str], log_path: str | None, threads: int, usage: dict | None = None) -> None:
    """Run a child process to its end, its output going to ``log_path`` (None: this console), with
    ``threads`` CPU threads; its peak resident memory in MB goes to ``usage["peak_rss_mb"]``
    however the child ends. A failure stops the whole run with the end of the child's log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if STOPPING.is_set():
        raise SystemExit("interrupted")
    with open(log_path, "w") if log_path else contextlib.nullcontext() as log:
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT if log else None, env=env)
        RUNNING.add(child)
        try:
            _, status, rusage = os.wait4(child.pid, 0)
            child.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        finally:
            RUNNING.discard(child)
    if usage is not None:
        usage["peak_rss_mb"] = rusage.ru_maxrss / 1024  # KiB on Linux
    if code != 0:
        tail = ""
        if log_path:
            with open(log_path, errors="replace") as handle:
                tail = "".join(handle.readlines()[-15:])
        raise SystemExit(f"{tail}error: {' '.join(args[1:3])} ... failed (exit {code})"
                         + (f"; whole output in {log_path}" if log_path else ""))


def override_value(value, inside: bool = False) -> str:
    """A config value as Hydra's command line writes it: ``[{after: "+", max: 16}]`` ->
    ``[{after:"+",max:16}]``; a scalar (or a string given on the command line) as it is."""
    if isinstance(value, (list, ListConfig)):
        return "[" + ",".join(override_value(v, inside=True) for v in value) + "]"
    if isinstance(value, (dict, DictConfig)):
        return "{" + ",".join(f"{k}:{override_value(v, inside=True)}" for k, v in value.items()) + "}"
    if inside and isinstance(value, str):  # quoted; a newline stays one, as Hydra reads no \n escape
        return '"' + "\n".join(json.dumps(line)[1:-1] for line in value.split("\n")) + '"'
    return str(value)


def settings_difference(path: str, settings: dict) -> str | None:
    """How the settings recorded in ``path`` differ from ``settings``, or None where they are the
    same: ``"train: seed=1 (was seed=0)"``, ``"data: n_train, tokens"``, ``"none recorded"``."""
    if not os.path.exists(path):
        return "none recorded"
    with open(path) as handle:
        recorded = json.load(handle)
    changes = []
    for part in sorted(set(settings) | set(recorded)):
        new, old = settings.get(part), recorded.get(part)
        if new == old:
            continue
        if isinstance(new, list) and isinstance(old, list):
            added, removed = [a for a in new if a not in old], [a for a in old if a not in new]
            changes.append(f"{part}: {' '.join(added) or '-'} (was {' '.join(removed) or '-'})")
        elif isinstance(new, dict) and isinstance(old, dict):
            keys = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
            changes.append(f"{part}: {', '.join(keys[:4])}" + (", ..." if len(keys) > 4 else ""))
        else:
            changes.append(part)
    return "; ".join(changes) or None


def training_overrides(cfg: DictConfig, method: str, settings: DictConfig, meta: dict) -> dict:
    """train.py's overrides for one method: its budget, then the config's and ``train_args``."""
    overrides = {**settings.train.get("common", {}), **settings.train.get(method, {}),
                 **dict(arg.split("=", 1) for arg in cfg.train_args)}
    return {**training_budget(settings, meta, accumulation_steps(cfg.model, overrides)), **overrides}


def training_args(cfg: DictConfig, run_dir: str, train_path: str, overrides: dict) -> list[str]:
    return [f"model={cfg.model}", f"datasets=[{train_path}]", f"exp_name={os.path.basename(run_dir)}",
            f"run_dir={run_dir}", f"seed={cfg.seed}",
            *[f"{key}={override_value(value)}" for key, value in overrides.items()]]


def train(cfg: DictConfig, run_dir: str, train_path: str, meta: dict, overrides: dict,
          log_path: str | None, threads: int) -> dict:
    """Run ``train.py`` in a child process (resuming an interrupted run); record its wall time and
    peak resident memory beside the run's ``final/``. Returns what ``run_dir/reproduce_args.json``
    records of it, its arguments and its data's ``meta``: a run directory that holds a training
    with others (the config was edited since) stops the run with an error, and nothing is lost."""
    args = training_args(cfg, run_dir, train_path, overrides)
    settings_path = os.path.join(run_dir, "reproduce_args.json")
    recorded = {"train": args, "data": meta}
    command = [sys.executable, os.path.join(REPO_ROOT, "train.py"), *args]
    stats_path = os.path.join(run_dir, STATS_FILE)
    stats = {"train_wall_s": 0.0, "peak_rss_mb": 0.0}
    if os.path.isdir(run_dir):
        difference = settings_difference(settings_path, recorded) or config_file_difference(run_dir, command)
        if difference:
            raise SystemExit(f"error: {run_dir} holds a training with other settings ({difference}); "
                             "remove it, or set runs_dir= to train elsewhere")
        if os.path.exists(os.path.join(run_dir, "final")):
            return recorded
        command.append(f"resume={run_dir}")
        if os.path.exists(stats_path):  # the stretches trained before the interruption
            with open(stats_path) as handle:
                stats = json.load(handle)
        else:
            stats["unrecorded_stretch"] = True  # this run's parent was killed outright
    else:
        os.makedirs(run_dir)
        atomic_write_json(settings_path, recorded)
    tqdm.write(shlex.join(command[1:]))  # quoted: a line that can be pasted into a shell
    start, usage = time.time(), {}
    try:
        run_child(command, log_path, threads, usage)
    finally:  # interrupted too, so that a resumed training's time and memory cover every stretch
        stats["train_wall_s"] += time.time() - start
        stats["peak_rss_mb"] = max(stats["peak_rss_mb"], usage.get("peak_rss_mb", 0.0))
        atomic_write_json(stats_path, stats)
    return recorded


def config_file_difference(run_dir: str, command: list[str]) -> str | None:
    """How the config ``train.py`` resolves for ``command`` now (config/config.yaml and
    config/model/*.yaml as they are) differs from the one the run in ``run_dir`` was trained
    with, e.g. ``"lr=0.001, not 0.005"``; None where they agree or the run saved none yet."""
    saved = saved_config(run_dir)
    if saved is None:
        return None
    resolved = subprocess.run([*command, "--cfg", "job", "--resolve"], capture_output=True, text=True)
    if resolved.returncode != 0:
        raise SystemExit(f"{resolved.stderr[-2000:]}error: train.py cannot resolve the config for {run_dir}")
    changed = config_differences(saved, OmegaConf.create(resolved.stdout))
    return "; ".join(changed) or None


def evaluate(cfg: DictConfig, task_name: str, method: str, run_dir: str, out_dir: str,
             settings: DictConfig, training: dict, log_path: str | None, threads: int) -> dict:
    """Run ``evaluation/evaluate_<task>.py`` on the run's final checkpoint in a child process,
    unless ``out_dir`` holds results of this evaluation of the training ``training`` describes
    (recorded in ``out_dir/reproduce_args.json``; training is deterministic, so the same
    arguments and data mean the same model)."""
    args = evaluation_args(cfg, method, run_dir, settings)
    recorded = {**training, "evaluate": args}
    results = finished_evaluation(cfg, method, run_dir, out_dir, settings, recorded)
    if results is None:
        script = os.path.join(REPO_ROOT, "evaluation", f"evaluate_{task_name}.py")
        run_child([sys.executable, script, *args, "--out", out_dir], log_path, threads)
        atomic_write_json(os.path.join(out_dir, "reproduce_args.json"), recorded)
        results = load_results(os.path.join(out_dir, "results.json"))
    return results


def finished_evaluation(cfg: DictConfig, method: str, run_dir: str, out_dir: str, settings: DictConfig,
                        recorded: dict) -> dict | None:
    """The results in ``out_dir`` where they are of this evaluation of this training (``recorded``
    as its ``reproduce_args.json`` holds it, and the results say so of themselves), else None."""
    results_path = os.path.join(out_dir, "results.json")
    if not os.path.exists(results_path) or settings_difference(os.path.join(out_dir, "reproduce_args.json"),
                                                               recorded):
        return None
    results = load_results(results_path)
    return results if results_answer(results, method, run_dir, cfg.seed, settings) else None


def evaluation_args(cfg: DictConfig, method: str, run_dir: str, settings: DictConfig) -> list[str]:
    args = ["--checkpoint", run_dir, "--method", method, "--seed", str(cfg.seed),
            "--device", cfg.eval.device, "--dtype", cfg.eval.dtype]
    for flag, value in [("--lengths", settings.eval_lengths), ("--samples", settings.eval_samples),
                        ("--batch-size", cfg.eval.batch_size)]:
        if value is not None:
            args += [flag, str(value)]
    return args


def results_answer(results: dict, method: str, run_dir: str, seed: int, settings: DictConfig) -> bool:
    """Whether a results.json holds the evaluation asked for, by what it says of itself (so that
    results another run left behind are never taken for this one's)."""
    asked = results.get("settings", {})
    return (results.get("method") == method and asked.get("seed") == seed
            and asked.get("sampling") == SAMPLING
            and os.path.abspath(asked.get("run_dir", "")) == os.path.abspath(run_dir)
            and (settings.eval_samples is None or asked.get("samples") == settings.eval_samples)
            and (settings.eval_lengths is None or asked.get("lengths") == parse_lengths(settings.eval_lengths)))


def training_cost(run_dir: str) -> dict:
    """Records and tokens trained on, and wall time and peak memory, of a finished run."""
    with open(os.path.join(run_dir, "final", "trainer_state.json")) as handle:
        records = json.load(handle)["records_seen"]
    with open(os.path.join(run_dir, "data_meta.json")) as handle:
        meta = json.load(handle)[0]
    stats_path = os.path.join(run_dir, STATS_FILE)
    stats = {}
    if os.path.exists(stats_path):
        with open(stats_path) as handle:
            stats = json.load(handle)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):  # the trainer logs cuda_max_memory_gb when it trains on a GPU
        with open(metrics_path) as handle:
            gpu_peaks = [row["cuda_max_memory_gb"] for row in map(json.loads, handle) if "cuda_max_memory_gb" in row]
        if gpu_peaks:
            stats["peak_gpu_gb"] = max(gpu_peaks)
    return {"records": records, "tokens_per_record": meta["tokens"]["mean"],
            "tokens": round(records * meta["tokens"]["mean"]), **stats}


def mean_accuracy(results: dict, keep) -> float | None:
    rows = [row for n, row in results["lengths"].items() if keep(int(n))]
    problems = sum(row["problems"] for row in rows)
    return sum(row["correct"] for row in rows) / problems if problems else None


def training_time(cost: dict) -> str:
    """``"7.3 min"``; ``"> 7.3 min"`` where a stretch of the training went unrecorded (its
    reproduce.py was killed outright), ``"-"`` where none was recorded."""
    if "train_wall_s" not in cost:
        return "-"
    return f"{'> ' if cost.get('unrecorded_stretch') else ''}{cost['train_wall_s'] / 60:.1f} min"


def peak_memory(cost: dict) -> str:
    return f"{cost['peak_rss_mb']:,.0f} MB" if cost.get("peak_rss_mb") else "-"


def gpu_memory(cost: dict) -> str:
    """``"30.1 GiB GPU, "`` for a run trained on a GPU, else nothing."""
    return f"{cost['peak_gpu_gb']:.1f} GiB GPU, " if "peak_gpu_gb" in cost else ""


def summary_markdown(task_name: str, preset: str, model: str, results: dict[str, dict],
                     costs: dict[str, dict], earlier: list[str] = ()) -> str:
    """The comparison table of one task, e.g.::

        | method | trained lengths 1-8 | beyond (9-24) | at 24 | tokens trained | ... |
        | Re-Tuning | 100.0% | 93.1% | 85.0% | 5,120,000 | ... |
    """
    trained = next(iter(results.values()))["settings"]["train_lengths"]
    low, high = min(trained), max(trained)
    evaluated = sorted({int(n) for r in results.values() for n in r["lengths"]})
    beyond = [n for n in evaluated if n > high]
    far = 3 * high if 3 * high in evaluated else (beyond[-1] if beyond else None)

    def percent(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    beyond_label = ("beyond" if not beyond else f"beyond ({beyond[0]})" if len(beyond) == 1
                    else f"beyond ({beyond[0]}-{beyond[-1]})")
    asked = next(iter(results.values()))["settings"]
    lines = [f"# {task_name}: {model} model, {preset} preset", "",
             f"Seed {asked.get('seed')}; evaluated on lengths {evaluated[0]}-{evaluated[-1]}, "
             f"{asked.get('samples')} problems per length.", "",
             f"| method | trained lengths {low}-{high} | {beyond_label} | at {far or '-'} "
             f"| records trained | tokens trained | tokens/record | training time | peak memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, result in results.items():
        cost = costs[method]
        lines.append(
            f"| {METHOD_NAMES.get(method, method)} "
            f"| {percent(mean_accuracy(result, lambda n: low <= n <= high))} "
            f"| {percent(mean_accuracy(result, lambda n: n > high))} "
            f"| {percent(mean_accuracy(result, lambda n: n == far))} "
            f"| {cost['records']:,} | {cost['tokens']:,} | {cost['tokens_per_record']:.1f} "
            f"| {training_time(cost)} | {gpu_memory(cost)}{peak_memory(cost)} |")
    lines += ["", "Accuracy is the share of problems whose final answer is right, pooled over the lengths "
              "of each column; tokens trained = records trained x mean tokens per record of the data. "
              "Peak memory is the training process's peak resident set size (MB), after its peak GPU "
              "memory where it trained on a GPU.", ""]
    if earlier:
        lines += [f"{', '.join(METHOD_NAMES.get(m, m) for m in earlier)}: not run this time (not in "
                  "`methods`); the results and training of an earlier run with these settings (data, "
                  "training and evaluation).", ""]
    return "\n".join(lines)



def check_settings(cfg: DictConfig, names: list[str]) -> None:
    """What the evaluations and trainings will read, checked before any work, so that a typo fails
    now rather than after the trainings: ``eval_samples=0`` -> one line naming it."""
    if not cfg.methods:
        raise SystemExit(f"error: methods is empty; give some of {', '.join(METHODS)}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):  # seed=01 reaches here as '01'
        raise SystemExit(f"error: seed must be a whole number, got {cfg.seed!r}")
    if cfg.jobs != "auto" and not (isinstance(cfg.jobs, int) and cfg.jobs >= 1):
        raise SystemExit(f"error: jobs must be auto or a whole number >= 1, got {cfg.jobs!r}")
    if cfg.eval.dtype not in EVAL_DTYPES:
        raise SystemExit(f"error: eval.dtype must be one of {', '.join(EVAL_DTYPES)}, got {cfg.eval.dtype!r}")
    if not re.fullmatch(EVAL_DEVICES, str(cfg.eval.device)):
        raise SystemExit(f"error: eval.device must be auto, cpu, cuda, cuda:N or mps, got {cfg.eval.device!r}")
    for name in names:
        preset, settings = task_settings(cfg, name)
        for key in ("lengths", "eval_lengths"):
            if settings[key] is not None:
                try:
                    parse_lengths(settings[key])
                except ValueError as error:
                    raise SystemExit(f"error: tasks.{name}.{preset}.{key}={settings[key]}: {error}") from None
        for key in ("eval_samples", "train_steps", "tokens_per_step"):
            if settings[key] is not None and not (isinstance(settings[key], int) and settings[key] >= 1):
                raise SystemExit(f"error: tasks.{name}.{preset}.{key} must be a whole number >= 1, got {settings[key]!r}")


def parallel_jobs(cfg: DictConfig) -> int:
    """Methods trained and evaluated at once: ``auto`` is all of them for the tiny model and 1 for
    any other model, which would share one GPU. Three one-thread trainings on two cores computed
    as many tokens per second together as two did (docs/tiny_model.md), and none then waits for
    a core while another sits idle at the end."""
    if cfg.jobs != "auto":
        return cfg.jobs
    return len(cfg.methods) if cfg.model == "tiny" else 1


def run_folder(cfg: DictConfig, name: str, method: str, preset: str) -> str:
    """``runs/addition_retuning_small_tiny_seed0``: one method's training."""
    return os.path.join(cfg.runs_dir, f"{name}_{method}_{preset}_{cfg.model}_seed{cfg.seed}")


def results_folder(cfg: DictConfig, name: str, preset: str) -> str:
    """``results/addition`` for the default (the tiny model on the small preset, seed 0), else
    one of its own, so that other seeds and models keep theirs beside it:
    ``results/addition_small_tiny_seed1``, ``results/parity_paper_llama7b_seed0``."""
    default = (preset, cfg.model, cfg.seed) == ("small", "tiny", 0)
    return os.path.join(cfg.results_dir, name if default else f"{name}_{preset}_{cfg.model}_seed{cfg.seed}")


def earlier_results(cfg: DictConfig, name: str, preset: str, settings: DictConfig) -> dict[str, tuple]:
    """Results and training cost of the methods not asked for this time whose finished run and
    evaluation with these settings (data, training and evaluation, as the results folder's
    ``reproduce_args.json`` records them) are already there, so that ``methods=[retuning]``
    after a whole reproduction still compares all three."""
    found = {}
    for method in METHODS:
        run_dir = run_folder(cfg, name, method, preset)
        out_dir = os.path.join(results_folder(cfg, name, preset), method)
        settings_path = os.path.join(out_dir, "reproduce_args.json")
        if method in cfg.methods or not (os.path.exists(settings_path)
                                         and os.path.isdir(os.path.join(run_dir, "final"))):
            continue
        with open(settings_path) as handle:
            meta = json.load(handle).get("data") or {}
        if not made_with(meta, cfg, settings):
            continue
        train_path = os.path.join(data_folder(cfg), file_names(get_task(name), method, preset)["train"])
        overrides = training_overrides(cfg, method, settings, meta)
        recorded = {"train": training_args(cfg, run_dir, train_path, overrides), "data": meta,
                    "evaluate": evaluation_args(cfg, method, run_dir, settings)}
        results = finished_evaluation(cfg, method, run_dir, out_dir, settings, recorded)
        if results is not None:
            found[method] = (results, training_cost(run_dir))
    return found


def train_and_evaluate(cfg: DictConfig, name: str, method: str, preset: str, settings: DictConfig,
                       train_path: str, jobs: int, steps: tqdm) -> tuple[dict, dict]:
    """One method's training and evaluation; with several jobs at once their output goes to
    ``results/<task>/<method>/{train,eval}.log`` instead of the console."""
    run_dir = run_folder(cfg, name, method, preset)
    out_dir = os.path.join(results_folder(cfg, name, preset), method)
    os.makedirs(out_dir, exist_ok=True)
    log = (lambda stage: os.path.join(out_dir, f"{stage}.log")) if jobs > 1 else (lambda stage: None)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    meta = data_meta(train_path)
    overrides = training_overrides(cfg, method, settings, meta)
    training = train(cfg, run_dir, train_path, meta, overrides, log("train"), threads)
    steps.update()
    results = evaluate(cfg, name, method, run_dir, out_dir, settings, training, log("eval"), threads)
    steps.update()
    return results, training_cost(run_dir)


@hydra.main(config_path="config/reproduce", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    # A kill (SIGTERM) unwinds as Ctrl-C does, stopping the children; rerunning picks up.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        reproduce(cfg)
    except KeyboardInterrupt:
        sys.exit("reproduce.py: interrupted; run the same command again to pick up where it stopped")


def reproduce(cfg: DictConfig) -> None:
    names = task_names() if cfg.task == "all" else [cfg.task]
    for name in names:  # bad names: a one-line error before any work
        try:
            get_task(name)
        except KeyError as error:
            raise SystemExit(f"error: task={name}: {error.args[0]}") from None
    models = sorted(f[:-5] for f in os.listdir(MODEL_CONFIG_DIR) if f.endswith(".yaml"))
    if cfg.model not in models:
        raise SystemExit(f"error: model={cfg.model}: no config/model/{cfg.model}.yaml; known: {', '.join(models)}")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: methods: unknown {', '.join(map(str, unknown))}; known: {', '.join(METHODS)}")
    check_settings(cfg, names)
    jobs = parallel_jobs(cfg)
    steps = tqdm(total=len(names) * (3 * len(cfg.methods) + 1), desc="reproduce", unit=" steps")
    for name in names:
        preset, settings = task_settings(cfg, name)
        steps.set_postfix_str(f"{name}: data")
        train_paths = {}
        for method in cfg.methods:
            train_paths[method] = make_data(cfg, name, method, preset, settings)
            steps.update()
        steps.set_postfix_str(f"{name}: training and evaluating {jobs} at a time")
        pool = ThreadPoolExecutor(jobs)
        try:
            # Last listed, first started: Re-Tuning, by default, trains longest (its records pad
            # most), so with fewer jobs than methods the shorter trainings queue behind it.
            futures = {method: pool.submit(train_and_evaluate, cfg, name, method, preset, settings,
                                           train_paths[method], jobs, steps) for method in reversed(cfg.methods)}
            outcomes = {method: futures[method].result() for method in cfg.methods}
        except BaseException:  # Ctrl-C, a kill or a failed child: stop the others, start no more
            stop_children()
            raise
        finally:
            pool.shutdown(cancel_futures=True)
        earlier = earlier_results(cfg, name, preset, settings)
        compared = {**earlier, **outcomes}
        results = {method: compared[method][0] for method in METHODS if method in compared}
        costs = {method: compared[method][1] for method in results}
        out = results_folder(cfg, name, preset)
        plot_accuracy(list(results.values()), os.path.join(out, "comparison.png"),
                      labels=[METHOD_NAMES.get(m, m) for m in results],
                      title=f"{name}: accuracy by problem length ({cfg.model} model)")
        summary = summary_markdown(name, preset, cfg.model, results, costs, list(earlier))
        atomic_write_text(os.path.join(out, "summary.md"), summary)
        steps.update()
        tqdm.write(summary)
    steps.close()


if __name__ == "__main__":
    main()
