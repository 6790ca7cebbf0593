"""Finding and loading checkpoints: local directories, sharded safetensors, the Hugging Face
cache (offline), and clear errors for everything convoy cannot load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convoy import LLM, SamplingParams
from tests.test_fidelity import NEW_TOKENS, fidelity_prompts, hf_reference

GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("llama")


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def greedy_tokens(path: Path | str, prompts: list[list[int]], **kwargs: object) -> list[list[int]]:
    llm = LLM(model=str(path), num_kv_blocks=64, **kwargs)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


# -- what can be loaded ----------------------------------------------------------------------
def test_sharded_checkpoint_loads_like_the_single_file(
    make_checkpoint: Callable[..., Path], llama: Path
) -> None:
    sharded = make_checkpoint("llama", max_shard_size="100KB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted({sharded / f for f in index["weight_map"].values()}) == shards
    assert not (sharded / "model.safetensors").exists()

    prompts = [fidelity_prompts()[i] for i in (3, 9, 11)]  # 5, 33 and 100 tokens
    tokens = greedy_tokens(sharded, prompts)
    assert tokens == greedy_tokens(llama, prompts)  # same seed, same weights
    assert tokens == [ref["tokens"] for ref in hf_reference(sharded, prompts)]


# -- what cannot -----------------------------------------------------------------------------
def test_unsupported_architecture_names_it_and_the_supported_ones(
    llama: Path, tmp_path: Path
) -> None:
    path = copy_checkpoint(llama, tmp_path / "gpt2")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as excinfo:
        LLM(model=str(path), num_kv_blocks=8)
    message = str(excinfo.value)
    for name in (
        "GPT2LMHeadModel",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ):
        assert name in message


@pytest.mark.parametrize(
    "weight",
    [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.norm.weight",
        "lm_head.weight",  # untied: the head is a weight of its own
    ],
)
def test_missing_weight_is_named(llama: Path, tmp_path: Path, weight: str) -> None:
    path = copy_checkpoint(llama, tmp_path / "missing")
    rewrite_weights(path, lambda t: t.pop(weight))
    with pytest.raises(ValueError, match=weight.replace(".", r"\.")):
        LLM(model=str(path), num_kv_blocks=8)


@pytest.mark.parametrize(
    "weight", ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"]
)
def test_missing_fused_weight_is_named(llama: Path, tmp_path: Path, weight: str) -> None:
    path = copy_checkpoint(llama, tmp_path / "missing")
    rewrite_weights(path, lambda t: t.pop(weight))
    with pytest.raises(ValueError, match=weight.replace(".", r"\.")):
        LLM(model=str(path), num_kv_blocks=8)


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.0.mlp.extra_proj.weight",  # a module the model does not have
        "model.layers.7.self_attn.q_proj.weight",  # a layer past num_hidden_layers (2)
    ],
)
def test_unknown_tensor_is_named(llama: Path, tmp_path: Path, extra: str) -> None:
    path = copy_checkpoint(llama, tmp_path / "extra")

    def add(t: dict[str, torch.Tensor]) -> None:
        t[extra] = torch.zeros(64, 64)

    rewrite_weights(path, add)
    with pytest.raises(ValueError, match=extra.replace(".", r"\.")):
        LLM(model=str(path), num_kv_blocks=8)


def test_wrong_shape_is_named(llama: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(llama, tmp_path / "shape")
    name = "model.layers.1.self_attn.o_proj.weight"

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name][:, :32].contiguous()

    rewrite_weights(path, shrink)
    with pytest.raises(ValueError) as excinfo:
        LLM(model=str(path), num_kv_blocks=8)
    assert name in str(excinfo.value)
    assert "(64, 32)" in str(excinfo.value) and "(64, 64)" in str(excinfo.value)


def test_directory_without_config_json(llama: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(llama, tmp_path / "no-config")
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json"):
        LLM(model=str(path), num_kv_blocks=8)

    only_bin = tmp_path / "only-bin"
    only_bin.mkdir()
    torch.save({"w": torch.zeros(2)}, only_bin / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"config\.json"):
        LLM(model=str(only_bin), num_kv_blocks=8)


def test_pytorch_bin_weights_are_refused_with_a_hint(llama: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(llama, tmp_path / "bin")
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(ValueError) as excinfo:
        LLM(model=str(path), num_kv_blocks=8)
    assert "safetensors" in str(excinfo.value)
    assert "pytorch_model.bin" in str(excinfo.value)


def test_paths_that_are_not_checkpoints(llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a file"):
        LLM(model=str(llama / "config.json"), num_kv_blocks=8)
    missing = str(tmp_path / "does" / "not" / "exist")
    with pytest.raises(ValueError) as excinfo:
        LLM(model=missing, num_kv_blocks=8)
    assert missing in str(excinfo.value)


# -- Hugging Face Hub ids (offline, from a fake cache) ---------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V2 = "fedcba9876543210fedcba9876543210fedcba98"

HUB_SCRIPT = """
import json, sys
from convoy import LLM, SamplingParams

prompts, max_tokens, commit = json.loads(sys.argv[1])
params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
result = {}
for key, revision in (("main", None), ("commit", commit), ("v2", "v2")):
    llm = LLM(model="convoy-test/tiny-llama", revision=revision, num_kv_blocks=64)
    result[key + "_path"] = str(llm.engine.model_path)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result[key] = [o.outputs[0].token_ids for o in outs]
for key, model in (("unknown", "convoy-test/no-such-model"), ("bad_rev", "convoy-test/tiny-llama")):
    try:
        LLM(model=model, revision="v9" if key == "bad_rev" else None, num_kv_blocks=64)
    except ValueError as e:
        result[key] = str(e)
print("RESULT " + json.dumps(result))
"""


def test_hub_id_loads_from_the_offline_cache(
    make_checkpoint: Callable[..., Path], llama: Path, tmp_path: Path
) -> None:
    # The layout huggingface_hub writes: files under snapshots/<commit>/, refs/<branch> holds
    # the branch's commit. Branch v2 has other weights.
    llama_v2 = make_checkpoint("llama", seed=1)
    hf_home = tmp_path / "hf-home"
    repo = hf_home / "hub" / "models--convoy-test--tiny-llama"
    shutil.copytree(llama, repo / "snapshots" / COMMIT)
    shutil.copytree(llama_v2, repo / "snapshots" / COMMIT_V2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v2").write_text(COMMIT_V2)

    prompts = [fidelity_prompts()[i] for i in (2, 8)]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")
    }
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", CONVOY_CACHE_DIR=str(tmp_path / "c"))
    proc = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, json.dumps([prompts, 8, COMMIT])],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))

    snapshot = repo / "snapshots" / COMMIT
    assert Path(result["main_path"]).resolve() == snapshot.resolve()
    assert Path(result["commit_path"]).resolve() == snapshot.resolve()
    assert Path(result["v2_path"]).resolve() == (repo / "snapshots" / COMMIT_V2).resolve()
    params = GREEDY.clone(max_tokens=8)
    expected = [
        o.outputs[0].token_ids
        for o in LLM(model=str(llama), num_kv_blocks=64).generate(prompts, params, False)
    ]
    expected_v2 = [
        o.outputs[0].token_ids
        for o in LLM(model=str(llama_v2), num_kv_blocks=64).generate(prompts, params, False)
    ]
    assert expected != expected_v2
    assert result["main"] == expected
    assert result["commit"] == expected
    assert result["v2"] == expected_v2
    # Unknown ids and revisions fail with the id in the message.
    assert "convoy-test/no-such-model" in result["unknown"]
    assert "convoy-test/tiny-llama" in result["bad_rev"]
