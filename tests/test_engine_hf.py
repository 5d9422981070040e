"""The batched Hugging Face backend against ``model.generate`` one context at a time: the same
greedy text with left padding, several batches, KV-cache reuse for continuations, and with a
briefly trained model the same answers and call traces as the plain one-problem recursion."""
import pytest
import torch

from evaluation.backends import HFBackend, HFSequentialBackend, Request, completion_text
from evaluation.engine import LimitRules, Limits, run_engine, sample_problems, solve_sequentially
from evaluation.quick_model import cached_quick_model
from modeling import build_char_tokenizer, build_tiny_model
from tasks import get_task, protocol

CONTEXTS = ["12 + 34\nSolution: ", "7 + 8\nSolution: ", "What is the parity of [1, 0, 1]?\nSolution: ",
            "a", "Create dp array [3, -1, 4]\nSolution: ", "999 + 1\nAnswer: "]


@pytest.fixture(scope="module")
def random_model():
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    # A large init spreads the logits, so float noise between batch layouts cannot flip an argmax.
    model = build_tiny_model(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=256,
                                  initializer_range=0.3), tokenizer, seed=0)
    return model.eval(), tokenizer


def texts(completions):
    return [(c.text, c.hit_eos, c.n_generated) for c in completions]


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_batched_greedy_equals_model_generate(random_model, batch_size):
    model, tokenizer = random_model
    requests = [Request(c, max_new_tokens=12 + i) for i, c in enumerate(CONTEXTS)]
    reference = HFSequentialBackend(model, tokenizer).generate(requests)
    batched = HFBackend(model, tokenizer, batch_size=batch_size).generate(requests)
    assert texts(batched) == texts(reference)
    assert [c.n_generated for c in batched] == [12 + i for i in range(len(CONTEXTS))] or \
        any(c.hit_eos for c in batched)
    assert all(c.prompt_tokens == c.prompt_tokens_computed == len(ctx) for c, ctx in zip(batched, CONTEXTS))


def test_a_batch_out_of_memory_is_done_again_in_halves(random_model, monkeypatch, capsys):
    """A forward pass over more than 2 rows fails as a GPU out of memory would: the backend
    goes on with batches of 2 and writes what batches of 2 write, kept caches included."""
    model, tokenizer = random_model
    requests = [Request(c, 10, key=i) for i, c in enumerate(CONTEXTS)]
    reference = HFBackend(model, tokenizer, batch_size=2)
    expected = reference.generate(requests)
    forward = type(model).forward

    def forward_for_two_rows(self, *args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward_for_two_rows)
    backend = HFBackend(model, tokenizer, batch_size=8)
    assert texts(backend.generate(requests)) == texts(expected)
    assert backend.batch_size == 2
    assert "6 contexts at once; going on with batches of 4" in capsys.readouterr().err
    assert backend._cached_tokens == reference._cached_tokens
    assert {key: entry.ids for key, entry in backend._cache.items()} == \
        {key: entry.ids for key, entry in reference._cache.items()}


def test_continuations_reuse_the_parent_cache_and_write_the_same_text(random_model):
    model, tokenizer = random_model
    backend = HFBackend(model, tokenizer, batch_size=4)
    first = backend.generate([Request(c, 10, key=i) for i, c in enumerate(CONTEXTS)])
    continuations = [c + f.text + protocol.RETURN_TAG + "17\n" + protocol.ANSWER_CUE
                     for c, f in zip(CONTEXTS, first)]
    fresh = ["31 + 4\nSolution: ", "x"]
    # Continuations and fresh contexts in the same batches: pasts of different lengths, some none.
    requests = [Request(c, 10, key=10 + i, parent=i) for i, c in enumerate(continuations)] + \
               [Request(c, 10) for c in fresh]
    reused = backend.generate(requests)
    recomputed = HFSequentialBackend(model, tokenizer).generate(requests)
    assert texts(reused) == texts(recomputed)
    appended = len(protocol.RETURN_TAG + "17\n" + protocol.ANSWER_CUE)
    for completion, parent, context in zip(reused, first, continuations):
        assert completion.prompt_tokens == len(context)
        # Only the appended text is encoded, plus the parent's last token when it stopped
        # without EOS (that token was sampled but never fed).
        assert completion.prompt_tokens_computed == appended + (0 if parent.hit_eos else 1)
    assert [c.prompt_tokens_computed for c in reused[-2:]] == [len(c) for c in fresh]
    # Each parent cache is used once, then dropped; the continuations' own caches are kept.
    assert set(backend._cache) == set(range(10, 10 + len(CONTEXTS)))


def test_a_parent_that_is_not_a_prefix_reuses_only_the_common_part(random_model):
    model, tokenizer = random_model
    backend = HFBackend(model, tokenizer)
    backend.generate([Request("12 + 34\nSolution: ", 5, key="a")])
    other = "12 + 99\nSolution: more"
    (reused,) = backend.generate([Request(other, 8, parent="a")])
    (fresh,) = HFSequentialBackend(model, tokenizer).generate([Request(other, 8)])
    assert (reused.text, reused.hit_eos) == (fresh.text, fresh.hit_eos)
    assert reused.prompt_tokens_computed == len(other) - len("12 + ")


def test_no_reuse_recomputes_every_prompt(random_model):
    model, tokenizer = random_model
    backend = HFBackend(model, tokenizer, reuse_cache=False)
    first = backend.generate([Request("5 + 5\nSolution: ", 6, key=0)])
    context = "5 + 5\nSolution: " + first[0].text + "Return: 1\nAnswer: "
    (again,) = backend.generate([Request(context, 6, parent=0)])
    assert again.prompt_tokens_computed == len(context) and not backend._cache


def test_sampling_is_reproducible_by_seed(random_model):
    model, tokenizer = random_model
    requests = [Request(c, 15) for c in CONTEXTS]
    run = lambda seed: texts(HFBackend(model, tokenizer, temperature=1.0, seed=seed).generate(requests))  # noqa: E731
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_a_model_that_never_writes_eos_fails_every_problem(random_model):
    model, tokenizer = random_model
    task = get_task("parity")
    eos = tokenizer.eos_token_id

    def forbid_eos(module, inputs, output):
        output[..., eos] = float("-inf")
        return output

    handle = model.lm_head.register_forward_hook(forbid_eos)
    try:
        problems = sample_problems(task, [2, 5, 9], 3, seed=0)
        results = run_engine(HFBackend(model, tokenizer), task, "retuning", problems,
                             lambda p: Limits(10, 10, 20), progress=False)
    finally:
        handle.remove()
    assert [r.failure for r in results] == ["max_new_tokens"] * len(problems)
    assert all(r.generated_tokens == 20 and len(r.trace) == 1 for r in results)


def test_a_context_longer_than_the_model_allows_fails_cleanly(random_model):
    model, tokenizer = random_model
    (completion,) = HFBackend(model, tokenizer).generate([Request("1" * 300, 5)])
    assert completion.error == "context_too_long" and not completion.hit_eos
    task = get_task("parity")
    results = run_engine(HFBackend(model, tokenizer), task, "baseline", [(1,) * 120],
                         lambda p: Limits(1, 1, 5), progress=False)
    assert results[0].failure == "context_too_long"


def test_trained_model_batched_engine_equals_one_problem_at_a_time():
    """A tiny model trained briefly on parity Re-Tuning (lengths 1-4) writes calls and answers,
    right and wrong; evaluated past its training lengths, the batched engine with KV reuse gives
    every problem the same trace, answer and failure as ``protocol.solve`` driven by
    ``model.generate`` one context at a time. Slow-ish on purpose: ~15 s of training (300 steps,
    shared through ``cached_quick_model`` with the CLI tests)."""
    task = get_task("parity")
    model, tokenizer = cached_quick_model("parity", "retuning", (1, 2, 3, 4), steps=300)
    problems = sample_problems(task, [2, 3, 4, 6, 8], 3, seed=0)
    rules = LimitRules(depth_per_length=2, depth_fixed=0, calls_per_length=2, calls_fixed=2)
    batched_backend = HFBackend(model, tokenizer, batch_size=4)
    limits = lambda p: rules.for_problem(task, "retuning", p, batched_backend)  # noqa: E731
    batched = run_engine(batched_backend, task, "retuning", problems, limits, progress=False)
    reference = solve_sequentially(HFSequentialBackend(model, tokenizer), task, "retuning", problems,
                                   limits, progress=False)
    for a, b in zip(batched, reference):
        assert a.trace == b.trace
        assert (a.final_text, a.predicted, a.correct, a.failure, a.calls, a.generated_tokens) == \
               (b.final_text, b.predicted, b.correct, b.failure, b.calls, b.generated_tokens)
    # The comparison means something only if the model really recursed and the cache was reused.
    assert sum(r.calls for r in batched) >= len(problems)
    assert 0 < sum(r.correct for r in batched) < len(problems)  # answers right and wrong both compared
    assert sum(r.prompt_tokens_computed for r in batched) < 0.8 * sum(r.prompt_tokens for r in batched)
    assert sum(r.prompt_tokens_computed for r in reference) == sum(r.prompt_tokens for r in reference)


def test_a_cache_budget_bounds_kept_tokens_and_changes_no_text(random_model):
    model, tokenizer = random_model
    first_requests = [Request(c, 6, key=i) for i, c in enumerate(CONTEXTS)]
    outputs = {}
    for budget in (None, 40):
        backend = HFBackend(model, tokenizer, cache_budget_tokens=budget)
        first = backend.generate(first_requests)
        if budget is not None:
            assert backend._cached_tokens <= budget and 0 < len(backend._cache) < len(CONTEXTS)
        continuations = [Request(c + f.text + "Return: 2\nAnswer: ", 6, parent=i)
                         for i, (c, f) in enumerate(zip(CONTEXTS, first))]
        outputs[budget] = backend.generate(continuations)
    assert texts(outputs[None]) == texts(outputs[40])
    assert sum(c.prompt_tokens_computed for c in outputs[40]) > \
        sum(c.prompt_tokens_computed for c in outputs[None])


def sentencepiece_style_tokenizer():
    """A LLaMA tokenizer class over single characters: like LLaMA's, it starts every text it
    encodes with a word-start marker ``▁`` (``"65"`` -> ``▁ 6 5``)."""
    from transformers import LlamaTokenizer
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for code in [10] + list(range(33, 127)):
        vocab.setdefault(chr(code), len(vocab))
    vocab["▁C"] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=[("▁", "C")], unk_token="<unk>", bos_token="<s>",
                          eos_token="</s>")


@pytest.mark.parametrize("task_name, problem", [("addition", ("37", "43")), ("dp", (3, -1, 4)),
                                                ("parity", (1, 0, 1))])
def test_completions_decode_to_the_training_outputs_with_a_sentencepiece_tokenizer(task_name, problem):
    """A model writes each output as the ids training gave it; the backend must read them back as
    that output, or the contexts it builds next drift from the training inputs (with the old
    decoding as a continuation of the prompt: ``"Solution:  Call: 7 + 3"``)."""
    from evaluation.backends import completion_text
    from preference_datasets import tokenize_records
    tokenizer = sentencepiece_style_tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer("65", add_special_tokens=False)["input_ids"])[0] == "▁"
    task = get_task(task_name)
    for method in ("baseline", "scratchpad", "retuning"):
        records = task.records(problem, method)
        data = tokenize_records(records, tokenizer, max_length=100_000, max_prompt_length=100_000)
        for (_, output), start, length, prompt_length in zip(records, data.starts, data.lengths,
                                                              data.prompt_lengths):
            output_ids = data.tokens[start + prompt_length:start + length - 1].tolist()  # EOS dropped
            assert completion_text(tokenizer, output_ids) == output
        if method == "retuning":  # so a solve that writes those ids walks through the training inputs
            written = {prompt: completion_text(tokenizer, tokenizer(output, add_special_tokens=False)["input_ids"])
                       for prompt, output in records}
            assert protocol.solve(task.question(problem), written.__getitem__).steps == records


def test_special_tokens_a_model_writes_stay_in_its_text():
    """A ``<unk>`` inside an answer is read and scored as written, not silently dropped."""
    tokenizer = build_char_tokenizer()
    ids = tokenizer("[1, 2]", add_special_tokens=False)["input_ids"]
    text = completion_text(tokenizer, ids[:3] + [tokenizer.unk_token_id] + ids[3:])
    assert text == "[1,<unk> 2]"
    assert not get_task("dp").is_correct((3, -1), text, "baseline")
