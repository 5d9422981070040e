"""Fine-tune a causal LM on {"input", "output"} records, loss on the output only (SPEC.md 5).

    python train.py model=tiny datasets=[data/addition_retuning_small_train.json] exp_name=demo
    python train.py model=llama7b datasets=[data/addition_retuning_paper_train.json] exp_name=add_rt
    torchrun --nproc_per_node=2 train.py model=tiny datasets=[...] exp_name=ddp
    python train.py model=tiny datasets=[...] resume=runs/demo      # continue from the last checkpoint

Writes ``runs/<exp_name>/``: config.yaml (resolved), data_meta.json (what each dataset is, for
evaluation), metrics.jsonl, step-<n>/ checkpoints and final/. Hydra stays in the working
directory and writes nothing of its own, so dataset paths are relative to where you run this.
"""
from __future__ import annotations

import os
import shutil
import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from modeling import FROM_SCRATCH_BASE_DIR, count_parameters, load_for_resume, load_model_and_tokenizer
from preference_datasets import (DatasetError, dataset_meta, load_splits, tokenize_records, with_distractor_lines,
                                 with_noisy_call_lines)
from trainers import Trainer, latest_checkpoint, planned_steps
from utils import (PRECISIONS, MetricsLogger, atomic_write_json, atomic_write_text, barrier, init_processes,
                   pick_device)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config ``train.py`` would get from these command-line overrides (for tests, notebooks)."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides or []))


class SettingError(ValueError):
    """A training setting out of its range: reported in one line before anything is written."""


def check_settings(cfg: DictConfig, world_size: int) -> None:
    """The plain settings' ranges, checked before the run directory is touched, e.g.
    ``batch_size=0`` -> ``SettingError: batch_size must be a whole number >= 1, got 0``."""
    def whole(name, low, allow_null=False):
        value = OmegaConf.select(cfg, name)
        if (value is None and allow_null) or (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            return
        raise SettingError(f"{name} must be a whole number >= {low}{' or null' if allow_null else ''}, got {value!r}")

    def share(name):
        value = OmegaConf.select(cfg, name)
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise SettingError(f"{name} must be a share in [0, 1], got {value!r}")

    for name in ("batch_size", "gradient_accumulation_steps", "eval_batch_size", "n_epochs"):
        whole(name, 1)
    whole("n_examples", 1, allow_null=True)
    whole("keep_checkpoints", 0, allow_null=True)
    whole("warmup_steps", 0)
    for name in ("position_gaps_free_share", "call_line_noise.share", "distractor_line.share"):
        share(name)
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0):
        raise SettingError(f"lr must be a positive number, got {cfg.lr!r}")
    for name, allowed in (("lr_schedule", ("constant", "cosine")), ("loss_reduction", ("sum", "mean")),
                          ("mixed_precision", PRECISIONS)):
        if cfg[name] not in allowed:
            raise SettingError(f"{name} must be one of {', '.join(allowed)}, got {cfg[name]!r}")
    try:
        device = pick_device(cfg.device)
    except (ValueError, RuntimeError) as error:  # RuntimeError: a device string torch cannot read
        raise SettingError(str(error)) from None
    if not isinstance(cfg.compile, bool):
        raise SettingError(f"compile must be true or false, got {cfg.compile!r}")
    if cfg.compile and device.type == "cpu":
        from torch._inductor import cpp_builder  # the compiler inductor itself would take
        try:
            cpp_builder.get_cpp_compiler()
        except Exception:  # inductor's InvalidCxxCompiler, else at the first step, deep in a traceback
            raise SettingError("compile=true on a CPU needs a C++ compiler (g++, or $CXX), and none works "
                               "here; install one or set compile=false") from None
    if cfg.batch_size % (cfg.gradient_accumulation_steps * world_size):
        raise SettingError(f"batch_size={cfg.batch_size} must split evenly into gradient_accumulation_steps="
                           f"{cfg.gradient_accumulation_steps} x {world_size} processes")


# What a resumed run may change: how far it trains, how it logs, evaluates and checkpoints, and
# where and how it runs (device, threads, compiled or not). Any other setting would continue the
# run as another one under its name.
RESUMABLE_SETTINGS = {"exp_name", "run_dir", "resume", "overwrite", "n_examples", "n_epochs", "n_eval_examples",
                      "eval_every", "save_every", "keep_checkpoints", "eval_at_start", "eval_batch_size",
                      "log_every", "tensorboard", "wandb", "device", "num_threads", "compile"}


def config_differences(saved: DictConfig, now: DictConfig) -> list[str]:
    """The settings outside ``RESUMABLE_SETTINGS`` in which a run's saved config and ``now``
    differ, e.g. ``["lr=0.001, not 0.005"]``. A key only one of them has (a setting added to the
    code since) is no difference."""
    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {key: value for name, child in node.items() for key, value in flat(child, f"{prefix}{name}.").items()}
        return {prefix[:-1]: node}
    before, after = (flat(OmegaConf.to_container(c, resolve=True)) for c in (saved, now))
    return [f"{key}={before[key]}, not {after[key]}" for key in sorted(before.keys() & after.keys())
            if key.split(".")[0] not in RESUMABLE_SETTINGS and before[key] != after[key]]


def saved_config(run_dir: str) -> DictConfig | None:
    """The resolved config a run in ``run_dir`` was trained with; None before it wrote one."""
    path = os.path.join(run_dir, "config.yaml")
    return OmegaConf.load(path) if os.path.isfile(path) else None


def check_resumable(cfg: DictConfig) -> None:
    """``resume=`` must name a run directory, of a run with the same settings (data, model,
    optimizer, ...): a mistyped path would otherwise train from scratch, and other settings would
    continue a run under its name as another one."""
    if not os.path.isdir(cfg.resume):
        raise SettingError(f"resume={cfg.resume}: no such run directory (run_dir= starts a new run)")
    saved = saved_config(cfg.resume)
    if saved is None:
        return  # stopped before its first record was read: nothing to differ from
    changed = config_differences(saved, cfg)
    if changed:
        raise SettingError(f"resume={cfg.resume} trained {'; '.join(changed[:3])}"
                           f"{'; ...' if len(changed) > 3 else ''}: resume with the same, or start a new "
                           "run with run_dir=")


def resumed_config(cfg: DictConfig, command_line: list[str]) -> DictConfig:
    """What ``resume=<dir>`` continues: the run's own saved config, with the settings the command
    line gives on top, so ``train.py datasets=[...] resume=runs/demo`` keeps the run's
    ``n_examples``, ``lr``, ... (a setting given that it may not change is refused by
    ``check_resumable``)."""
    resumed = saved_config(cfg.resume)
    if resumed is None:
        return cfg
    absent = object()
    for override in command_line:
        key = override.split("=", 1)[0].lstrip("+~")
        value = OmegaConf.select(cfg, key, default=absent) if "@" not in key else absent
        if value is not absent:  # null included: keep_checkpoints=null is a setting too
            OmegaConf.update(resumed, key, value, force_add=True)
    return resumed


def check_new_run_dir(cfg: DictConfig, is_main: bool) -> None:
    """A new run does not write over another: a run directory that holds a checkpoint or logged
    training steps is refused, unless ``overwrite=true`` (then the main process deletes it
    first). One that stopped before its first step (a bad setting) is simply started again."""
    run_dir = cfg.run_dir
    if not os.path.isdir(run_dir):
        return
    metrics = os.path.join(run_dir, "metrics.jsonl")
    held = [name for name in os.listdir(run_dir) if name == "final" or name.startswith("step-")
            or (name == "metrics.jsonl" and os.path.getsize(metrics) > 0)]
    if held and not cfg.overwrite:
        raise SettingError(f"run_dir={run_dir} holds a run ({', '.join(sorted(held)[:3])}): continue it with "
                           f"resume={run_dir}, start it over with overwrite=true, or pick another exp_name=")
    if held and is_main:
        shutil.rmtree(run_dir)


def check_not_past_the_end(cfg: DictConfig, state: dict, planned: int) -> None:
    """A resumed run that has already taken more steps than this config plans (a smaller
    ``n_examples`` or ``n_epochs``) stops before anything is written, its checkpoints untouched."""
    if state["batch_size"] == cfg.batch_size and state["step"] > planned:
        raise SettingError(f"resume={cfg.resume} has trained {state['step']} steps, more than the {planned} "
                           f"that n_examples={cfg.n_examples}, n_epochs={cfg.n_epochs} plan: resume with at "
                           "least as many, or start a new run with run_dir=")


def run(cfg: DictConfig) -> str:
    """Train as ``cfg`` says; returns the run directory."""
    trainer = build(cfg)
    try:
        trainer.train()
    finally:
        trainer.logger.close()
    return trainer.run_dir


def build(cfg: DictConfig) -> Trainer:
    """Everything up to the first step: processes, run directory, data, model, trainer (resumed
    from the last checkpoint when ``cfg.resume`` names a run directory)."""
    check_settings(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    processes = init_processes(cfg.device)
    if cfg.resume:
        check_resumable(cfg)
    else:
        check_new_run_dir(cfg, processes.is_main)
    torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // processes.local_world_size))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    torch.manual_seed(cfg.seed + processes.rank)  # dropout differs across processes, same each run
    run_dir = cfg.resume or cfg.run_dir
    checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and processes.is_main:
        print(f"resuming from {checkpoint[0]}" if checkpoint else f"{run_dir}: no checkpoint yet, starting over")

    # Data first: a bad file stops the run before a model is loaded.
    train_records, eval_records = load_splits(list(cfg.datasets), cfg.n_eval_examples, cfg.seed)
    if cfg.call_line_noise.share:
        train_records = with_noisy_call_lines(train_records, cfg.call_line_noise.share,
                                              cfg.call_line_noise.max_digits, cfg.seed)
    if cfg.distractor_line.share:
        train_records = with_distractor_lines(train_records, cfg.distractor_line.share,
                                              cfg.distractor_line.max_digits, cfg.seed)
    meta = dataset_meta(list(cfg.datasets))

    if checkpoint:
        model, tokenizer = load_for_resume(checkpoint[0], cfg.model)
    else:
        base_dir = os.path.join(run_dir, FROM_SCRATCH_BASE_DIR) if processes.is_main else None
        try:
            model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.lora, seed=cfg.seed, base_save_dir=base_dir)
        except OSError as error:  # not in the local cache and the hub unreachable, a bad path, ...
            raise SettingError(f"model.name_or_path={cfg.model.name_or_path}: cannot load it "
                               f"({str(error).splitlines()[0]}); download it, or give a local "
                               "directory") from None
    train_data = tokenize_records(train_records, tokenizer, cfg.max_length, cfg.max_prompt_length)
    eval_data = tokenize_records(eval_records, tokenizer, cfg.max_length, cfg.max_prompt_length)
    if checkpoint:
        check_not_past_the_end(cfg, checkpoint[1], planned_steps(len(train_data), cfg))
    if processes.is_main:
        trainable, total = count_parameters(model)
        truncated = train_data.n_truncated + eval_data.n_truncated
        print(f"{len(train_data)} training / {len(eval_data)} held-out records, "
              f"{int(train_data.lengths.sum())} training tokens; model {cfg.model.name}: "
              f"{trainable:,} trainable of {total:,} parameters; {processes.world_size} process(es) on "
              f"{processes.device}" + (f"; WARNING {truncated} records truncated" if truncated else ""))
        os.makedirs(run_dir, exist_ok=True)  # only now: a run that cannot start leaves no folder
        atomic_write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(os.path.join(run_dir, "data_meta.json"), meta)
    barrier(processes)

    logger = MetricsLogger(run_dir, processes.is_main, cfg.tensorboard, cfg.wandb,
                           OmegaConf.to_container(cfg, resolve=True),
                           resume_step=checkpoint[1]["step"] if checkpoint else (-1 if cfg.resume else None))
    trainer = Trainer(cfg, model, tokenizer, train_data, eval_data, run_dir, processes, logger)
    if checkpoint:
        trainer.restore(*checkpoint)
    return trainer


@hydra.main(version_base=None, config_path="config", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.resume:
            cfg = resumed_config(cfg, list(HydraConfig.get().overrides.task))
        run(cfg)
    except (DatasetError, SettingError) as error:  # a bad data file or setting: one line naming it
        sys.exit(f"error: {error}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
