"""Backends: what the evaluation engine asks a model for, and the models that answer.

The engine only ever calls ``backend.generate(requests)``: a list of contexts in, one completion
per context out. A request may name the cached context it extends (``parent``) and a key under
which to keep its own cache (``key``), so a backend that can reuse a KV cache only encodes the
appended text of a continuation::

    parent context  "73199 + 21439\\nSolution: "   + its completion "Call: 3199 + 1439\\n"
    continuation    parent + completion + "Return: Carry 0, Output 4638\\nAnswer: "
                    (only the last 31 characters are new)

Backends here:

* ``OracleBackend``: the task module answers every context (a perfect model; tests).
* ``CallableBackend``: any ``context -> text`` function (garbage and runaway models in tests).
* ``HFBackend``: a Hugging Face causal LM, batched, left padding, greedy or sampled, with
  per-context KV-cache reuse.
* ``HFSequentialBackend``: ``model.generate`` on one context at a time with no reuse (the
  original code's way; the reference the batched backend is checked and benchmarked against).

A vLLM backend would implement ``generate`` the same way (its prefix cache does the reuse).
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch
from tqdm import tqdm

from modeling import LinePositions


@dataclass
class Request:
    """One context to complete. ``key``: keep this context's cache under that key (the engine
    will continue it), only if ``keep_if(completion text)`` when given; ``parent``: the key of a
    cached context this one extends."""

    context: str
    max_new_tokens: int = 256
    key: Hashable | None = None
    parent: Hashable | None = None
    keep_if: Callable[[str], bool] | None = None


@dataclass
class Completion:
    """What the model wrote after a context, EOS not included.

    ``hit_eos`` is False when generation stopped at ``max_new_tokens``; ``error`` names a reason
    the backend could not generate at all (``"context_too_long"``). ``prompt_tokens`` is the
    context's length in tokens, ``prompt_tokens_computed`` how many of them were encoded for
    this generation (the rest came from a parent's cache)."""

    text: str
    n_generated: int
    hit_eos: bool
    prompt_tokens: int
    prompt_tokens_computed: int
    error: str | None = None


class Backend:
    """The interface the engine drives. ``count_tokens`` sizes generation budgets; ``release``
    drops caches the engine will not continue (a no-op for backends without a cache)."""

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        return len(text)

    def release(self, keys) -> None:
        pass


class CallableBackend(Backend):
    """Completes each context with ``complete(context)``, which returns the text, or a pair
    ``(text, hit_eos)``. One character is one token and EOS one more, as for the tiny model: a
    text that with its EOS runs past ``max_new_tokens`` is cut there and counts as no EOS."""

    def __init__(self, complete: Callable[[str], str | tuple[str, bool]]):
        self.complete = complete

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        completions = []
        for request in requests:
            answer = self.complete(request.context)
            text, hit_eos = answer if isinstance(answer, tuple) else (answer, True)
            if len(text) + int(hit_eos) > request.max_new_tokens:
                text, hit_eos = text[:request.max_new_tokens], False
            completions.append(Completion(text, len(text) + int(hit_eos), hit_eos,
                                          len(request.context), len(request.context)))
        return completions


class OracleBackend(CallableBackend):
    """A perfect model: the task module's oracle writes every completion."""

    def __init__(self, task, method: str):
        super().__init__(lambda context: task.oracle(context, method))


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no EOS token: generation could never stop")
    return ids


def completion_text(tokenizer, new_ids: list[int]) -> str:
    """The text of a completion's ids, decoded on their own.

    Training tokenizes each record's output on its own (``preference_datasets.tokenize_records``),
    so a model writes an output as those ids, and decoding them on their own gives the output
    back. A sentencepiece tokenizer marks the start of a text with a space (``"Call: 7 + 3\\n"``
    -> ``▁Call : ▁7 ...``), which decoding on its own drops again; decoding the ids as the
    continuation of the prompt would keep it (``" Call: 7 + 3\\n"``) and put a context together
    that no training record holds.
    """
    # Special tokens stay in the text (EOS is taken off before): a model that writes ``<unk>``
    # is read, fed back and scored as it wrote it.
    return tokenizer.decode(new_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass
class _CachedContext:
    """A context's token ids and, per layer, its keys and values ``[heads, len(ids), dim]``."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@functools.lru_cache(maxsize=None)
def _buffer_layer_class():
    """A cache layer holding a batch's keys and values in zero-filled buffers sized, up front, for
    every token the batch will see. Like transformers' ``StaticLayer`` it hands attention the
    whole buffer and reports the buffer's width as the mask width (columns not yet written are
    masked out). A decoding step then writes one column instead of copying the cache
    (``DynamicLayer`` concatenates every step), and attention reads a contiguous tensor, which
    on a CPU is several times faster than a slice of one. Built on first use so that importing
    this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
            super().__init__()
            self.keys, self.values, self.length = keys, values, length
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self.keys.shape[-2]:
                raise RuntimeError(f"cache buffer of {self.keys.shape[-2]} columns cannot take {end}")
            self.keys[:, :, self.length:end] = key_states
            self.values[:, :, self.length:end] = value_states
            self.length = end
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[-2], 0

        def batch_select_indices(self, indices):
            self.keys, self.values = self.keys[indices], self.values[indices]

        def make_room(self, columns: int, chunk: int) -> None:
            """Grow the buffers, ``chunk`` columns at a time, until ``columns`` more fit."""
            missing = self.length + columns - self.keys.shape[-2]
            if missing > 0:
                extra = -(-missing // chunk) * chunk
                pad = lambda t: torch.cat([t, t.new_zeros(t.shape[:2] + (extra, t.shape[3]))], dim=2)  # noqa: E731
                self.keys, self.values = pad(self.keys), pad(self.values)

    return BufferLayer


def _buffer_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], length: int):
    """A ``DynamicCache`` of buffer layers; ``layers`` are the (keys, values) buffers per layer,
    their first ``length`` columns already filled."""
    from transformers import DynamicCache
    cache = DynamicCache()
    cache.layers = [_buffer_layer_class()(keys, values, length) for keys, values in layers]
    return cache


class HFBackend(Backend):
    """A Hugging Face causal LM generating many contexts at once.

    Contexts are tokenized with no special tokens, sorted by length and cut into batches of
    ``batch_size`` rows; each batch is left padded (explicit attention mask, positions counted
    from each row's first real token) and decoded greedily (``temperature`` 0) or by sampling,
    a row leaving the batch as soon as it writes EOS or reaches its ``max_new_tokens``. A batch
    that runs out of GPU memory is done again in halves, and later batches keep the smaller size.

    With ``reuse_cache``, a finished row's keys and values are kept under its request's ``key``;
    a later request naming it as ``parent`` reuses the longest common token prefix and encodes
    only the rest. Rows of one batch may then have caches of different lengths: their past is
    left padded too, so a row reads ``[pad | cached | pad | new]``, padding masked out.
    ``cache_budget_tokens`` bounds the tokens held in kept caches (None: no bound); a context
    that does not fit is recomputed when continued.
    """

    # Cache buffers grow by this many columns: attention reads at most this many unused ones.
    ROOM_CHUNK = 16
    # Finished rows leave the batch once they are this share of it (each removal copies the
    # cache; on a CPU removing them at once measured as fast as waiting for a quarter).
    COMPACT_SHARE = 0.0

    def __init__(self, model, tokenizer, batch_size: int = 64, temperature: float = 0.0,
                 seed: int = 0, reuse_cache: bool = True, cache_budget_tokens: int | None = None,
                 attn_implementation: str | None = "auto"):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        if attn_implementation == "auto":
            # On a CPU, eager attention reads the strided cache buffers about twice as fast as
            # sdpa (bench/bench_engine.py); on a GPU the model keeps what it was loaded with.
            attn_implementation = "eager" if self.device.type == "cpu" else None
        if attn_implementation and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn_implementation)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.temperature = temperature
        self.eos_ids = _eos_ids(model, tokenizer)
        self.eos_tensor = torch.tensor(sorted(self.eos_ids), device=self.device)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        text_config = model.config.get_text_config()
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        self.layer_count = text_config.num_hidden_layers
        self.kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        self.head_dim = getattr(text_config, "head_dim", None) or \
            text_config.hidden_size // text_config.num_attention_heads
        self.dtype = next(model.parameters()).dtype
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.reuse_cache = reuse_cache
        self.cache_budget_tokens = cache_budget_tokens
        self.line_positions = LinePositions.of(model, tokenizer)
        self._cache: dict[Hashable, _CachedContext] = {}
        self._cached_tokens = 0

    # --- interface ------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def release(self, keys) -> None:
        for key in keys:
            entry = self._cache.pop(key, None)
            if entry is not None:
                self._cached_tokens -= len(entry.ids)

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        if not requests:
            return []
        all_ids = self.tokenizer([r.context for r in requests], add_special_tokens=False)["input_ids"]
        results: list[Completion | None] = [None] * len(requests)
        rows = []  # (request index, prompt ids, reused prefix entry, reused length, budget)
        for index, (request, ids) in enumerate(zip(requests, all_ids)):
            parent = self._cache.pop(request.parent, None) if request.parent is not None else None
            if parent is not None:
                self._cached_tokens -= len(parent.ids)
            budget = request.max_new_tokens
            if self.max_positions is not None:
                budget = min(budget, self.max_positions - len(ids))
            if budget <= 0 or not ids:
                error = "context_too_long" if ids else "empty_context"
                results[index] = Completion("", 0, False, len(ids), 0, error=error)
                continue
            # At least one token must be encoded to get the next token's logits.
            reused = min(_common_prefix(parent.ids, ids), len(ids) - 1) if parent else 0
            rows.append((index, ids, parent if reused else None, reused, budget))

        # Rows of about the same length share a batch: decoding attends over the longest row.
        rows.sort(key=lambda row: (len(row[1]), row[3]))
        start = 0
        while start < len(rows):
            batch = rows[start:start + self.batch_size]
            try:
                completions = self._generate_batch(batch, requests)
            except torch.OutOfMemoryError:
                # Long outputs (a 7B model's DP scratchpads, ~3,000 tokens per row) outgrow the
                # cache a batch size was chosen for: halve it and go on, rather than lose the run.
                if len(batch) == 1:
                    raise
                self.batch_size = max(1, min(self.batch_size // 2, len(batch) - 1))
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                tqdm.write(f"out of memory generating {len(batch)} contexts at once; "
                           f"going on with batches of {self.batch_size}", file=sys.stderr)
                continue
            for (index, *_), completion in zip(batch, completions):
                results[index] = completion
            start += len(batch)
        return results

    # --- one batch ------------------------------------------------------------------------
    def _generate_batch(self, batch, requests) -> list[Completion]:
        """Prefill a batch (``[pad | reused past | pad | new]`` per row), pack each row's cache
        to the right (``[pad | real]``) so decoding attends over no hole, then decode until every
        row has written EOS or used its budget."""
        device, size = self.device, len(batch)
        past_len = max(row[3] for row in batch)
        new_len = max(len(row[1]) - row[3] for row in batch)
        longest_budget = max(row[4] for row in batch)

        input_ids = torch.full((size, new_len), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((size, past_len + new_len), dtype=torch.long, device=device)
        positions = torch.zeros((size, new_len), dtype=torch.long, device=device)
        line_start = torch.zeros(size, dtype=torch.long, device=device)  # of each row's last token
        for b, (_, ids, _, reused, _) in enumerate(batch):
            new = ids[reused:]
            input_ids[b, new_len - len(new):] = torch.tensor(new, device=device)
            mask[b, past_len - reused:past_len] = 1
            mask[b, past_len + new_len - len(new):] = 1
            row_positions, line_start[b] = self._positions(ids)
            positions[b, new_len - len(new):] = row_positions[reused:]
        cache = self._stack_past(batch, past_len, new_len + self.ROOM_CHUNK)
        output = self.model(input_ids=input_ids, attention_mask=self._attention_mask(mask, cache, new_len),
                            position_ids=positions, past_key_values=cache, use_cache=True,
                            logits_to_keep=1)
        cache, logits = output.past_key_values, output.logits[:, -1, :]
        if past_len:
            mask = self._pack_right(cache, mask, self.ROOM_CHUNK)
        last_position, last_token = positions[:, -1], input_ids[:, -1]

        slots = list(range(size))  # the batch row held in each slot of the tensors
        live = [True] * size       # finished rows stay in the tensors until COMPACT_SHARE of them
        generated: list[list[int]] = [[] for _ in range(size)]
        completions: list[Completion | None] = [None] * size
        while True:
            next_tokens = self._pick(logits)
            is_eos = torch.isin(next_tokens, self.eos_tensor).tolist()
            next_list = next_tokens.tolist()
            for slot, b in enumerate(slots):
                if not live[slot]:
                    continue
                index, ids, _, reused, budget = batch[b]
                if is_eos[slot]:
                    hit_eos = True
                else:
                    generated[b].append(next_list[slot])
                    hit_eos = False
                    if len(generated[b]) < budget:
                        continue
                live[slot] = False
                request = requests[index]
                text = completion_text(self.tokenizer, generated[b])
                if request.key is not None and self.reuse_cache and \
                        (request.keep_if is None or request.keep_if(text)):
                    # The cache covers the prompt and every generated token but the last one
                    # (the last was sampled, never fed): exactly the text a continuation extends.
                    fed = generated[b] if hit_eos else generated[b][:-1]
                    self._keep(request.key, ids + fed, cache, slot)
                completions[b] = Completion(
                    text=text, n_generated=len(generated[b]) + int(hit_eos), hit_eos=hit_eos,
                    prompt_tokens=len(ids), prompt_tokens_computed=len(ids) - reused)
            alive = sum(live)
            if not alive:
                return completions
            if len(slots) - alive >= max(1, int(len(slots) * self.COMPACT_SHARE)):
                selected = torch.tensor([slot for slot in range(len(slots)) if live[slot]], device=device)
                cache.batch_select_indices(selected)
                mask, last_position, last_token = mask[selected], last_position[selected], last_token[selected]
                line_start = line_start[selected]
                next_tokens = next_tokens[selected]
                slots = [slots[slot] for slot in range(len(slots)) if live[slot]]
                live = [True] * len(slots)
            mask = torch.cat([mask, torch.ones((len(slots), 1), dtype=mask.dtype, device=device)], 1)
            # A token's position follows from the token before it: a newline starts a new line.
            if self.line_positions:
                line_start, last_position = self.line_positions.following(line_start, last_position, last_token)
            else:
                last_position = last_position + 1
            last_token = next_tokens
            for layer in cache.layers:
                layer.make_room(1, self.ROOM_CHUNK)
            output = self.model(input_ids=next_tokens[:, None],
                                attention_mask=self._attention_mask(mask, cache, 1),
                                position_ids=last_position[:, None], past_key_values=cache,
                                use_cache=True)
            cache, logits = output.past_key_values, output.logits[:, -1, :]

    def _pack_right(self, cache, mask: torch.Tensor, room: int) -> torch.Tensor:
        """Move each row's real columns to the right end of the filled part of the cache, in
        order, dropping the hole between its reused past and its new tokens; returns the
        matching mask. Positions are inside the keys (rotary), so moving columns is harmless."""
        lengths = mask.sum(dim=1)
        width = int(lengths.max())
        # Pad columns sort first, then the real ones in their order; keep the last ``width``.
        source = torch.sort(mask, dim=1, stable=True).indices[:, -width:]
        packed_mask = (torch.arange(width, device=mask.device)[None, :] >= (width - lengths)[:, None]).long()
        for layer in cache.layers:
            for name in ("keys", "values"):
                full = getattr(layer, name)
                index = source[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3])
                buffer = full.new_zeros(full.shape[:2] + (width + room, full.shape[3]))
                buffer[:, :, :width] = torch.gather(full[:, :, :layer.length], 2, index)
                setattr(layer, name, buffer)
            layer.length = width
        return packed_mask

    def _attention_mask(self, mask: torch.Tensor, cache, query_len: int) -> torch.Tensor:
        """The 4D mask over the cache buffers for ``query_len`` new tokens, built here because
        transformers' generic mask builder costs as much as a small model's layer each step.
        ``mask`` (2D, 1 = real token) covers the filled columns plus the new ones; the rest of
        the buffer is masked. eager attention takes it additive, sdpa boolean; any other
        implementation gets the 2D mask and builds its own."""
        kind = getattr(self.model.config, "_attn_implementation", None)
        if kind not in ("eager", "sdpa"):
            return mask
        width, filled = cache.layers[0].keys.shape[-2], mask.shape[1]
        allowed = torch.zeros((mask.shape[0], width), dtype=torch.bool, device=mask.device)
        allowed[:, :filled] = mask.bool()
        allowed = allowed[:, None, None, :]
        if query_len > 1:  # causal among the new tokens, which fill the last query_len columns
            columns = torch.arange(width, device=mask.device)
            last_visible = filled - query_len + torch.arange(query_len, device=mask.device)
            allowed = allowed & (columns[None, :] <= last_visible[:, None])[None, None]
        if kind == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=mask.device).masked_fill_(
            ~allowed, torch.finfo(self.dtype).min)

    def _positions(self, ids: list[int]) -> tuple[torch.Tensor, int]:
        """Position ids of a whole context and the id where its last line starts
        (``modeling.LinePositions`` when the model uses them; ordinary positions start at 0)."""
        if self.line_positions is None:
            return torch.arange(len(ids), device=self.device), 0
        positions, line_starts = self.line_positions.ids_and_line_starts(torch.tensor([ids], device=self.device))
        return positions[0], int(line_starts[0, -1])

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    # --- cache bookkeeping ----------------------------------------------------------------
    def _stack_past(self, batch, past_len: int, room: int):
        """The batch's cache: zero buffers of ``past_len + room`` columns, each row's reused
        prefix right-aligned in the first ``past_len`` columns."""
        layers = []
        for layer in range(self.layer_count):
            keys = torch.zeros((len(batch), self.kv_heads, past_len + room, self.head_dim),
                               dtype=self.dtype, device=self.device)
            values = torch.zeros_like(keys)
            for b, (_, _, entry, reused, _) in enumerate(batch):
                if entry is not None:
                    keys[b, :, past_len - reused:past_len] = entry.layers[layer][0][:, :reused]
                    values[b, :, past_len - reused:past_len] = entry.layers[layer][1][:, :reused]
            layers.append((keys, values))
        return _buffer_cache(layers, past_len)

    def _keep(self, key, ids: list[int], cache, slot: int) -> None:
        """Copy row ``slot``'s cache (the last ``len(ids)`` filled columns) out of the batch."""
        if self.cache_budget_tokens is not None and \
                self._cached_tokens + len(ids) > self.cache_budget_tokens:
            return
        end = cache.layers[0].length
        layers = [(layer.keys[slot, :, end - len(ids):end].clone(),
                   layer.values[slot, :, end - len(ids):end].clone()) for layer in cache.layers]
        self.release([key])
        self._cache[key] = _CachedContext(ids, layers)
        self._cached_tokens += len(ids)


class HFSequentialBackend(Backend):
    """``model.generate`` on one context at a time, re-encoding every prompt from scratch: how
    the original code evaluated. Greedy unless ``temperature`` > 0. A model with line positions
    (``modeling.LinePositions``), which ``model.generate`` does not know, is decoded by the same
    one-context loop written out here."""

    def __init__(self, model, tokenizer, temperature: float = 0.0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.eos_ids = sorted(_eos_ids(model, tokenizer))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.device = next(model.parameters()).device
        self.line_positions = LinePositions.of(model, tokenizer)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        completions = []
        for request in requests:
            ids = self.tokenizer(request.context, add_special_tokens=False)["input_ids"]
            input_ids = torch.tensor([ids], device=self.device)
            if self.line_positions is not None:
                output = self._decode_with_line_positions(input_ids, request.max_new_tokens)
            else:
                sampling = dict(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0) \
                    if self.temperature > 0 else dict(do_sample=False)
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=request.max_new_tokens, eos_token_id=self.eos_ids,
                    pad_token_id=self.pad_id, use_cache=True, **sampling)[0, len(ids):].tolist()
            hit_eos = bool(output) and output[-1] in self.eos_ids
            new_ids = output[:-1] if hit_eos else output
            completions.append(Completion(completion_text(self.tokenizer, new_ids),
                                          len(output), hit_eos, len(ids), len(ids)))
        return completions

    def _decode_with_line_positions(self, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy (or sampled) decoding of one context with a KV cache; the new ids, EOS included."""
        from transformers import DynamicCache
        cache, output = DynamicCache(), []
        positions, line_start = self.line_positions.ids_and_line_starts(input_ids)
        line_start = line_start[:, -1:]
        for _ in range(max_new_tokens):
            logits = self.model(input_ids=input_ids, position_ids=positions, past_key_values=cache,
                                use_cache=True).logits[0, -1].float()
            if self.temperature > 0:
                token = int(torch.multinomial(torch.softmax(logits / self.temperature, -1), 1))
            else:
                token = int(logits.argmax())
            output.append(token)
            if token in self.eos_ids:
                break
            line_start, positions = self.line_positions.following(line_start, positions[:, -1:], input_ids[:, -1:])
            input_ids = torch.tensor([[token]], device=self.device)
        return output
