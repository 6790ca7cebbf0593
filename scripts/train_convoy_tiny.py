"""Train the ``convoy-tiny`` model family on the Python standard library's own sources.

Two Llama-architecture checkpoints share one tokenizer: a target (~7M parameters) and a smaller
companion about 5x smaller (a draft for speculative decoding, which convoy does not implement
yet). Both are written in the standard Hugging Face layout
(config.json, generation_config.json, model.safetensors, tokenizer files with a ChatML chat
template) together with ``training.json`` (corpus split, hyperparameters, losses) and a model
card (README.md) filled in from it.

Everything is reproducible: the corpus is the stdlib of the Python running this script (sorted
by path, split into train/validation by a hash of the path), the tokenizer trainer is
deterministic, and every random draw (init, batch sampling) comes from fixed seeds. With the
same Python, torch version and thread count the weights come out the same.

    python scripts/train_convoy_tiny.py --out convoy/assets          # the cards record the time
    python scripts/train_convoy_tiny.py --out /tmp/t --target-steps 20 --draft-steps 20  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from convoy.checkpoints import IM_END_TOKEN, python_corpus_files, train_tokenizer

VOCAB_SIZE = 8192
# One file in VALIDATION_MODULUS (by a hash of its path) is held out: whole files, so no
# validation text is seen in training, not even a neighbouring window.
VALIDATION_MODULUS = 20


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


TARGET = ModelShape(
    hidden_size=256, intermediate_size=768, num_layers=6, num_heads=8, num_kv_heads=4
)
DRAFT = ModelShape(
    hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2
)


def split_corpus() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, validation) lists of ``(path, text)``; a file's side depends only on its path."""
    train, val = [], []
    for rel, text in python_corpus_files():
        bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
        (val if bucket % VALIDATION_MODULUS == 0 else train).append((rel, text))
    return train, val


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """One token stream: each file as ``<s> ... </s>``, so the model learns where files end."""
    eos = tokenizer.eos_token_id
    assert eos is not None
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])  # starts with <s>
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def make_model(
    shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def windows(stream: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping ``seq_len + 1`` windows of ``stream`` (for evaluation)."""
    n = (len(stream) - 1) // seq_len
    if limit is not None:
        n = min(n, limit)
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return stream[idx]


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, batches: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over every position of ``batches``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(batches), batch_size):
        chunk = batches[start : start + batch_size]
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def greedy_agreement(
    draft: LlamaForCausalLM, target: LlamaForCausalLM, batches: torch.Tensor
) -> float:
    """Share of positions where draft and target predict the same next token (teacher forcing).

    This is the per-token acceptance rate greedy speculative decoding could expect (convoy
    does not implement speculative decoding yet).
    """
    draft.eval()
    target.eval()
    agree, count = 0, 0
    for start in range(0, len(batches), 32):
        chunk = batches[start : start + 32, :-1]
        d = draft(input_ids=chunk).logits.argmax(-1)
        t = target(input_ids=chunk).logits.argmax(-1)
        agree += int((d == t).sum())
        count += d.numel()
    return agree / count


def unigram_loss(train: torch.Tensor, val: torch.Tensor) -> float:
    """Cross-entropy of validation tokens under the train unigram distribution (add-one)."""
    counts = torch.bincount(train, minlength=VOCAB_SIZE).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val[1:]].mean())


def train(
    model: LlamaForCausalLM,
    train_stream: torch.Tensor,
    val_batches: torch.Tensor,
    cfg: TrainConfig,
    name: str,
) -> dict[str, Any]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(cfg.seq_len + 1)
    history: list[dict[str, float]] = []
    model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step, cfg)
        starts = torch.randint(
            0, len(train_stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen
        )
        batch = train_stream[starts[:, None] + offsets[None, :]]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - start
            print(
                f"[{name}] step {step}/{cfg.steps} loss {loss.item():.3f} "
                f"lr {lr_at(step, cfg):.2e} {elapsed / 60:.1f} min",
                flush=True,
            )
        if (step + 1) % 500 == 0 or step == cfg.steps - 1:
            val = evaluate(model, val_batches)
            history.append({"step": step + 1, "train_loss": loss.item(), "val_loss": val})
            print(f"[{name}] step {step + 1} validation loss {val:.3f}", flush=True)
    return {
        "history": history,
        "final_val_loss": history[-1]["val_loss"],
        "train_minutes": (time.perf_counter() - start) / 60,
    }


def save(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    record: dict[str, Any],
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    # Chat replies end with <|im_end|>, plain completions with </s>: stop at either.
    im_end = tokenizer.convert_tokens_to_ids(IM_END_TOKEN)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, im_end],
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(str(out_dir))
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(record))


def model_card(record: dict[str, Any]) -> str:
    """The checkpoint's README.md, filled in from its ``training.json`` record."""
    name = record["name"]
    shape = record["shape"]
    train = record["train"]
    corpus = record["corpus"]
    env = record["environment"]
    is_draft = name.endswith("-draft")
    losses = "\n".join(
        f"| {h['step']} | {h['train_loss']:.3f} | {h['val_loss']:.3f} |" for h in record["history"]
    )
    agreement = record.get("greedy_agreement_with_target", record.get("draft_greedy_agreement"))
    role = (
        "a smaller companion of `convoy-tiny` (same tokenizer, about "
        f"{record['parameters'] / 1e6:.1f}M parameters), kept as a draft for speculative "
        "decoding, which convoy does not implement yet"
        if is_draft
        else "convoy's built-in default model"
    )
    return f"""---
license: psf-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [convoy, llama, python, tiny]
---

# {name}

A tiny Llama-architecture language model trained on the Python standard library's own source
code: {role}. It ships inside convoy so that `convoy generate`, `convoy serve` and
`convoy bench` have a model that works offline and says something meaningful, and so that
quantization and prefix caching can be tested on predictions that mean something (random
weights give near-uniform distributions).

## Model

| | |
|---|---|
| architecture | `LlamaForCausalLM` (standard Hugging Face layout, loads with `AutoModelForCausalLM`) |
| parameters | {record["parameters"]:,} (tied input/output embeddings) |
| layers / hidden / MLP | {shape["num_layers"]} / {shape["hidden_size"]} / {shape["intermediate_size"]} |
| attention heads / KV heads | {shape["num_heads"]} / {shape["num_kv_heads"]} (head dim \
{shape["hidden_size"] // shape["num_heads"]}) |
| vocabulary | {record["vocab_size"]:,} (byte-level BPE trained on the same corpus) |
| context | trained on {train["seq_len"]}-token windows; `max_position_embeddings` 1024 |
| chat template | ChatML (`<|im_start|>` / `<|im_end|>`); generation stops at `</s>` or `<|im_end|>` |

## Data

Every `.py` file of the standard library of Python {corpus["python"]} (`site-packages` and test
directories excluded), sorted by path. Whole files are held out for validation: those whose
`sha256(path) % 20 == 0` ({len(corpus["validation_files"])} files, {corpus["validation_tokens"]:,}
tokens; the list is in `training.json`). Training: {corpus["train_files"]} files,
{corpus["train_tokens"]:,} tokens ({corpus["train_bytes"] / 1e6:.1f} MB).

## Training

`python scripts/train_convoy_tiny.py --out convoy/assets` in the convoy repository trains the
tokenizer, this model and its sibling. {train["steps"]} steps of {train["batch_size"]} random
{train["seq_len"]}-token windows ({record["tokens_seen"] / 1e6:.1f}M tokens), AdamW (betas 0.9,
0.95; weight decay {train["weight_decay"]}), learning rate {train["lr"]} with {train["warmup_steps"]}
warmup steps and cosine decay to {train["min_lr_ratio"]}x, gradient clipping {train["grad_clip"]},
float32, seed {train["seed"]} (init seed {record["init_seed"]}). Took {record["train_minutes"]:.0f}
minutes on {env["threads"]} CPU threads (torch {env["torch"]}, transformers {env["transformers"]}).

## Evaluation

Cross-entropy in nats per token on {corpus["validation_tokens_evaluated"]:,} held-out tokens:

| step | train loss (last batch) | validation loss |
|---|---|---|
{losses}

Final validation loss **{record["final_val_loss"]:.3f}** (perplexity
{math.exp(record["final_val_loss"]):.1f}), against **{record["unigram_val_loss"]:.3f}** for a unigram
model of the training tokens (perplexity {math.exp(record["unigram_val_loss"]):.0f}).

Greedy next-token agreement between `convoy-tiny-draft` and `convoy-tiny` on the held-out tokens
(teacher forcing): **{agreement:.3f}**. That is the per-token acceptance rate greedy speculative
decoding could expect with this pair (convoy does not implement speculative decoding yet).

## Intended use and limits

For tests, demos, and quantization and caching experiments. It completes
Python code and docstrings in the style of the standard library, plausibly at the scale of a
line or two; it knows nothing else, has no instruction tuning (the chat template only gives the
format), makes up APIs, and its code is not meant to run. Do not use it for anything that
matters.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/convoy-tiny{,-draft}")
    parser.add_argument("--target-steps", type=int, default=900)
    parser.add_argument("--draft-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--val-windows", type=int, default=256, help="validation windows of 256")
    parser.add_argument(
        "--cards-only",
        action="store_true",
        help="only rewrite each OUT/*/README.md from its training.json",
    )
    args = parser.parse_args(argv)
    if args.cards_only:
        for record_path in sorted(args.out.glob("*/training.json")):
            record = json.loads(record_path.read_text())
            (record_path.parent / "README.md").write_text(model_card(record))
        return 0
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    train_files, val_files = split_corpus()
    tokenizer = train_tokenizer([t for _, t in train_files], vocab_size=VOCAB_SIZE)
    train_stream = encode(tokenizer, [t for _, t in train_files])
    val_stream = encode(tokenizer, [t for _, t in val_files])
    print(
        f"corpus: {len(train_files)} train files ({len(train_stream):,} tokens), "
        f"{len(val_files)} validation files ({len(val_stream):,} tokens), "
        f"tokenizer {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    target_cfg = TrainConfig(steps=args.target_steps)
    draft_cfg = TrainConfig(steps=args.draft_steps, seed=1)
    val_batches = windows(val_stream, target_cfg.seq_len, args.val_windows)
    baseline = unigram_loss(train_stream, val_stream)
    print(f"unigram baseline validation loss {baseline:.3f}", flush=True)

    corpus = {
        "source": "Python standard library .py files (convoy.checkpoints.python_corpus_files)",
        "python": sys.version.split()[0],
        "split": f"validation = files whose sha256(path) % {VALIDATION_MODULUS} == 0",
        "train_files": len(train_files),
        "train_tokens": len(train_stream),
        "train_bytes": sum(len(t.encode()) for _, t in train_files),
        "validation_files": [p for p, _ in val_files],
        "validation_tokens": len(val_stream),
        "validation_tokens_evaluated": int(val_batches[:, 1:].numel()),
        "sha256_of_train_paths": hashlib.sha256(
            "\n".join(p for p, _ in train_files).encode()
        ).hexdigest(),
    }
    environment = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
    }

    results: dict[str, tuple[LlamaForCausalLM, dict[str, Any]]] = {}
    for name, shape, cfg, seed in (
        ("convoy-tiny", TARGET, target_cfg, 0),
        ("convoy-tiny-draft", DRAFT, draft_cfg, 1),
    ):
        model = make_model(shape, tokenizer, seed)
        params = sum(p.numel() for p in model.parameters())
        print(f"[{name}] {params:,} parameters", flush=True)
        outcome = train(model, train_stream, val_batches, cfg, name)
        results[name] = (
            model,
            {
                "name": name,
                "parameters": params,
                "shape": dataclasses.asdict(shape),
                "vocab_size": VOCAB_SIZE,
                "init_seed": seed,
                "train": dataclasses.asdict(cfg),
                "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
                "unigram_val_loss": baseline,
                **outcome,
                "corpus": corpus,
                "environment": environment,
            },
        )

    target, target_record = results["convoy-tiny"]
    draft, draft_record = results["convoy-tiny-draft"]
    agreement = greedy_agreement(draft, target, val_batches)
    print(f"draft/target greedy next-token agreement on validation: {agreement:.3f}", flush=True)
    draft_record["greedy_agreement_with_target"] = agreement
    target_record["draft_greedy_agreement"] = agreement
    for name, (model, record) in results.items():
        save(model, tokenizer, args.out / name, record)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
