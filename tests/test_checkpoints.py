"""Tests for convoy.checkpoints: local tokenizers and random-weight checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from convoy import checkpoints
from convoy.checkpoints import (
    CHAT_TEMPLATE,
    LLAMA_25M,
    LLAMA_200M,
    SUPPORTED_ARCHITECTURES,
    python_corpus,
    train_tokenizer,
    write_random_checkpoint,
)
from tests.conftest import LLAMA3_ROPE, TOKENIZER_VOCAB
from tests.conftest import TINY as ENGINE_TINY

VOCAB = TOKENIZER_VOCAB
# The engine tests' shapes, at write_random_checkpoint's default init (its statistics are
# what some tests here check).
TINY: dict[str, Any] = {k: v for k, v in ENGINE_TINY.items() if k != "init_std"}
ROUND_TRIP_TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "  leading spaces, trailing spaces  \n\n\ttabs\r\nand CRLF",
    "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά, emoji 😀🚀👩‍💻 and 🏳️‍🌈",
    " .,;:!? ' \" ( ) [ ] { } <b> </b> ",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(python_corpus(300_000), VOCAB, out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    # Loaded back from disk, so the tests see what every other user of the files sees.
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# --------------------------------------------------------------------------------------------
# corpus and tokenizer
# --------------------------------------------------------------------------------------------


def test_python_corpus_is_bounded_and_deterministic() -> None:
    texts = python_corpus(100_000)
    assert texts
    assert sum(len(t.encode()) for t in texts) <= 100_000
    assert texts == python_corpus(100_000)
    # A small budget still gives text (the first file is cut at a line break).
    small = python_corpus(500)
    assert small and 0 < len(small[0].encode()) <= 500 and small[0].endswith("\n")
    assert python_corpus(0) == []


def test_train_tokenizer_is_deterministic(tokenizer_dir: Path) -> None:
    again = train_tokenizer(python_corpus(300_000), VOCAB)
    saved = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert json.loads(again.backend_tokenizer.to_str()) == saved
    assert len(again) == VOCAB


def test_tokenizer_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tokenizer) == VOCAB
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<pad>",
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    # BOS is prepended on encode, like Llama; not without special tokens.
    ids = tokenizer.encode("import os")
    assert ids[0] == 0 and ids[1:] == tokenizer.encode("import os", add_special_tokens=False)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Token by token, as a streaming detokenizer would see it, the bytes concatenate back.
    pieces = tokenizer.convert_ids_to_tokens(ids[1:])
    assert isinstance(pieces, list)
    assert tokenizer.convert_tokens_to_string(pieces) == text


def test_chat_template_renders(tokenizer_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    assert (tokenizer_dir / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (tokenizer_dir / "tokenizer_config.json").read_text()
    )
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 😀"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert isinstance(no_prompt, str)
    assert no_prompt.endswith("<|im_end|>\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[:2] == [0, 3]  # exactly one BOS, then <|im_start|> as a single token
    assert tokenizer.decode(ids) == text


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", sorted(SUPPORTED_ARCHITECTURES))
def test_checkpoint_round_trips(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, architecture: str
) -> None:
    a = write_random_checkpoint(tmp_path / "a", architecture, tokenizer=tokenizer, seed=7, **TINY)
    b = write_random_checkpoint(tmp_path / "b", architecture, tokenizer=tokenizer, seed=7, **TINY)
    c = write_random_checkpoint(tmp_path / "c", architecture, tokenizer=tokenizer, seed=8, **TINY)

    config = json.loads((a / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)
    assert config["head_dim"] == 16

    # Same seed: identical weights; another seed: different weights.
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    assert ta.keys() == tb.keys() == tc.keys()
    for name in ta:
        assert ta[name].dtype == torch.float32
        assert torch.equal(ta[name], tb[name]), name
        assert not torch.equal(ta[name], tc[name]), name

    # Norm scales are near one but not all ones; everything else is centred on zero.
    norms = [n for n in ta if n.endswith("norm.weight")]
    assert norms
    for name in norms:
        assert not torch.all(ta[name] == 1.0)
        assert (ta[name].mean() - 1.0).abs() < 0.02
    if architecture == "Qwen2ForCausalLM":
        assert "model.layers.0.self_attn.q_proj.bias" in ta
        assert ta["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    if architecture == "Qwen3ForCausalLM":
        assert "model.layers.0.self_attn.q_norm.weight" in ta
        assert "model.layers.0.self_attn.k_norm.weight" in ta

    # transformers loads it back with exactly those weights, and the tokenizer alongside.
    model = AutoModelForCausalLM.from_pretrained(str(a))
    assert type(model).__name__ == architecture
    state = model.state_dict()
    for name, tensor in ta.items():
        assert torch.equal(state[name], tensor), name
    loaded_tok = AutoTokenizer.from_pretrained(str(a))
    text = "def f(x):\n    return x + 1  # héllo 😀\n"
    ids = loaded_tok.encode(text)
    assert ids[0] == loaded_tok.bos_token_id == 0
    assert loaded_tok.decode(ids, skip_special_tokens=True) == text
    assert loaded_tok.chat_template == CHAT_TEMPLATE
    if architecture != "Qwen2ForCausalLM":
        # transformers 5 loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer whatever
        # tokenizer_config.json says, and that class swaps in Qwen's pre-tokenizer regex, so
        # its ids may differ (it still round-trips, checked above).
        assert ids == tokenizer.encode(text)
    with torch.no_grad():
        logits = model(torch.tensor([loaded_tok.encode("def f():")])).logits
    assert logits.shape[-1] == VOCAB and torch.isfinite(logits).all()


def test_sharded_checkpoint(tmp_path: Path) -> None:
    out = write_random_checkpoint(tmp_path, "LlamaForCausalLM", max_shard_size="100KB", **TINY)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (out / "model.safetensors").exists()
    single = write_random_checkpoint(tmp_path / "single", "LlamaForCausalLM", **TINY)
    sharded, whole = _tensors(out), _tensors(single)
    assert sharded.keys() == whole.keys() == set(index["weight_map"])
    assert all(torch.equal(sharded[k], whole[k]) for k in whole)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(model.state_dict()["lm_head.weight"], whole["lm_head.weight"])


def test_tied_embeddings_and_dtype(tmp_path: Path) -> None:
    out = write_random_checkpoint(
        tmp_path, "LlamaForCausalLM", tie_word_embeddings=True, dtype=torch.bfloat16, **TINY
    )
    tensors = _tensors(out)
    assert "lm_head.weight" not in tensors
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_extra_config_passes_through(tmp_path: Path) -> None:
    out = write_random_checkpoint(
        tmp_path,
        "MistralForCausalLM",
        extra_config={"sliding_window": 48, "rope_theta": 500_000.0, "rms_norm_eps": 1e-5},
        **TINY,
    )
    config = AutoConfig.from_pretrained(str(out))
    assert config.sliding_window == 48
    assert config.rms_norm_eps == 1e-5
    saved = json.loads((out / "config.json").read_text())
    rope = saved.get("rope_parameters") or {}
    assert rope.get("rope_theta", saved.get("rope_theta")) == 500_000.0


def test_llama3_rope_scaling_round_trips(tmp_path: Path) -> None:
    out = write_random_checkpoint(
        tmp_path,
        "LlamaForCausalLM",
        rope_scaling=LLAMA3_ROPE,
        extra_config={"rope_theta": 500_000.0},
        **TINY,
    )
    saved = json.loads((out / "config.json").read_text())
    # transformers 5 writes rope_parameters (theta inside); 4.x wrote rope_scaling + rope_theta.
    rope = dict(saved.get("rope_parameters") or saved["rope_scaling"])
    theta = rope.pop("rope_theta", saved.get("rope_theta"))
    assert theta == 500_000.0
    for key, value in LLAMA3_ROPE.items():
        assert rope[key] == value, key
    assert LLAMA3_ROPE["factor"] == 8.0  # the caller's dict is not mutated
    assert "rope_theta" not in LLAMA3_ROPE

    # Loading gives the same model as building from the config directly: same rotary
    # frequencies (and they are scaled, so the scaling really took effect).
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    direct = LlamaForCausalLM(
        LlamaConfig(
            **{k: v for k, v in loaded.config.to_dict().items() if k != "architectures"},
        )
    )
    # Spelled as a dict: transformers 5 types `rope_theta` as a legacy keyword only.
    plain: dict[str, Any] = {"num_hidden_layers": 1, "rope_theta": 500_000.0}
    unscaled = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, **plain))
    inv = loaded.model.rotary_emb.inv_freq
    assert torch.equal(inv, direct.model.rotary_emb.inv_freq)
    assert not torch.equal(inv, unscaled.model.rotary_emb.inv_freq)


def test_rejects_bad_arguments(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="unsupported architecture"):
        write_random_checkpoint(tmp_path, "GPT2LMHeadModel", **TINY)
    with pytest.raises(ValueError, match="vocab_size"):
        write_random_checkpoint(
            tmp_path, "LlamaForCausalLM", tokenizer=tokenizer, **{**TINY, "vocab_size": 300}
        )
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], 100)


@pytest.mark.parametrize(("size", "expected"), [(LLAMA_25M, 24_877_440), (LLAMA_200M, 200_827_904)])
def test_benchmark_sizes(size: dict[str, Any], expected: int) -> None:
    # Built on the meta device: counts parameters without allocating them.
    config = LlamaConfig(
        vocab_size=size["vocab_size"],
        hidden_size=size["hidden_size"],
        intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_layers"],
        num_attention_heads=size["num_heads"],
        num_key_value_heads=size["num_kv_heads"],
        tie_word_embeddings=size["tie_word_embeddings"],
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert size["vocab_size"] == 32000


# --------------------------------------------------------------------------------------------
# default model
# --------------------------------------------------------------------------------------------


def test_missing_builtin_model_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "ASSETS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train_convoy_tiny\.py"):
        checkpoints.default_model_path()
