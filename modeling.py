"""Models and tokenizers: one code path for every model the trainer and the evaluator use.

* ``build_char_tokenizer()`` makes the tiny model's tokenizer: one token per character, so every
  digit is a single token (as in LLaMA's tokenizer), EOS ``</s>`` doubling as padding, no BOS.
  ``"07 + 58\\nAnswer: "`` -> 16 ids, one per character.
* ``load_model_and_tokenizer(model_cfg, lora_cfg)`` builds or loads a causal LM from the
  ``model:`` block of the Hydra config (``config/model/*.yaml``) and wraps it in a PEFT LoRA
  adapter when ``lora.enabled``. A hub or local name goes through ``AutoModelForCausalLM``; the
  tiny model (``from_scratch: true``) is a ``LlamaForCausalLM`` built from the YAML's
  ``llama_config`` with a seed.
* ``load_checkpoint(dir)`` loads what the trainer saved (a full model or a LoRA adapter) for
  evaluation.

A LoRA checkpoint's ``adapter_config.json`` names its base model in ``base_model_name_or_path``.
For a hub model that is the hub name (or the local path the config gave). For a from-scratch base
the trainer saves the base once in ``<run_dir>/base_model/`` and writes the path *relative to the
checkpoint directory*, ``"../base_model"``, so a run directory stays valid wherever it is moved;
``load_checkpoint`` resolves such a path against the checkpoint directory first.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
# Every printable ASCII character plus newline: all the characters the task formats use.
CHAR_ALPHABET = "\n" + "".join(chr(code) for code in range(32, 127))
FROM_SCRATCH_BASE_DIR = "base_model"  # beside the checkpoints, in the run directory
# What a LoRA adapter of a from-scratch base records as its base: relative to the checkpoint dir.
FROM_SCRATCH_BASE_PATH = os.path.join(os.pardir, FROM_SCRATCH_BASE_DIR)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids 0/1 are ``</s>`` (EOS and pad) and ``<unk>``, then one id
    per character of ``CHAR_ALPHABET``. No BOS is ever added; decoding concatenates characters.

    ``tok("9 + 9\\nSolution: ").input_ids`` has 16 ids; ``tok.decode(ids) == "9 + 9\\nSolution: "``.
    """
    vocab = {EOS_TOKEN: 0, UNK_TOKEN: 1}
    for char in CHAR_ALPHABET:
        vocab[char] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Each single character, newline included, is its own pre-token, so WordLevel sees one char.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN,
                                        pad_token=EOS_TOKEN, unk_token=UNK_TOKEN,
                                        padding_side="right", clean_up_tokenization_spaces=False)
    return tokenizer


def _plain(cfg: Any) -> Any:
    """An OmegaConf node (or anything) as plain Python containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return cfg


def _prepare_tokenizer(tokenizer):
    """The paper's conventions: pad = EOS, right padding, nothing added around a text."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token; the trainer appends EOS to every output")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_model(llama_config: Mapping[str, Any], tokenizer, seed: int,
                     dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A freshly initialised Llama from YAML fields; same seed, same weights."""
    fields = dict(llama_config)
    fields.setdefault("vocab_size", len(tokenizer))
    fields.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=None)
    config = LlamaConfig(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def load_model_and_tokenizer(model_cfg: Mapping[str, Any], lora_cfg: Mapping[str, Any] | None = None,
                             seed: int = 0, dtype: str | torch.dtype | None = None,
                             base_save_dir: str | None = None):
    """The model and tokenizer named by a ``model:`` config block, LoRA-wrapped when asked.

    ``model_cfg`` keys: ``name_or_path`` (hub name or local directory), ``from_scratch`` with
    ``llama_config`` (the tiny model), ``tokenizer`` (``"char"`` for the project's tokenizer,
    else a name; default ``name_or_path``), ``dtype``, ``config_overrides`` (extra
    ``from_pretrained`` kwargs; a hub model's own dropout is set to 0 whatever they say, as
    the paper's training did), ``lora_target_modules`` (a list of module
    names, or ``"all-linear"``). ``lora_cfg`` keys: ``enabled``, ``lora_r``, ``lora_alpha``,
    ``lora_dropout``. ``base_save_dir``: where a from-scratch base is saved, before the adapter is
    added, when LoRA is on (the trainer passes ``<run_dir>/base_model``).
    """
    model_cfg = dict(_plain(model_cfg))
    lora_cfg = dict(_plain(lora_cfg) or {})
    dtype = dtype or model_cfg.get("dtype") or "float32"
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype

    tokenizer_name = model_cfg.get("tokenizer") or model_cfg.get("name_or_path")
    if tokenizer_name == "char":
        tokenizer = build_char_tokenizer()
    elif tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    else:
        raise ValueError("model config needs `tokenizer` or `name_or_path`")
    tokenizer = _prepare_tokenizer(tokenizer)

    if model_cfg.get("from_scratch"):
        model = build_tiny_model(model_cfg.get("llama_config") or {}, tokenizer, seed, torch_dtype)
    else:
        if not model_cfg.get("name_or_path"):
            raise ValueError("model config needs `name_or_path` unless `from_scratch: true`")
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg["name_or_path"], dtype=torch_dtype,
            **(model_cfg.get("config_overrides") or {}))
        without_dropout(model)
    model.config.use_cache = False  # no KV cache while training

    if lora_cfg.get("enabled"):
        if model_cfg.get("from_scratch") and base_save_dir:
            save_pretrained_atomic(model, tokenizer, base_save_dir)
        if model_cfg.get("from_scratch"):
            base = FROM_SCRATCH_BASE_PATH
        elif os.path.isdir(model_cfg["name_or_path"]):  # a local base, found from any directory
            base = os.path.abspath(model_cfg["name_or_path"])
        else:
            base = model_cfg["name_or_path"]
        model = add_lora(model, lora_cfg, model_cfg.get("lora_target_modules") or "all-linear", base)
    return model, tokenizer


def without_dropout(model) -> None:
    """The base model's own dropout set to 0, as the paper's training did (SPEC section 5;
    LoRA's dropout is added after): every ``nn.Dropout``, every attention module's
    ``attention_dropout`` rate (Llama's is a number, not a module), and the config's rates."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    for key, value in model.config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(model.config, key, 0.0)


def add_lora(model, lora_cfg: Mapping[str, Any], target_modules, base_name_or_path: str):
    """Wrap ``model`` in a PEFT LoRA adapter (bias none, as the paper)."""
    from peft import LoraConfig, get_peft_model
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = LoraConfig(r=int(lora_cfg.get("lora_r", 64)), lora_alpha=float(lora_cfg.get("lora_alpha", 64)),
                        lora_dropout=float(lora_cfg.get("lora_dropout", 0.05)), bias="none",
                        target_modules=target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = base_name_or_path
    return model


def save_model(model, directory: str) -> None:
    """``save_pretrained``: safetensors + config for a full model, the adapter alone for LoRA.
    (The embeddings are never resized here, so PEFT need not look the base model up to check.)"""
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory, save_embedding_layers=False)
    else:
        model.save_pretrained(directory)


def save_pretrained_atomic(model, tokenizer, directory: str) -> None:
    """``save_pretrained`` of model and tokenizer into ``directory``, written beside it first and
    renamed into place, so a reader never sees half a checkpoint."""
    directory = os.path.normpath(directory)
    staging = directory + ".tmp"
    if os.path.isdir(staging):
        import shutil
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    replace_directory(staging, directory)


def replace_directory(source: str, target: str) -> None:
    """Move ``source`` to ``target``, replacing an older ``target`` (renamed away first)."""
    import shutil
    if os.path.isdir(target):
        old = target + ".old"
        if os.path.isdir(old):
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)


def is_lora_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def resolve_base_model(checkpoint_dir: str) -> str:
    """Where a LoRA checkpoint's base model is: a path relative to the checkpoint directory (the
    tiny base, ``"../base_model"``), else the name as written (a hub name or a local path)."""
    with open(os.path.join(checkpoint_dir, "adapter_config.json")) as handle:
        base = json.load(handle)["base_model_name_or_path"]
    beside = os.path.normpath(os.path.join(checkpoint_dir, base))
    if not os.path.isabs(base) and os.path.isdir(beside):
        return beside
    if base.startswith("."):  # meant beside the checkpoint, but the run directory is not there
        raise FileNotFoundError(f"{checkpoint_dir}: the LoRA adapter's base model {base!r} is not at {beside} "
                                "(copy the run directory whole, or set base_model_name_or_path in "
                                "adapter_config.json)")
    return base


def load_checkpoint(checkpoint_dir: str, dtype: str | torch.dtype = "float32", merge_lora: bool = False):
    """A trained checkpoint (``runs/<exp>/final`` or ``step-<n>``) and its tokenizer, in eval mode.

    Full models load with ``AutoModelForCausalLM``; LoRA checkpoints load their base (see
    ``resolve_base_model``) then ``PeftModel.from_pretrained``; ``merge_lora`` folds the adapter in.
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(checkpoint_dir))
    if is_lora_checkpoint(checkpoint_dir):
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained(resolve_base_model(checkpoint_dir), dtype=torch_dtype)
        model = PeftModel.from_pretrained(base, checkpoint_dir)
        if merge_lora:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch_dtype)
    model.eval()
    return model, tokenizer


class LinePositions:
    """Position ids that restart at every line: the t-th token of line k sits at ``k * stride + t``.

    ``"73199 + 21439\nSolution: Call: 3199 + 1439\n"``: ``7`` is at 0, ``S`` at ``stride``, and
    the ``3`` the call copies is 1 + ``stride`` - 15 = ``stride`` - 14 ids before the ``3`` it
    writes, for any operand length. A Re-Tuning step copies between lines at offsets that do not
    depend on the problem's length, so with these ids a RoPE model sees at every length the same
    distances it was trained on (docs/tiny_model.md). A line longer than ``stride`` shares ids
    with the start of the next line (the distances between lines stay the same; the tokens
    differ).

    The model stays a standard ``LlamaForCausalLM``; the scheme is the config's
    ``line_position_stride`` (absent or 0: ordinary positions), which the trainer and the
    evaluation engine read. Plain ``model.generate`` does not know it.
    """

    def __init__(self, newline_id: int, stride: int):
        self.newline_id, self.stride = newline_id, stride

    @classmethod
    def of(cls, model, tokenizer) -> "LinePositions | None":
        """The scheme a model was built with, or None for ordinary positions."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        stride = int(getattr(config, "line_position_stride", 0) or 0)
        if stride <= 0:
            return None
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) != 1 or tokenizer("a\nb", add_special_tokens=False)["input_ids"][1:2] != newline:
            raise ValueError(f"line_position_stride={stride} needs a tokenizer that makes every newline "
                             f"one token of its own; this one encodes '\\n' as {newline}")
        return cls(newline[0], stride)

    def ids_and_line_starts(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids for a batch of rows that start at column 0 (right padding is harmless),
        and for each token the id where its line starts (``k * stride`` for line k)."""
        newline = input_ids == self.newline_id
        line_starts = (newline.long().cumsum(dim=1) - newline.long()) * self.stride
        columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        first_column = torch.where(torch.nn.functional.pad(newline[:, :-1], (1, 0)), columns,
                                   torch.zeros_like(columns)).cummax(dim=1).values
        return line_starts + columns - first_column, line_starts

    def ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Position ids for a batch of rows that start at column 0 (right padding is harmless)."""
        return self.ids_and_line_starts(input_ids)[0]

    def following(self, line_starts: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor):
        """The line start and position of the token after each token (at ``positions``, in a line
        starting at ``line_starts``): a newline's successor begins the next line."""
        newline = tokens == self.newline_id
        next_start = torch.where(newline, line_starts + self.stride, line_starts)
        return next_start, torch.where(newline, next_start, positions + 1)


class PositionGap:
    r"""One entry of the trainer's ``position_gaps``: in training only, each record draws a gap
    g in 0..``largest`` and every line moves g positions on from a place this entry marks.

    * ``{after: "+", max: 16}``: from the line's first ``+``. ``"12 + 34\nSolution: Call: 2 + 4"``
      has ``+ 34`` and ``+ 4`` g further on: the copy between the lines keeps its distance while
      the distance between the operands varies.
    * ``{inside: "01, ", before: "]", from_right: 28, max: 32}``: from inside the run of
      ``inside`` characters that ends just before ``before``, at its k-th token from the end (k
      drawn in 1..``from_right`` per record; the run's first token if it is shorter).
      ``"of [1, 0, 1]?\nSolution: Call: ... of [0, 1]?"`` with k = 4 moves ``0, 1]?`` in both
      lines: copies that keep the list's end in place keep their distance, while how far the
      list runs no longer follows its length (parity, docs/tiny_model.md). A record's end counts
      as a newline here, so ``before: "\n"`` also marks the run that ends the output:
      ``"...Return: Carry 0, Output 46\nAnswer: "`` + ``"Carry 0, Output 146"`` moves ``46`` and
      ``146`` from the same k-th digit from the right, and the answer's copy keeps its distance.

    * ``{after: "R", max: 16, onward: true}``: the move does not stop at the line's end but
      carries on to the record's end. ``"...Call: 2 + 4\nReturn: Carry 0, Output 6\nAnswer: "``
      moves the return and answer lines together, g further from the problem and the call: the
      answer's copy of the returned digits keeps its distance, while no fixed distance reaches
      back into the call (addition, docs/tiny_model.md).

    ``grow_steps: N`` makes the largest gap grow from 0 over the first N training steps.
    """

    SHAPES = ({"after", "max"}, {"inside", "before", "from_right", "max"})  # each may add OPTIONAL
    OPTIONAL = {"grow_steps", "onward"}
    KEYS = set().union(*SHAPES, OPTIONAL)

    def __init__(self, entry, tokenizer, newline_id: int):
        unknown = set(entry) - self.KEYS
        if unknown:
            raise ValueError(f"position_gaps: unknown key(s) {sorted(unknown)} in {dict(entry)}; an entry has "
                             "either after, or inside, before and from_right; then max and optionally grow_steps "
                             "and onward")
        if set(entry) - self.OPTIONAL not in self.SHAPES:
            raise ValueError(f"position_gaps: {dict(entry)} needs max and either after, or inside, before "
                             "and from_right")

        def one_token_each(key):
            # Hydra keeps a command line's backslash-n as two characters; here it is the newline.
            ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in entry[key].replace("\\n", "\n")]
            if any(len(i) != 1 for i in ids):
                raise ValueError(f"position_gaps: {key}={entry[key]!r} must be characters of one token each")
            return torch.tensor([i[0] for i in ids])

        self.after = one_token_each("after") if "after" in entry else None
        self.inside = one_token_each("inside") if "inside" in entry else None
        self.before = one_token_each("before") if "before" in entry else None
        self.newline, self.end_of_record = newline_id, tokenizer.eos_token_id  # LinePositions' newline
        self.from_right = int(entry.get("from_right", 1))
        self.largest, self.grow_steps = int(entry["max"]), int(entry.get("grow_steps", 0) or 0)
        self.onward = bool(entry.get("onward", False))
        if self.from_right < 1 or self.largest < 0 or self.grow_steps < 0:
            raise ValueError(f"position_gaps: {dict(entry)} needs from_right >= 1, max >= 0 and grow_steps >= 0")

    def starts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True where a line may start moving (the move begins at the line's first such token).
        An ``inside`` entry draws its k here, once per row."""
        if self.after is not None:
            return torch.isin(input_ids, self.after)
        rows, n = input_ids.shape
        columns = torch.arange(n).expand_as(input_ids)
        in_run = torch.isin(input_ids, self.inside)
        run_end = torch.where(in_run, n, columns).flip(1).cummin(dim=1).values.flip(1)  # first token past the run
        from_end = run_end - columns  # 1 for a run's last token
        tail = F.pad(input_ids, (0, len(self.before)), value=-1)
        tail = tail.masked_fill(tail == self.end_of_record, self.newline)
        ends_before = torch.ones_like(in_run)
        for offset, token in enumerate(self.before.tolist()):
            ends_before &= tail.gather(1, run_end + offset) == token
        in_run &= ends_before
        first = in_run & ~F.pad(in_run[:, :-1], (1, 0), value=False)
        k = torch.randint(1, self.from_right + 1, (rows, 1))
        return in_run & ((from_end == k) | (first & (from_end < k)))

    def shift(self, input_ids: torch.Tensor, line_start: torch.Tensor, step: int) -> torch.Tensor:
        """Each token's gap: g (drawn per row) from its line's first start on (``onward``: from the
        row's first start on), else 0."""
        largest = round(self.largest * min(1.0, step / self.grow_steps)) if self.grow_steps else self.largest
        starts = self.starts(input_ids).long()
        seen = starts.cumsum(dim=1)
        if self.onward:
            moved = seen > 0
        else:
            moved = seen > torch.where(line_start, seen - starts, 0).cummax(dim=1).values
        return torch.randint(0, largest + 1, (len(input_ids), 1)) * moved


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def load_for_resume(checkpoint_dir: str, model_cfg: Mapping[str, Any], dtype: str | torch.dtype | None = None):
    """A checkpoint as a *trainable* model (LoRA adapters stay trainable) and its tokenizer."""
    model_cfg = dict(_plain(model_cfg))
    dtype = dtype or model_cfg.get("dtype") or "float32"
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(checkpoint_dir))
    if is_lora_checkpoint(checkpoint_dir):
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained(resolve_base_model(checkpoint_dir), dtype=torch_dtype,
                                                    **(model_cfg.get("config_overrides") or {}))
        base.config.use_cache = False
        model = PeftModel.from_pretrained(base, checkpoint_dir, is_trainable=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch_dtype)
        model.config.use_cache = False
    return model, tokenizer
