"""Small helpers the trainer shares: atomic writes, processes and devices, metrics logging."""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


# --- files ---------------------------------------------------------------------------------

def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to a temp file in the same folder, then rename it over ``path``: a reader
    sees the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def atomic_torch_save(value, path: str) -> None:
    """``torch.save`` through a temp file; the value must hold only tensors and plain Python
    containers/numbers so that ``torch.load(path, weights_only=True)`` reads it back."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(value, temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


# --- processes and devices -----------------------------------------------------------------

@dataclass
class Processes:
    """Where this process sits in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when CUDA is available, else the CPU."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if str(preference).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={preference}: this torch ({torch.__version__}) sees no CUDA device; "
                         "use cpu or auto")
    if preference == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(preference)


def init_processes(device_preference: str = "auto") -> Processes:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(rank=int(os.environ.get("RANK", "0")), world_size=world_size,
                     local_rank=local_rank,
                     local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
                     device=device)


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, processes: Processes) -> torch.Tensor:
    if processes.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


PRECISIONS = ("auto", "bf16", "none")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). There bf16
    autocast trains the tiny model about 2.2x faster than fp32 (``bench/bench_train.py``);
    elsewhere bf16 is emulated and no faster."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def uses_bf16_autocast(device: torch.device, mode: str = "auto") -> bool:
    """bf16 autocast with ``bf16``, and with ``auto`` where the hardware runs bf16 natively (CUDA
    GPUs that support it, CPUs with AVX512-BF16 or AMX); fp32 with ``none`` and elsewhere.
    Weights and optimizer state stay in their own dtype either way."""
    if mode not in PRECISIONS:
        raise ValueError(f"mixed_precision: expected one of {', '.join(PRECISIONS)}, got {mode!r}")
    native = {"cuda": lambda: torch.cuda.is_bf16_supported(), "cpu": cpu_has_native_bf16}
    return mode == "bf16" or (mode == "auto" and native.get(device.type, lambda: False)())


# --- logging -------------------------------------------------------------------------------

class MetricsLogger:
    """One JSON object per line in ``<run_dir>/metrics.jsonl``, mirrored to TensorBoard / W&B
    when enabled. ``{"step": 40, "records": 2560, "train/loss": 0.61, "lr": 0.001, ...}``."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = False, wandb_cfg=None,
                 config: dict | None = None, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if resume_step is not None:
            self._drop_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise RuntimeError("tensorboard=true needs the `tensorboard` package") from error
            self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if wandb_cfg is not None and wandb_cfg.get("enabled"):
            try:
                import wandb
            except ImportError as error:
                raise RuntimeError("wandb.enabled=true needs the `wandb` package") from error
            self.wandb = wandb.init(project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"),
                                    config=config, dir=run_dir, name=os.path.basename(run_dir))
        self.handle = open(self.path, "a", encoding="utf-8")

    def _drop_after(self, step: int) -> None:
        """On resume, forget lines the interrupted run logged after its last checkpoint."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as handle:
            lines = [line for line in handle if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by the interruption
                continue
        atomic_write_text(self.path, "".join(kept))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)):
                if self.tensorboard is not None:
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
