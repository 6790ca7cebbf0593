"""The shipped convoy-tiny family: standard layout, loads in transformers with the same greedy
output as convoy, and the model card's figures hold."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from convoy import LLM, SamplingParams
from convoy.checkpoints import (
    DEFAULT_MODEL_NAME,
    DRAFT_MODEL_NAME,
    IM_END_TOKEN,
    default_model_path,
    draft_model_path,
)

MODELS = {DEFAULT_MODEL_NAME: default_model_path(), DRAFT_MODEL_NAME: draft_model_path()}
PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport ",
    'class Stack:\n    """',
    "    def __init__(self, name",
    "# Copyright",
]
NEW_TOKENS = 24


def record(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((MODELS[name] / "training.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_transformers_greedy_equals_convoy(name: str) -> None:
    path = str(MODELS[name])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # exactly NEW_TOKENS, like ignore_eos
    want = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            want.append(out[0, ids.shape[1] :].tolist())
    llm = LLM(model=path)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want


def test_layout_size_and_shared_tokenizer() -> None:
    total = 0
    for path in MODELS.values():
        for f in (
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "README.md",
            "training.json",
        ):
            assert (path / f).is_file(), f"{path.name}: {f} missing"
        total += sum(f.stat().st_size for f in path.iterdir())
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
        eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
        assert set(eos) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END_TOKEN)}
    assert total < 50 * 2**20, f"{total / 2**20:.1f} MiB shipped"
    target, draft = MODELS.values()
    assert (target / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()


def test_card_figures() -> None:
    target, draft = record(DEFAULT_MODEL_NAME), record(DRAFT_MODEL_NAME)
    assert 3e6 <= target["parameters"] <= 20e6
    assert 4.5 <= target["parameters"] / draft["parameters"] <= 10  # "about 5-10x smaller"
    for rec in (target, draft):
        # Well below the unigram baseline: the model has learnt far more than token frequencies.
        assert rec["final_val_loss"] < rec["unigram_val_loss"] - 2.0
        card = (MODELS[rec["name"]] / "README.md").read_text()
        assert f"{rec['final_val_loss']:.3f}" in card
        assert f"{rec['unigram_val_loss']:.3f}" in card
    assert target["final_val_loss"] < draft["final_val_loss"]
    agreement = draft["greedy_agreement_with_target"]
    assert 0.3 < agreement < 1.0
    assert f"{agreement:.3f}" in (MODELS[DRAFT_MODEL_NAME] / "README.md").read_text()


def test_convoy_scores_held_out_text_like_the_card_says() -> None:
    """convoy's prompt logprobs on a held-out stdlib file give a loss near the card's."""
    rec = record(DEFAULT_MODEL_NAME)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / p for p in rec["corpus"]["validation_files"] if (stdlib / p).is_file()]
    if not files:
        pytest.skip("this Python's stdlib has none of the held-out files")
    llm = LLM()  # the default model
    assert llm.engine.model_path == MODELS[DEFAULT_MODEL_NAME]
    ids = llm.get_tokenizer().encode(files[0].read_text())[:256]
    out = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.prompt_logprobs is not None
    nll = [-pos[t].logprob for pos, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True) if pos]
    loss = sum(nll) / len(nll)
    assert loss < rec["unigram_val_loss"] - 2.0, loss
