"""Roofline bounds: the fastest a decoder-only transformer could possibly run on this machine.

A forward step cannot finish faster than the time to move its bytes through memory, nor
faster than the time to do its multiply-adds at the machine's peak::

    step_time >= max(bytes_moved / bandwidth, flops / peak_flops)

Decode steps (one new token per sequence) read every weight once per step whatever the
batch size, plus each sequence's KV cache, and do little arithmetic: they are memory-bound
until the batch is large. Prefill steps (hundreds of tokens per sequence) reuse each weight
many times and are compute-bound. Summing the per-step bound over the steps of a schedule
bounds the whole workload; measured time divided into the bound is the fraction of this
machine's capability an engine achieves.

Everything counted is a *lower* bound on the true cost: only the matmul and attention
FLOPs are counted (norms, rotary embeddings, activations and sampling are left out), and
only weight and KV-cache reads are counted as memory traffic (activations, which may stay
in cache, are left out). Sliding windows are ignored (full attention is assumed).

Units: bytes, FLOPs, seconds; bandwidth in GB/s and compute in GFLOP/s (10**9, not 2**30).
Apart from the two ``measure_*`` functions (torch) this module is plain arithmetic.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from convoy.model.arch import ModelArch

__all__ = [
    "Chunk",
    "ModelShape",
    "ScheduleBound",
    "decode_step_bytes",
    "decode_tokens_per_s_bound",
    "forward_flops",
    "kv_bytes_per_token",
    "kv_bytes_read",
    "measure_matmul_flops",
    "measure_memory_bandwidth",
    "prefill_tokens_per_s_bound",
    "schedule_bound",
    "simulate_schedule",
    "step_bytes",
    "step_flops",
    "step_time_bound",
    "weight_bytes",
    "weight_bytes_per_step",
]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that its cost depends on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_arch(cls, arch: ModelArch) -> ModelShape:
        """The shape of a checkpoint convoy has parsed."""
        return cls(
            hidden_size=arch.hidden_size,
            num_layers=arch.num_layers,
            num_heads=arch.num_heads,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            intermediate_size=arch.intermediate_size,
            vocab_size=arch.vocab_size,
            tie_word_embeddings=arch.tie_word_embeddings,
            qkv_bias=arch.qkv_bias,
            o_bias=arch.o_bias,
            mlp_bias=arch.mlp_bias,
            qk_norm=arch.qk_norm,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelShape:
        """From this class's field names, or a Hugging Face ``config.json`` dict.

        config.json spellings (``num_hidden_layers``, ``num_attention_heads``,
        ``num_key_value_heads``) are understood, ``head_dim`` defaults to ``hidden_size //
        num_heads``, ``num_kv_heads`` to ``num_heads`` and ``tie_word_embeddings`` to false, as
        in transformers; biases and q/k norm default to absent.
        """
        hidden = int(d["hidden_size"])
        heads = int(d["num_heads"] if "num_heads" in d else d["num_attention_heads"])
        kv = d.get("num_kv_heads", d.get("num_key_value_heads")) or heads
        return cls(
            hidden_size=hidden,
            num_layers=int(d["num_layers"] if "num_layers" in d else d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=int(d.get("head_dim") or hidden // heads),
            intermediate_size=int(d["intermediate_size"]),
            vocab_size=int(d["vocab_size"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=bool(d.get("qkv_bias", False)),
            o_bias=bool(d.get("o_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=bool(d.get("qk_norm", False)),
        )

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matmuls: q, k, v, o projections and the gated MLP.

        ``q: H*hd*C, k and v: Hkv*hd*C each, o: H*hd*C, gate/up/down: 3*C*I`` (C = hidden,
        I = intermediate).
        """
        c, hd = self.hidden_size, self.head_dim
        attn = 2 * c * self.num_heads * hd + 2 * c * self.num_kv_heads * hd
        return attn + 3 * c * self.intermediate_size

    @property
    def layer_other_params(self) -> int:
        """One layer's parameters outside matmuls: two RMSNorms, optional biases, q/k norms."""
        n = 2 * self.hidden_size
        if self.qkv_bias:
            n += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if self.o_bias:
            n += self.hidden_size
        if self.mlp_bias:
            n += 2 * self.intermediate_size + self.hidden_size
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """All parameters, a tied embedding / LM head counted once (as checkpoints store it)."""
        per_layer = self.layer_matmul_params + self.layer_other_params
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + lm_head + self.num_layers * per_layer + self.hidden_size


def weight_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes of all weights: ``num_params * dtype_bytes``."""
    return shape.num_params * dtype_bytes


def weight_bytes_per_step(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes of weight a forward step must read: all of them, except an untied input
    embedding table, of which only the rows of the step's tokens are read (left out)."""
    untied_embed = 0 if shape.tie_word_embeddings else shape.embedding_params
    return (shape.num_params - untied_embed) * dtype_bytes


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """KV cache bytes of one position: ``2 (K and V) * layers * kv_heads * head_dim * bytes``."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_bytes


def kv_bytes_read(shape: ModelShape, dtype_bytes: int, context_lens: Sequence[int]) -> int:
    """KV bytes a decode step reads: each sequence's whole context, ``sum(context_lens) *
    kv_bytes_per_token``. A context length counts every position attended to, the new
    token's own included."""
    return sum(context_lens) * kv_bytes_per_token(shape, dtype_bytes)


def forward_flops(
    shape: ModelShape, num_tokens: int, num_cached: int = 0, num_logits: int | None = None
) -> int:
    """FLOPs of a forward over ``num_tokens`` new tokens of one sequence.

    ``num_cached`` tokens of the sequence are already in the KV cache; ``num_logits`` rows go
    through the LM head (default: all ``num_tokens``; an engine only needs the last one).
    With T = num_tokens, S = num_cached::

        2 * layer_matmul_params * layers * T          # every weight: one multiply-add per token
        + 4 * layers * heads * head_dim * A           # QK^T and PV, causal
        + 2 * hidden * vocab * num_logits             # LM head

    where ``A = T*S + T*(T+1)/2`` is the number of (query, key) pairs under the causal mask:
    query i (1-based) sees the S cached keys and the first i new ones.
    """
    t, s = num_tokens, num_cached
    logits = t if num_logits is None else num_logits
    linear = 2 * shape.layer_matmul_params * shape.num_layers * t
    pairs = t * s + t * (t + 1) // 2
    attention = 4 * shape.num_layers * shape.num_heads * shape.head_dim * pairs
    return linear + attention + 2 * shape.hidden_size * shape.vocab_size * logits


def decode_step_bytes(shape: ModelShape, dtype_bytes: int, context_lens: Sequence[int]) -> int:
    """Bytes one decode step of ``len(context_lens)`` sequences reads: the weights once (a
    batch shares them) plus each sequence's KV cache."""
    return weight_bytes_per_step(shape, dtype_bytes) + kv_bytes_read(
        shape, dtype_bytes, context_lens
    )


def decode_tokens_per_s_bound(
    shape: ModelShape, dtype_bytes: int, batch_size: int, context_len: int, bandwidth_gbs: float
) -> float:
    """Memory-bandwidth bound on decode tokens/s: ``B`` sequences, each attending to
    ``context_len`` positions, produce B tokens per step, and a step cannot take less than
    ``decode_step_bytes / bandwidth``."""
    step_s = decode_step_bytes(shape, dtype_bytes, [context_len] * batch_size) / (
        bandwidth_gbs * 1e9
    )
    return batch_size / step_s


def prefill_tokens_per_s_bound(
    shape: ModelShape, num_tokens: int, peak_gflops: float, num_cached: int = 0
) -> float:
    """Compute bound on prefill tokens/s: a ``num_tokens`` chunk (after ``num_cached``
    tokens) cannot take less than ``forward_flops / peak``; one LM-head row is needed."""
    flops = forward_flops(shape, num_tokens, num_cached, num_logits=1)
    return num_tokens / (flops / (peak_gflops * 1e9))


# ---------------------------------------------------------------------------------------------
# Schedules: bounds over a whole workload
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One sequence's share of a step: ``num_tokens`` new tokens after ``num_cached`` cached
    ones; ``samples`` when the chunk reaches the sequence's end, so a token is sampled."""

    request: int
    num_tokens: int
    num_cached: int
    samples: bool


def step_flops(shape: ModelShape, chunks: Sequence[Chunk]) -> int:
    """FLOPs of a step: :func:`forward_flops` of each chunk, one LM-head row per sample."""
    return sum(
        forward_flops(shape, c.num_tokens, c.num_cached, num_logits=int(c.samples)) for c in chunks
    )


def step_bytes(shape: ModelShape, dtype_bytes: int, chunks: Sequence[Chunk]) -> int:
    """Bytes of a step: the weights once plus every chunk's KV (cached and new positions)."""
    return decode_step_bytes(shape, dtype_bytes, [c.num_cached + c.num_tokens for c in chunks])


def step_time_bound(
    shape: ModelShape,
    dtype_bytes: int,
    chunks: Sequence[Chunk],
    bandwidth_gbs: float,
    peak_gflops: float,
) -> tuple[float, bool]:
    """``(max(bytes / bandwidth, flops / peak), memory_bound)`` of one step, in seconds."""
    mem_s, compute_s = _step_seconds(shape, dtype_bytes, chunks, bandwidth_gbs, peak_gflops)
    return max(mem_s, compute_s), mem_s >= compute_s


def _step_seconds(
    shape: ModelShape,
    dtype_bytes: int,
    chunks: Sequence[Chunk],
    bandwidth_gbs: float,
    peak_gflops: float,
) -> tuple[float, float]:
    """(memory time, compute time) of one step."""
    mem_s = step_bytes(shape, dtype_bytes, chunks) / (bandwidth_gbs * 1e9)
    return mem_s, step_flops(shape, chunks) / (peak_gflops * 1e9)


def simulate_schedule(
    requests: Sequence[tuple[int, int]], max_num_seqs: int, max_num_batched_tokens: int
) -> Iterator[list[Chunk]]:
    """The steps of an offline run of ``(input_len, output_len)`` requests, all arriving at
    once, under convoy's policy with unlimited KV memory.

    Each step has a budget of ``max_num_batched_tokens``: running sequences, oldest first,
    get the tokens they still need (one for a decode, a chunk of prompt otherwise), then
    waiting requests are admitted in order while budget remains and fewer than
    ``max_num_seqs`` run. A sequence samples a token when it has computed all it knows and
    finishes after ``output_len`` samples. The bound is that of this schedule: a peer with
    other batching limits is bounded with its own limits.
    """
    if max_num_seqs < 1 or max_num_batched_tokens < 1:
        raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
    if any(n_in < 1 or n_out < 1 for n_in, n_out in requests):
        raise ValueError("every request needs input_len >= 1 and output_len >= 1")
    known = [n_in for n_in, _ in requests]  # prompt + tokens sampled so far
    computed = [0] * len(requests)
    sampled = [0] * len(requests)
    waiting = list(range(len(requests)))[::-1]  # a stack: pop() takes the oldest
    running: list[int] = []
    while running or waiting:
        budget = max_num_batched_tokens
        chunks = []
        for r in running:
            if budget == 0:
                break
            n = min(known[r] - computed[r], budget)
            chunks.append(Chunk(r, n, computed[r], computed[r] + n == known[r]))
            budget -= n
        while waiting and budget > 0 and len(running) < max_num_seqs:
            r = waiting.pop()
            running.append(r)
            n = min(known[r], budget)
            chunks.append(Chunk(r, n, 0, n == known[r]))
            budget -= n
        yield chunks
        for c in chunks:
            computed[c.request] += c.num_tokens
            if c.samples:
                sampled[c.request] += 1
                known[c.request] += 1
                if sampled[c.request] == requests[c.request][1]:
                    running.remove(c.request)


@dataclass(frozen=True)
class ScheduleBound:
    """Lower bounds on the time of a schedule (seconds), summed step by step.

    ``prefill_s`` covers the steps until every request has its first token, ``decode_s`` the
    rest. ``memory_s`` / ``compute_s`` are the two sides summed separately, for insight.
    """

    total_s: float
    prefill_s: float
    decode_s: float
    memory_s: float
    compute_s: float
    num_steps: int
    num_memory_bound_steps: int


def schedule_bound(
    shape: ModelShape,
    dtype_bytes: int,
    requests: Sequence[tuple[int, int]],
    bandwidth_gbs: float,
    peak_gflops: float,
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> ScheduleBound:
    """Bound an offline workload: the sum over the steps of :func:`simulate_schedule` of
    ``max(step_bytes / bandwidth, step_flops / peak)``."""
    total = prefill = memory = compute = 0.0
    steps = memory_bound_steps = 0
    waiting_first = len(requests)  # requests that have not sampled their first token yet
    first_done: set[int] = set()
    for chunks in simulate_schedule(requests, max_num_seqs, max_num_batched_tokens):
        mem_s, comp_s = _step_seconds(shape, dtype_bytes, chunks, bandwidth_gbs, peak_gflops)
        step_s = max(mem_s, comp_s)
        total += step_s
        memory += mem_s
        compute += comp_s
        steps += 1
        memory_bound_steps += mem_s >= comp_s
        if waiting_first:
            prefill += step_s
            for c in chunks:
                if c.samples and c.request not in first_done:
                    first_done.add(c.request)
                    waiting_first -= 1
    return ScheduleBound(
        total_s=total,
        prefill_s=prefill,
        decode_s=total - prefill,
        memory_s=memory,
        compute_s=compute,
        num_steps=steps,
        num_memory_bound_steps=memory_bound_steps,
    )


# ---------------------------------------------------------------------------------------------
# Measuring the machine
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_memory_bandwidth(
    size_mb: int = 512, repeats: int = 5, device: str | torch.device = "cpu"
) -> float:
    """This machine's memory bandwidth in GB/s: the best of ``repeats`` copies of a
    ``size_mb`` MB float32 tensor, counting the bytes read and the bytes written
    (``2 * size / time``).

    The tensor is far larger than any CPU cache, so the copy streams from and to DRAM (or
    HBM on a GPU), which is what a decode step's weight reads do.
    """
    dev = torch.device(device)
    n = size_mb * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first: the first write faults the memory in
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best / 1e9


def measure_matmul_flops(
    n: int = 2048,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> float:
    """Peak matmul throughput in GFLOP/s: the best of ``repeats`` products of two ``n x n``
    matrices (``2 * n**3`` FLOPs each), float32 unless ``dtype`` is given (use the engine's
    dtype: a bfloat16 GPU engine is bounded by the bfloat16 peak).

    On the CPU in float32 both of torch's GEMM libraries are timed and the faster counts: MKL
    (``torch.mm``) does not take its widest vector path on every CPU, while oneDNN uses
    AVX-512 where the CPU has it. The machine's limit is what its best library reaches."""
    dev = torch.device(device)
    dt = torch.float32 if dtype is None else dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=dev, dtype=dt)
    b = torch.randn(n, n, generator=gen).to(device=dev, dtype=dt)
    out = torch.mm(a, b)
    products: list[Callable[[], object]] = [lambda: torch.mm(a, b, out=out)]
    if dev.type == "cpu" and dt == torch.float32 and torch.backends.mkldnn.is_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for product in products:
        product()  # warm-up: thread pools, GPU kernels and caches
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            product()
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
