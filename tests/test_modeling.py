"""The project's character tokenizer, the tiny model, LoRA adapters and checkpoint loading."""
import json
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tasks
from modeling import (CHAR_ALPHABET, build_char_tokenizer, build_tiny_model, load_checkpoint,
                      load_model_and_tokenizer, resolve_base_model, save_model)

TINY = {"from_scratch": True, "tokenizer": "char", "lora_target_modules": "all-linear",
        "llama_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "max_position_embeddings": 512}}
SPEC_EXAMPLES = [
    "73199 + 21439\nSolution: Call: 3199 + 1439\nReturn: Carry 0, Output 4638\nAnswer: Carry 0, Output 94638",
    'Output a list with "1" for chosen numbers and "2" for unchosen ones. Input = [3, -1, 4].\nAnswer: [1, 2, 1]',
    "Since dp[0] != input[0] (3 != -2) or can_use_next_item == False, we store output[0] = 2.",
    "What is the parity of [1, 0, 1, 1]?\nSolution: Compute one element at a time. 1 1 0 1",
]


def task_texts():
    """Every record text the registered task modules make for a few random problems."""
    texts = []
    for name in tasks.task_names():
        task = tasks.get_task(name)
        for method in tasks.METHODS:
            for length in (1, 2, 3, 5):
                try:
                    problem = task.sample(random.Random(length), length)
                    texts += [text for record in task.records(problem, method) for text in record]
                except (NotImplementedError, ValueError):
                    continue
    return texts


def test_every_character_the_tasks_use_round_trips_as_one_token(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for tok in (tokenizer, reloaded):
        ids = tok(CHAR_ALPHABET, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(CHAR_ALPHABET) and tok.unk_token_id not in ids
        assert tok.decode(ids) == CHAR_ALPHABET
        for text in SPEC_EXAMPLES + task_texts():
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text) and tok.decode(ids) == text
    # No BOS even when special tokens are allowed; EOS doubles as padding; digits are single tokens.
    assert reloaded("12")["input_ids"] == tokenizer("12", add_special_tokens=False)["input_ids"]
    assert len(set(reloaded("0123456789")["input_ids"])) == 10
    assert reloaded.eos_token == reloaded.pad_token == "</s>" and reloaded.bos_token is None


def test_tiny_model_is_seeded_and_saves_as_a_plain_hf_model(tmp_path):
    model, tokenizer = load_model_and_tokenizer(TINY, seed=1)
    again, _ = load_model_and_tokenizer(TINY, seed=1)
    other, _ = load_model_and_tokenizer(TINY, seed=2)
    weights = model.state_dict()
    assert all(torch.equal(weights[k], again.state_dict()[k]) for k in weights)
    assert not torch.equal(weights["model.embed_tokens.weight"], other.state_dict()["model.embed_tokens.weight"])
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([tokenizer("12 + 34\nAnswer: ")["input_ids"]])
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_lora_targets_come_from_the_model_config():
    config = dict(TINY, lora_target_modules=["q_proj", "down_proj"])
    model, _ = load_model_and_tokenizer(config, {"enabled": True, "lora_r": 4, "lora_alpha": 4, "lora_dropout": 0.0})
    # Names end in "<module>.lora_A.default.weight".
    assert {name.split(".")[-4] for name, _ in model.named_parameters() if "lora_A" in name} == {"q_proj", "down_proj"}
    assert all(("lora_" in name) == p.requires_grad for name, p in model.named_parameters())


def test_lora_adapter_reloads_with_peft_and_gives_the_same_logits(tmp_path):
    from peft import PeftModel
    run_dir = tmp_path / "run"
    model, tokenizer = load_model_and_tokenizer(TINY, {"enabled": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.05},
                                                seed=0, base_save_dir=str(run_dir / "base_model"))
    with torch.no_grad():  # pretend training moved the adapter (B starts at zero)
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    checkpoint = run_dir / "final"
    save_model(model, str(checkpoint))
    tokenizer.save_pretrained(checkpoint)
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == "../base_model"
    assert resolve_base_model(str(checkpoint)) == str(run_dir / "base_model")

    model.eval()
    ids = torch.tensor([tokenizer("5 + 7\nSolution: ")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model")
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, model(ids).logits)  # the adapter matters
        reloaded = PeftModel.from_pretrained(base, checkpoint).eval()
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-6)
        loaded, loaded_tokenizer = load_checkpoint(str(checkpoint))
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
        merged, _ = load_checkpoint(str(checkpoint), merge_lora=True)
        assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-5)
    assert loaded_tokenizer("5 + 7")["input_ids"] == tokenizer("5 + 7")["input_ids"]


def test_a_local_base_loads_from_any_directory_and_trains_without_its_own_dropout(tmp_path, monkeypatch):
    """A base given as ``./base`` (a local directory, as a hub model downloaded beside the runs)
    is recorded so that its LoRA checkpoint loads from anywhere; the base's own dropout is 0
    (SPEC section 5), so training mode computes what eval mode does, LoRA's dropout aside."""
    tokenizer = build_char_tokenizer()
    base = build_tiny_model({**TINY["llama_config"], "attention_dropout": 0.5}, tokenizer, seed=0)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model, _ = load_model_and_tokenizer({"name_or_path": "./base", "lora_target_modules": "all-linear"},
                                        {"enabled": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    ids = torch.tensor([tokenizer("5 + 7\nSolution: ")["input_ids"]])
    model.train()
    with torch.no_grad():
        training_logits = [model(ids).logits for _ in range(2)]
        assert torch.equal(*training_logits)
        assert torch.allclose(model.eval()(ids).logits, training_logits[0], atol=1e-6)
    save_model(model, str(tmp_path / "run" / "final"))
    tokenizer.save_pretrained(tmp_path / "run" / "final")
    monkeypatch.chdir(tmp_path / "run")
    loaded, _ = load_checkpoint("final")
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, training_logits[0], atol=1e-6)


def test_a_model_config_without_a_model_is_refused():
    with pytest.raises(ValueError, match="name_or_path"):
        load_model_and_tokenizer({"from_scratch": False, "tokenizer": "char"})
