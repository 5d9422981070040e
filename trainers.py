"""The training loop: masked-loss SFT with exact gradient accumulation, held-out loss, checkpoints.

One global batch of ``batch_size`` records per optimizer step, split over processes and
``gradient_accumulation_steps`` microbatches. The loss is the output tokens' negative
log-likelihood (prompt and padding are -100), reduced either as the paper does (``sum``: per
sequence, averaged over the global batch's sequences) or per token (``mean``: averaged over the
global batch's output tokens). Each microbatch's sum is divided by the *global* batch's count,
known before the step, so accumulation gives exactly the gradient of one big batch. With
``pack_records`` a microbatch's records share rows where they fit, each seeing only itself: the
same sums.

A checkpoint ``<run_dir>/step-<n>/`` (and ``final/``) holds the model (or LoRA adapter) and the
tokenizer in Hugging Face format, plus what resuming needs beside it: ``optimizer.pt`` (tensors,
read back with ``weights_only=True``), ``rng_state_<rank>.pt`` and ``trainer_state.json`` (the
step; the batch order is a function of seed and epoch, so the step is the data position).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling import LinePositions, PositionGap, replace_directory, save_model
from preference_datasets import (IGNORE_INDEX, TokenizedRecords, batch_plan, collate, collate_packed, microbatches,
                                 pack_rows, steps_per_epoch)
from utils import (MetricsLogger, Processes, all_reduce_sum, atomic_torch_save, atomic_write_json,
                   barrier, uses_bf16_autocast)

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")


def logits_outside_autocast(model) -> None:
    """Compute the output layer in its weights' dtype (fp32 for the tiny model) even under bf16
    autocast. With bf16 logits the tiny model's baseline addition stalled at a held-out loss of
    0.62 per token (0.05 in fp32, 42.5% against 90.8% of the trained problems right); with the
    head alone in fp32 it trains as in fp32. The head is small: this costs next to nothing."""
    head = model.get_output_embeddings()
    plain_forward = type(head).forward

    def forward(self, hidden_states):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return plain_forward(self, hidden_states.to(self.weight.dtype))
    head.forward = types.MethodType(forward, head)  # an instance attribute: the state dict is unchanged


class Trainer:
    def __init__(self, cfg, model, tokenizer, train_data: TokenizedRecords, eval_data: TokenizedRecords,
                 run_dir: str, processes: Processes, logger: MetricsLogger):
        self.cfg, self.tokenizer, self.run_dir, self.processes = cfg, tokenizer, run_dir, processes
        self.train_data, self.eval_data, self.logger = train_data, eval_data, logger
        self.steps_per_epoch = steps_per_epoch(len(train_data), cfg.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(train_data)} training records, fewer than batch_size={cfg.batch_size}")
        self.total_steps = planned_steps(len(train_data), cfg)
        self.line_positions = LinePositions.of(model, tokenizer)
        if cfg.position_gaps and not self.line_positions:
            raise ValueError("position_gaps need line positions (the model's line_position_stride)")
        self.position_gaps = [PositionGap(entry, tokenizer, self.line_positions.newline_id)
                              for entry in cfg.position_gaps or []]
        self.raw_model = model.to(processes.device).train()  # from_pretrained gives eval mode: no dropout
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model = model
        if processes.distributed:
            device_ids = [processes.local_rank] if processes.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.autocast = contextlib.nullcontext
        if uses_bf16_autocast(processes.device, cfg.mixed_precision):
            self.autocast = functools.partial(torch.autocast, processes.device.type, dtype=torch.bfloat16)
            logits_outside_autocast(model)
            if processes.device.type == "cpu" and hasattr(model, "set_attn_implementation"):
                # On a CPU, fused SDPA's backward runs ~4x slower in bf16 than in fp32, while eager
                # attention's bf16 matmuls are fast: bf16 then trains 2.2x faster than fp32, not 1.35x.
                model.set_attn_implementation("eager")
        if cfg.compile:
            # Inductor fuses the elementwise work (norms, SiLU, rotary, autocast's casts) that is
            # most of a small model's bf16 step on a CPU; dynamic, since packed batches vary in
            # rows and width. Evaluation and saving use raw_model, which compiling leaves as it is.
            self.model = torch.compile(self.model, dynamic=True)
        self.pad_id = tokenizer.pad_token_id
        self.label_counts = train_data.label_counts()
        self.start_step, self._plan_epoch, self._plan = 0, None, None
        self.resumed_from: str | None = None
        self.step = 0  # the step being taken: growing position gaps depend on it
        self.loss_denominator(np.arange(1)), self.lr_at(0)  # a misspelt option fails before any work
        if cfg.pack_records:
            self.packed_attention_mask(torch.ones(1, 1, 1, dtype=torch.bool))

    # --- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        cfg, proc, step = self.cfg, self.processes, self.start_step
        if step == self.total_steps and self.resumed_from and os.path.basename(self.resumed_from) == "final":
            tqdm.write(f"{self.run_dir}: all {step} steps already trained; final/ is left as it is")
            return
        bar = tqdm(total=self.total_steps, initial=step, desc="train", disable=not proc.is_main,
                   dynamic_ncols=True)
        if step == 0 and cfg.eval_at_start:
            self.evaluate(step)
        loss_sum, counts, t0 = self.zero_stats()
        while step < self.total_steps:
            self.step = step
            batch = self.batch_at(step)
            lr = self.lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            scale = proc.world_size / self.loss_denominator(batch)
            parts = microbatches(batch, proc.rank, proc.world_size, cfg.gradient_accumulation_steps)
            for k, indices in enumerate(parts):
                last = k == len(parts) - 1
                no_sync = self.model.no_sync if proc.distributed and not last else contextlib.nullcontext
                with no_sync():
                    nll = self.nll(self.train_data, indices)
                    (nll * scale).backward()
                loss_sum += nll.detach()  # stays on the device: no sync per microbatch
                counts += self.counts(self.train_data, indices)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            records = step * cfg.batch_size
            if step % cfg.log_every == 0 or step == self.total_steps:
                self.log_train(step, loss_sum, counts, grad_norm, lr, time.perf_counter() - t0, bar)
                loss_sum, counts, t0 = self.zero_stats()
            if self.crossed(records, cfg.eval_every) or step == self.total_steps:
                self.evaluate(step)
            if self.crossed(records, cfg.save_every) and step < self.total_steps:
                self.save(f"step-{step}", step)
        bar.close()
        self.save("final", step)

    # --- pieces of a step --------------------------------------------------------------------
    def nll(self, data: TokenizedRecords, indices, model=None):
        """Summed NLL of the output tokens of some records, by ``model`` (the training wrapper)."""
        if self.packed_rows(data, indices) < len(indices):
            inputs = collate_packed(data, indices, self.pad_id, self.position_ids if self.line_positions else None)
            attention_mask = self.packed_attention_mask(inputs.pop("allowed"))
        else:
            inputs = collate(data, indices, self.pad_id)
            attention_mask = None  # right padding under a causal mask never affects real tokens
            if self.line_positions:
                inputs["position_ids"] = self.position_ids(inputs["input_ids"])
                # Without a mask, transformers reads every jump in position_ids as the start of another
                # packed sequence and would hide each line from the next.
                attention_mask = torch.ones_like(inputs["input_ids"])
        device = self.processes.device
        labels = inputs.pop("labels").to(device, non_blocking=True)
        inputs = {name: value.to(device, non_blocking=True) for name, value in inputs.items()}
        if attention_mask is not None:
            attention_mask = attention_mask.to(device, non_blocking=True)
        with self.autocast():
            logits = (model or self.model)(**inputs, attention_mask=attention_mask, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                              ignore_index=IGNORE_INDEX, reduction="sum")
        return nll

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Line positions; in training, plus each of ``position_gaps`` (``modeling.PositionGap``)."""
        ids = self.line_positions.ids(input_ids)
        if not self.position_gaps or not self.model.training:
            return ids
        line_start = F.pad(input_ids[:, :-1] == self.line_positions.newline_id, (1, 0), value=True)
        shift = sum(gap.shift(input_ids, line_start, self.step) for gap in self.position_gaps)
        free_share = self.cfg.get("position_gaps_free_share")
        if free_share and self.step >= self.cfg.get("position_gaps_free_from_step", 0):  # drawn only then:
            shift = shift * (torch.rand(len(input_ids), 1) >= free_share)  # other runs keep their random stream
        return ids + shift

    def packed_attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """The 4D mask transformers takes as given: bool for SDPA, additive for eager attention."""
        implementation = self.raw_model.config._attn_implementation
        if implementation == "sdpa":
            return allowed[:, None]
        if implementation == "eager":
            blocked = torch.finfo(self.raw_model.dtype).min
            return torch.zeros(allowed.shape, dtype=self.raw_model.dtype).masked_fill(~allowed, blocked)[:, None]
        raise ValueError(f"pack_records=true needs sdpa or eager attention, not {implementation!r}; "
                         "set pack_records=false")

    def zero_stats(self):
        return torch.zeros((), device=self.processes.device), np.zeros(4), time.perf_counter()

    def counts(self, data: TokenizedRecords, indices) -> np.ndarray:
        """[records, loss tokens, real tokens, computed tokens (padding included)] of a microbatch."""
        lengths = data.lengths[indices]
        in_loss = lengths - np.maximum(data.prompt_lengths[indices], 1)
        return np.array([len(indices), in_loss.sum(), lengths.sum(), lengths.max() * self.packed_rows(data, indices)])

    def packed_rows(self, data: TokenizedRecords, indices) -> int:
        """Rows of a microbatch: fewer than its records where ``pack_records`` lets some share a row.
        Where no two fit in the longest one's width (every DP baseline and scratchpad microbatch)
        it stays padded: there the 4D mask would only cost (DP scratchpad: 0.75x the padded tokens/s)."""
        lengths = data.lengths[indices]
        return len(pack_rows(lengths, lengths.max())) if self.cfg.pack_records else len(indices)

    def loss_denominator(self, batch) -> float:
        """Sequences (``sum``) or output tokens (``mean``) in the whole global batch."""
        if self.cfg.loss_reduction == "sum":
            return float(len(batch))
        if self.cfg.loss_reduction == "mean":
            return float(self.label_counts[batch].sum())
        raise ValueError(f"loss_reduction must be 'sum' or 'mean', not {self.cfg.loss_reduction!r}")

    def batch_at(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._plan_epoch != epoch:
            self._plan = batch_plan(self.train_data.lengths, self.cfg.batch_size, self.cfg.seed, epoch,
                                    self.cfg.group_by_length, self.cfg.length_group_window)
            self._plan_epoch = epoch
        return self._plan[index]

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        return learning_rate(step, cfg.lr, self.total_steps, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio)

    def crossed(self, records: int, every) -> bool:
        """Did the last step pass a multiple of ``every`` records?"""
        return bool(every) and records // every > (records - self.cfg.batch_size) // every

    # --- evaluation and logging --------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        if len(self.eval_data) == 0:
            return {}
        self.model.eval()
        data, size = self.eval_data, self.cfg.eval_batch_size
        order = np.argsort(data.lengths, kind="stable")  # little padding
        batches = [order[i:i + size] for i in range(0, len(order), size)][self.processes.rank::self.processes.world_size]
        loss_sum, counts, _ = self.zero_stats()
        for indices in batches:
            # The bare model: DDP's forward is a collective, and ranks hold different batch counts.
            loss_sum += self.nll(data, indices, self.raw_model)
            counts += self.counts(data, indices)
        self.model.train()
        nll, seqs, tokens = self.reduce(loss_sum, counts)[:3]
        values = {"eval/loss_per_sequence": nll / max(seqs, 1), "eval/loss_per_token": nll / max(tokens, 1)}
        values["eval/loss"] = values["eval/loss_per_sequence" if self.cfg.loss_reduction == "sum" else "eval/loss_per_token"]
        values["records"] = step * self.cfg.batch_size
        if self.processes.is_main:
            tqdm.write(f"step {step}: eval loss {values['eval/loss']:.4f} "
                       f"({values['eval/loss_per_token']:.4f} per token)")
        self.logger.log(step, values)
        return values

    def reduce(self, loss_sum, counts) -> list[float]:
        """[loss sum, records, loss tokens, real tokens, computed tokens] summed over processes."""
        values = torch.cat([loss_sum.double().view(1), torch.from_numpy(counts).double().to(loss_sum.device)])
        return all_reduce_sum(values, self.processes).tolist()

    def log_train(self, step, loss_sum, counts, grad_norm, lr, seconds, bar) -> None:
        nll, seqs, labels, tokens, computed = self.reduce(loss_sum, counts)
        values = {"records": step * self.cfg.batch_size, "epoch": step / self.steps_per_epoch,
                  "train/loss": nll / max(seqs if self.cfg.loss_reduction == "sum" else labels, 1),
                  "train/loss_per_token": nll / max(labels, 1), "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": tokens / seconds, "records_per_s": seqs / seconds,
                  "padding_share": 1 - tokens / max(computed, 1)}
        if self.processes.device.type == "cuda":
            values["cuda_max_memory_gb"] = torch.cuda.max_memory_allocated(self.processes.device) / 2**30
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        if self.processes.is_main:
            tqdm.write(f"step {step}: loss {values['train/loss']:.4f} | lr {lr:.2e} | grad norm {values['grad_norm']:.2f} | "
                       f"{values['tokens_per_s']:,.0f} tokens/s | {values['records_per_s']:,.1f} records/s | "
                       f"padding {values['padding_share']:.1%}")
        self.logger.log(step, values)

    # --- checkpoints -------------------------------------------------------------------------
    def save(self, name: str, step: int) -> None:
        """Write ``<run_dir>/<name>/`` through a staging folder renamed into place at the end."""
        proc, target = self.processes, os.path.join(self.run_dir, name)
        staging = target + ".tmp"
        if proc.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        barrier(proc)
        rng = {"torch": torch.get_rng_state()}
        if proc.device.type == "cuda":  # this process's GPU only: a resume may see fewer GPUs
            rng["cuda"] = torch.cuda.get_rng_state(proc.device)
        atomic_torch_save(rng, os.path.join(staging, f"rng_state_{proc.rank}.pt"))
        barrier(proc)
        if proc.is_main:
            save_model(self.raw_model, staging)
            self.tokenizer.save_pretrained(staging)
            atomic_torch_save({"optimizer": self.optimizer.state_dict()}, os.path.join(staging, "optimizer.pt"))
            epoch, index = divmod(step, self.steps_per_epoch)
            atomic_write_json(os.path.join(staging, "trainer_state.json"), {
                "step": step, "records_seen": step * self.cfg.batch_size, "epoch": epoch,
                "batch_in_epoch": index, "total_steps": self.total_steps, "batch_size": self.cfg.batch_size,
                "world_size": proc.world_size, "seed": self.cfg.seed})
            replace_directory(staging, target)
            self.prune_checkpoints()
            tqdm.write(f"step {step}: saved {target}")
        barrier(proc)

    def prune_checkpoints(self) -> None:
        keep = self.cfg.keep_checkpoints
        if not keep:
            return
        for step, path in sorted(list_checkpoints(self.run_dir))[:-keep]:
            if os.path.basename(path) != "final":
                shutil.rmtree(path)

    def restore(self, checkpoint_dir: str, state: dict) -> None:
        """Optimizer, RNG and data position from a checkpoint (the weights were loaded with the model)."""
        if state["batch_size"] != self.cfg.batch_size:
            raise ValueError(f"{checkpoint_dir}: trained with batch_size={state['batch_size']}, "
                             f"cannot resume with batch_size={self.cfg.batch_size}")
        # Onto the CPU first: a run saved on a GPU may resume on another one, or on none;
        # load_state_dict moves the state to the parameters' device.
        saved = torch.load(os.path.join(checkpoint_dir, "optimizer.pt"), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        rng_path = os.path.join(checkpoint_dir, f"rng_state_{self.processes.rank}.pt")
        if os.path.isfile(rng_path):
            rng = torch.load(rng_path, weights_only=True)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.processes.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.processes.device)
        self.start_step, self.resumed_from = int(state["step"]), checkpoint_dir


def planned_steps(n_records: int, cfg) -> int:
    """Optimizer steps of a run: ``n_epochs`` epochs, cut short by ``n_examples`` records if set."""
    steps = steps_per_epoch(n_records, cfg.batch_size) * cfg.n_epochs
    return min(steps, math.ceil(cfg.n_examples / cfg.batch_size)) if cfg.n_examples else steps


def learning_rate(step: int, lr: float, total_steps: int, warmup_steps: int, schedule: str = "constant",
                  min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up, step s (from 0) at (s+1)/(warmup_steps+1) of ``lr`` (so warmup_steps=1 runs
    only the first step at half the lr, as the paper), then constant, or cosine down to
    ``min_lr_ratio * lr`` at the last step."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {schedule!r}")
    rate = lr * min(1.0, (step + 1) / (warmup_steps + 1))
    if schedule == "cosine" and step >= warmup_steps:
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
        rate *= min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return rate


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in a run directory, ``final`` included."""
    found = []
    if not os.path.isdir(run_dir):
        return found
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        state_path = os.path.join(path, "trainer_state.json")
        if (CHECKPOINT_PATTERN.match(name) or name == "final") and os.path.isfile(state_path):
            with open(state_path) as handle:
                found.append((int(json.load(handle)["step"]), path))
    return found


def latest_checkpoint(run_dir: str) -> tuple[str, dict] | None:
    """The newest complete checkpoint of a run and its trainer state, or None."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return None
    step, path = max(checkpoints, key=lambda item: (item[0], os.path.basename(item[1]) == "final"))
    with open(os.path.join(path, "trainer_state.json")) as handle:
        return path, json.load(handle)
