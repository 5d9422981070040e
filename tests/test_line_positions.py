"""Line positions (``modeling.LinePositions``): the ids on a literal Re-Tuning record, the
length-independent copy distance they exist for, and the batched backend (left padding, KV
reuse, one token at a time) decoding exactly what a plain full-context greedy loop decodes."""
import pytest
import torch

from evaluation.backends import HFBackend, HFSequentialBackend, Request
from modeling import LinePositions, build_char_tokenizer, build_tiny_model
from tasks import protocol

STRIDE = 64


def encode(tokenizer, text):
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@pytest.fixture(scope="module")
def line_model():
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=4096,
                                  initializer_range=0.3, line_position_stride=STRIDE), tokenizer, seed=0)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():  # favour newlines, so that decoding must move positions to new lines
        model.lm_head.weight[newline] *= 3
    return model.eval(), tokenizer


def test_positions_restart_at_every_line():
    tokenizer = build_char_tokenizer()
    lines = LinePositions(tokenizer("\n", add_special_tokens=False)["input_ids"][0], STRIDE)
    text = "12 + 34\nSolution: Call: 2 + 4\n"
    ids = lines.ids(encode(tokenizer, text))[0].tolist()
    assert ids == list(range(8)) + [STRIDE + k for k in range(len("Solution: Call: 2 + 4\n"))]
    # A line longer than the stride shares ids with the start of the next line.
    long = lines.ids(encode(tokenizer, "x" * (STRIDE + 3) + "\nab\n\nc"))[0].tolist()
    assert long == list(range(STRIDE + 4)) + [STRIDE, STRIDE + 1, STRIDE + 2, 2 * STRIDE, 3 * STRIDE]
    # One token at a time gives the same ids as the whole row.
    for text in (text, "x" * (STRIDE + 3) + "\nab\n\nc"):
        row = encode(tokenizer, text)[0]
        start, position, stepwise = torch.tensor(0), torch.tensor(0), [0]
        for token in row[:-1]:
            start, position = lines.following(start, position, token)
            stepwise.append(int(position))
        assert stepwise == lines.ids(row[None])[0].tolist()


def test_the_call_copies_from_the_same_distance_at_every_length():
    """The first digit of the call's first operand sits at a distance from its source digit
    that grows with the problem under ordinary positions and is fixed under line positions."""
    tokenizer = build_char_tokenizer()
    lines = LinePositions(tokenizer("\n", add_special_tokens=False)["input_ids"][0], STRIDE)
    line_distances, plain_distances = set(), set()
    for length in (2, 5, 9, 30):
        a, b = "7" * length, "4" * length
        prompt = f"{a} + {b}{protocol.SOLUTION_CUE}"
        text = prompt + f"Call: {a[1:]} + {b[1:]}\n"
        positions = lines.ids(encode(tokenizer, text))[0]
        source, copy = 1, len(prompt) + len("Call: ")
        line_distances.add(int(positions[copy] - positions[source]))
        plain_distances.add(copy - source)
    assert line_distances == {STRIDE + len("Solution: Call: ") - 1} and len(plain_distances) == 4


def naive_greedy(model, tokenizer, context, max_new_tokens):
    """Greedy decoding by re-running the whole context with line positions for every token."""
    lines = LinePositions.of(model, tokenizer)
    ids = encode(tokenizer, context)
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=lines.ids(ids),
                           use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            return tokenizer.decode(new, skip_special_tokens=False), True
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return tokenizer.decode(new, skip_special_tokens=False), False


CONTEXTS = ["12 + 34\nSolution: ", "7 + 8\nSolution: Call: 8\nReturn: 5\nAnswer: ",
            "What is the parity of [1, 0, 1]?\nSolution: ", "a", "Create dp array\n[3, -1, 4]\n\nx",
            "1, 0" * 20 + "\nSolution: "]  # a line longer than the stride


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_backend_decodes_what_full_recomputation_decodes(line_model, batch_size):
    model, tokenizer = line_model
    assert LinePositions.of(model, tokenizer).stride == STRIDE
    backend = HFBackend(model, tokenizer, batch_size=batch_size)
    first = backend.generate([Request(c, 40, key=i) for i, c in enumerate(CONTEXTS)])
    expected = [naive_greedy(model, tokenizer, c, 40) for c in CONTEXTS]
    assert [(c.text, c.hit_eos) for c in first] == expected
    # Generated newlines must have moved the positions on: some completion holds one.
    assert any("\n" in text for text, _ in expected)
    # Continuations reuse the parents' caches (positions inside the keys) and still agree.
    follow = [c + f.text + "\nReturn: 1\nAnswer: " for c, f in zip(CONTEXTS, first)]
    reused = backend.generate([Request(c, 40, parent=i) for i, c in enumerate(follow)])
    assert [(c.text, c.hit_eos) for c in reused] == [naive_greedy(model, tokenizer, c, 40) for c in follow]
    assert all(c.prompt_tokens_computed < c.prompt_tokens for c in reused)


def test_the_one_at_a_time_backend_decodes_line_positions_too(line_model):
    model, tokenizer = line_model
    completions = HFSequentialBackend(model, tokenizer).generate([Request(c, 40) for c in CONTEXTS])
    assert [(c.text, c.hit_eos) for c in completions] == [naive_greedy(model, tokenizer, c, 40) for c in CONTEXTS]


def test_a_forward_pass_with_line_positions_needs_its_attention_mask(line_model):
    """What the README warns of: with line-position ids and neither a mask nor a cache (the
    trainer saves checkpoints with ``use_cache: false``), transformers reads each jump in the ids
    as the start of another packed sequence, so the second line no longer sees the first; with a
    mask of ones every token sees all before it."""
    model, tokenizer = line_model
    lines = LinePositions.of(model, tokenizer)
    ids = encode(tokenizer, "12 + 34\nSolution: ")
    positions = lines.ids(ids)
    second_line = slice(len("12 + 34\n"), None)
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                       use_cache=False).logits
        unmasked = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        second_alone = model(input_ids=ids[:, second_line], attention_mask=torch.ones_like(ids[:, second_line]),
                             position_ids=positions[:, second_line], use_cache=False).logits
    assert torch.allclose(unmasked[:, second_line], second_alone, atol=1e-5)
    assert not torch.allclose(masked[:, second_line], second_alone, atol=1e-3)
