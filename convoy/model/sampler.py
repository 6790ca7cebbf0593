"""Turn logits into tokens on the device: penalties, temperature, top-k/p, min-p, seeds.

Order (as vLLM): log-probabilities are taken from the raw logits; then min_tokens masking,
logit bias, repetition/presence/frequency penalties, temperature, top-k, top-p, min-p.
Greedy rows take the argmax of the processed logits.

Random rows sample by inverting the cumulative distribution: one uniform draw per row, the
first token whose cumulative probability (summed in float64) exceeds it. That is an exact
draw from ``p`` and a zero-probability token is never chosen. It needs one random number per
row where the exponential race ``argmax(p / E)`` needs one per vocabulary entry, several
times the cost on a CPU. Each seeded request draws from its own generator, so its tokens do
not depend on which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from convoy.model.cpu_kernels import CpuKernels
from convoy.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # those before this row's token
    eos_token_ids: frozenset[int]
    # Which output token of its request this row samples: a seeded row's draw (see
    # seeded_uniform); unseeded rows draw from the engine's shared generator.
    draw_index: int = 0


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit integers that scatters every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, index: int) -> float:
    """A uniform draw in [0, 1) fixed by (seed, index): 53 random bits of a counter-based
    generator (SplitMix64 over the seed, then the index)."""
    x = _mix64((seed & _MASK64) ^ 0x9E3779B97F4A7C15)
    x = _mix64((x + (index & _MASK64) * 0xD1B54A32D192ED03) & _MASK64)
    return (x >> 11) * 2.0**-53


@dataclass
class TopLogprobs:
    """Sampled token's log-probability and the ``k`` most likely tokens, per row."""

    sampled_logprobs: torch.Tensor  # (N,)
    sampled_ranks: torch.Tensor  # (N,) 1 = most likely
    top_ids: torch.Tensor  # (N, k)
    top_logprobs: torch.Tensor  # (N, k)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> TopLogprobs:
    """For each row of ``logprobs (N, V)``: the logprob and rank of ``token_ids (N,)`` and the
    top ``k`` entries."""
    chosen = logprobs.gather(1, token_ids[:, None])  # (N, 1)
    ranks = (logprobs > chosen).sum(dim=1) + 1
    top = logprobs.topk(k, dim=1) if k > 0 else None
    empty = logprobs.new_empty((logprobs.shape[0], 0))
    return TopLogprobs(
        sampled_logprobs=chosen[:, 0],
        sampled_ranks=ranks,
        top_ids=top.indices if top is not None else empty.long(),
        top_logprobs=top.values if top is not None else empty,
    )


class Sampler:
    """``kernels``: convoy's CPU kernels, whose vectorized argmax serves greedy rows."""

    def __init__(
        self, vocab_size: int, device: torch.device, seed: int, kernels: CpuKernels | None = None
    ) -> None:
        self.kernel = kernels
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[int], TopLogprobs | None]:
        """``logits (N, V)`` float32 -> one token per row, and logprobs if any row asked."""
        n = logits.shape[0]
        max_k = max((r.params.logprobs or 0 for r in rows), default=0)
        want_logprobs = any(r.params.logprobs is not None for r in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        if any(_constrained(r) for r in rows):
            logits = self._apply_constraints(logits.clone(), rows)
        greedy = torch.tensor([r.params.greedy for r in rows], device=self.device)
        if self.kernel is not None and logits.dtype == torch.float32:
            tokens = self.kernel.argmax_rows(logits)  # (N,), the same ids as argmax
        else:
            tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            sampled = self._sample(logits, rows)
            tokens = torch.where(greedy, tokens, sampled)

        top = gather_logprobs(raw_logprobs, tokens, max_k) if raw_logprobs is not None else None
        assert tokens.shape == (n,)
        return tokens.tolist(), top

    def _apply_constraints(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        neg_inf = float("-inf")
        for i, r in enumerate(rows):
            p = r.params
            if len(r.output_token_ids) < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids))
                banned = [t for t in banned if t < self.vocab_size]
                if banned:
                    logits[i, banned] = neg_inf
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=self.device)
                vals = torch.tensor(list(p.logit_bias.values()), device=self.device)
                logits[i].index_add_(0, ids, vals.to(logits.dtype))
        self._apply_penalties(logits, rows)
        return logits

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        for i, r in enumerate(rows):
            p = r.params
            if p.repetition_penalty != 1.0:
                # transformers' rule: divide positive logits, multiply negative ones, for every
                # token seen in the prompt or the output.
                seen = torch.tensor(
                    sorted(set(r.prompt_token_ids) | set(r.output_token_ids)),
                    device=self.device,
                    dtype=torch.long,
                )
                vals = logits[i, seen]
                logits[i, seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
            if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
                out = torch.tensor(r.output_token_ids, device=self.device, dtype=torch.long)
                counts = torch.zeros(self.vocab_size, device=self.device, dtype=logits.dtype)
                counts.index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        temps = torch.tensor(
            [r.params.temperature if not r.params.greedy else 1.0 for r in rows],
            device=self.device,
            dtype=logits.dtype,
        )
        logits = logits / temps[:, None]
        logits = _top_k_top_p(logits, rows)
        probs = torch.softmax(logits, dim=-1)
        min_ps = [r.params.min_p for r in rows]
        if any(min_ps):
            min_p = torch.tensor(min_ps, device=self.device, dtype=probs.dtype)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)

        shared = [i for i, r in enumerate(rows) if r.params.seed is None]
        if len(shared) == len(rows):
            u = torch.rand(
                len(rows), device=self.device, dtype=torch.float64, generator=self.generator
            )
        else:
            u = torch.tensor(
                [
                    seeded_uniform(r.params.seed, r.draw_index)
                    if r.params.seed is not None
                    else 0.0
                    for r in rows
                ],
                dtype=torch.float64,
                device=self.device,
            )
            if shared:
                u[shared] = torch.rand(
                    len(shared), device=self.device, dtype=torch.float64, generator=self.generator
                )
        cdf = probs.double().cumsum(dim=-1)  # float64: exact enough over 100k+ entries
        # Scaled by each row's total (1 up to rounding; less where min_p cut tokens).
        target = u[:, None] * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, target, right=True)[:, 0]
        # u * total can round up to total itself (u within 2^-53 of 1): the last token then.
        return tokens.clamp_(max=probs.shape[1] - 1)


def needs_history(params: SamplingParams) -> bool:
    """Whether a row's logits depend on the tokens already generated (penalties,
    min_tokens), beyond their count."""
    return bool(
        params.min_tokens
        or params.repetition_penalty != 1.0
        or params.presence_penalty
        or params.frequency_penalty
    )


def plain_greedy(row: SamplingRow) -> bool:
    """Whether ``row``'s token is just the argmax of its raw logits: greedy, no logprobs, and
    nothing that changes logits first."""
    return row.params.greedy and row.params.logprobs is None and not _constrained(row)


def _constrained(row: SamplingRow) -> bool:
    """Whether ``row``'s logits change before sampling (so the batch's must be copied)."""
    p = row.params
    return bool(
        len(row.output_token_ids) < p.min_tokens
        or p.logit_bias
        or p.repetition_penalty != 1.0
        or ((p.presence_penalty or p.frequency_penalty) and row.output_token_ids)
    )


def _top_k_top_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    ks = [r.params.top_k for r in rows]
    ps = [r.params.top_p for r in rows]
    if not any(ks) and all(p >= 1.0 for p in ps):
        return logits
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if any(ks):
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in ks], device=logits.device)
        mask |= torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    if any(p < 1.0 for p in ps):
        p = torch.tensor(ps, device=logits.device, dtype=logits.dtype)
        probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each token; a token is kept while that is below top_p, so the
        # most likely token always survives.
        before = probs.cumsum(dim=-1) - probs
        mask |= before >= p[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
