"""Tensors only: build a step's flat batch, run the model, sample. No policy lives here."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from convoy.config import CacheConfig, ModelConfig
from convoy.engine.profiler import StepTiming
from convoy.engine.scheduler import ScheduledRequest, SchedulerOutput
from convoy.model import cpu_kernels
from convoy.model.arch import ModelArch
from convoy.model.attention import (
    AttentionMetadata,
    PagedPrefill,
    PrefillChunk,
    SharedPrefixDecode,
)
from convoy.model.cuda_graphs import DecodeGraphs
from convoy.model.decoder import Attention
from convoy.model.greedy_head import ScreenedGreedyHead, make_greedy_head
from convoy.model.host_allocator import keep_step_buffers_on_heap
from convoy.model.layers import (
    SKINNY_MAX_ROWS,
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    onednn_available,
)
from convoy.model.loader import load_model
from convoy.model.quantization import quantize_model_int8
from convoy.model.sampler import (
    Sampler,
    SamplingRow,
    TopLogprobs,
    gather_logprobs,
    plain_greedy,
)

logger = logging.getLogger(__name__)

# Decodes sharing fewer leading blocks than this attend the plain way: splitting the softmax
# only pays once the shared prefix is long enough to be worth reading once.
MIN_SHARED_BLOCKS = 4
# CUDA graphs cover decode contexts up to this many tokens (vLLM's max_seq_len_to_capture).
MAX_GRAPH_CONTEXT = 8192

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TokenLogprobs:
    """Log-probability of one chosen token plus the top-k alternatives (ids, logprobs)."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class ModelOutput:
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # For prompt tokens ``first .. first+len-1`` of the request (first >= 1).
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)


def resolve_device(config: ModelConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    return torch.device(config.device)


def resolve_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        # CPUs here have no fast bf16; GPUs do.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.dtype]


def kv_block_bytes(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all layers (keys and values)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * itemsize


def num_kv_blocks_for(
    cache: CacheConfig, block_size: int, arch: ModelArch, dtype: torch.dtype
) -> int:
    """``num_kv_blocks`` if set, else as many ``block_size``-token blocks as
    ``kv_cache_memory_gb`` holds."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    per_block = kv_block_bytes(arch, block_size, dtype)
    return max(1, int(cache.kv_cache_memory_gb * 2**30) // per_block)


def _top_list(top: TopLogprobs, i: int) -> list[tuple[int, float]]:
    return list(zip(top.top_ids[i].tolist(), top.top_logprobs[i].tolist(), strict=True))


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        block_size: int,
        arch: ModelArch,
        model_path: str,
        max_model_len: int,
        num_blocks: int,
        max_num_seqs: int,
    ) -> None:
        self.device = resolve_device(model_config)
        self.dtype = resolve_dtype(model_config, self.device)
        self.arch = arch
        self.block_size = block_size
        self.max_model_len = max_model_len
        from pathlib import Path

        self.model = load_model(Path(model_path), arch, max_model_len, self.device, self.dtype)
        if model_config.quantization == "int8":
            if self.device.type != "cpu":
                raise ValueError("quantization='int8' runs on the CPU only")
            quantize_model_int8(self.model)
        # One tensor for the whole cache: (layers, 2, slots + 1, kv_heads, head_dim). torch.empty
        # only reserves address space; pages become resident as blocks are first written.
        # Unwritten memory may hold NaN, and a masked-out NaN still poisons attention
        # (0 * NaN = NaN), so padded positions read the extra last slot, kept at zero.
        self.pad_slot = num_blocks * self.block_size
        use_graphs = self.device.type == "cuda" and not model_config.enforce_eager
        # CUDA graphs pad batches with rows that write to and read from one more slot.
        extra_slots = 2 if use_graphs else 1
        self.kv_cache = torch.empty(
            (arch.num_layers, 2, self.pad_slot + extra_slots, arch.num_kv_heads, arch.head_dim),
            dtype=self.dtype,
            device=self.device,
        )
        self.kv_cache[:, :, self.pad_slot].zero_()
        self.kv_caches = [
            (self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(arch.num_layers)
        ]
        self.sampler = Sampler(arch.vocab_size, self.device, model_config.seed)
        # Greedy rows' tokens from a bfloat16 and/or int8 screen of the head (float32 CPU
        # models, CPUs with native bfloat16 or VNNI); set by _attach_cpu_linear_paths.
        self.greedy_head: ScreenedGreedyHead | None = None
        # convoy's paged attention kernels (decode and prefill) read the cache in place; torch
        # ops gather a copy of each context.
        self.attention_kernels = None
        if (
            model_config.attention_backend == "auto"
            and self.device.type == "cpu"
            and self.dtype == torch.float32
            and arch.head_dim % 8 == 0  # the kernel works in 8-float vectors
        ):
            self.attention_kernels = cpu_kernels.load()
        self._attach_cpu_linear_paths(model_config, max_num_seqs)
        self._attach_cpu_elementwise_kernels()
        if self.device.type == "cpu":
            # After the weights and the cache are allocated: they stay mapped on their own.
            keep_step_buffers_on_heap()
        self.generators: dict[str, torch.Generator] = {}
        self.decode_graphs: DecodeGraphs | None = None
        if use_graphs:
            self.decode_graphs = DecodeGraphs(
                lambda ids, pos, meta: self.model(ids, pos, self.kv_caches, meta),
                max_batch=max_num_seqs,
                max_context=min(max_model_len, MAX_GRAPH_CONTEXT),
                block_size=block_size,
                scratch_slot=self.pad_slot + 1,
                pad_slot=self.pad_slot,
                device=self.device,
            )

    def _attach_cpu_linear_paths(self, model_config: ModelConfig, max_num_seqs: int) -> None:
        """Give a float32 CPU model's linear layers convoy's matrix-vector kernel for few-row
        products on plain (or int8) weights and, unquantized, oneDNN for the rest (packed
        weights when batches can be large); int8 layers keep torch's int8 GEMM for the rest."""
        backend = model_config.linear_backend
        if backend == "torch" or self.device.type != "cpu" or self.dtype != torch.float32:
            return
        if backend == "auto":
            # Packing drops the plain layout the matrix-vector kernel reads: worth it only when
            # batches can outgrow what that kernel takes.
            backend = "packed" if max_num_seqs > SKINNY_MAX_ROWS else "plain"
        skinny = cpu_kernels.load()
        onednn = model_config.quantization is None and onednn_available()
        head = self.model.lm_head
        if model_config.greedy_screening and onednn and skinny is not None:
            # Before packing: the screen's candidates read the plain head, which stays.
            self.greedy_head = make_greedy_head(head.weight, skinny)
        # A weight an embedding also reads (a tied head) keeps its plain layout for the lookup;
        # packed, the head multiplies by a second copy in oneDNN's layout (vocab x hidden floats
        # more memory): on 64-row decode steps it runs ~1.4x faster (32k x 384 head: 11.1 -> 8.0
        # ms), and the head is a fifth of a small model's decode step.
        shared = {
            p.data_ptr()
            for m in self.model.modules()
            if not isinstance(m, Linear)
            for p in m.parameters(recurse=False)
        }
        for module in self.model.modules():
            if not isinstance(module, Linear):
                continue
            if onednn:
                module.use_onednn(
                    pack=backend == "packed",
                    keep_plain=module.weight.data_ptr() in shared
                    or (module is head and self.greedy_head is not None),
                )
            module.skinny_kernel = skinny

    def _attach_cpu_elementwise_kernels(self) -> None:
        """Give a float32 CPU model's norms, rotary embedding and MLP activation convoy's fused
        kernels (one pass over memory each instead of several torch ops), its attention layers
        the KV cache write, and the sampler its argmax."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return
        kernels = cpu_kernels.load()
        if kernels is None:
            return
        self.sampler.kernel = kernels
        for module in self.model.modules():
            if isinstance(module, RMSNorm | RotaryEmbedding | GatedMLP | Attention):
                module.kernel = kernels

    # -- per-request state -------------------------------------------------------------------
    def _generator(self, s: ScheduledRequest) -> torch.Generator | None:
        seed = s.request.sampling_params.seed
        if seed is None:
            return None
        rid = s.request.request_id
        if rid not in self.generators:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed)
            self.generators[rid] = g
        return self.generators[rid]

    # -- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, timing: StepTiming | None = None) -> ModelOutput:
        """Run one scheduled step; ``timing``, when given, gets its phases' seconds."""
        t0 = time.perf_counter()
        for rid in out.finished_request_ids:
            self.generators.pop(rid, None)
        result = ModelOutput()
        if out.is_empty:
            return result

        # Decodes (one query token) first, so attention can batch them in one call; decodes
        # sorted by block table, so those sharing prefix blocks are neighbours and form groups.
        order = sorted(
            out.scheduled,
            key=lambda s: (s.num_tokens != 1, s.block_table if s.num_tokens == 1 else []),
        )
        input_ids, positions, meta, q_starts = self._prepare(order)
        t1 = time.perf_counter()
        # (T, C), or (N, C): the sampled rows only, in order (meta.output_rows).
        graphs = self.decode_graphs
        if graphs is not None and graphs.covers(meta, len(input_ids)):
            hidden = graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        t2 = t3 = time.perf_counter()

        sampling = [(s, q_starts[j] + s.num_tokens - 1) for j, s in enumerate(order) if s.samples]
        if sampling:
            if meta.output_rows is not None:
                last_hidden = hidden
            else:
                rows_idx = torch.tensor([i for _, i in sampling], device=self.device)
                last_hidden = hidden.index_select(0, rows_idx)  # (N, C)
            rows = [
                SamplingRow(
                    params=s.request.sampling_params,
                    prompt_token_ids=s.request.prompt_token_ids,
                    output_token_ids=s.request.output_token_ids,
                    eos_token_ids=s.request.eos_token_ids,
                    generator=self._generator(s),
                )
                for s, _ in sampling
            ]
            tokens: list[int | None] = [None] * len(rows)
            if self.greedy_head is not None:
                screened = [k for k, r in enumerate(rows) if plain_greedy(r)]
                # Usually every row: then no gathered copy (a list index is a slow torch path).
                screened_hidden = (
                    last_hidden if len(screened) == len(rows) else last_hidden[screened]
                )
                picked = self.greedy_head(screened_hidden).tolist() if screened else []
                for k, token in zip(screened, picked, strict=True):
                    tokens[k] = token if token >= 0 else None
            # The rest (sampled rows, logprobs, penalties; rows the screen left): full logits.
            rest = [k for k, token in enumerate(tokens) if token is None]
            top, at = None, {k: i for i, k in enumerate(rest)}
            if rest:
                rest_hidden = last_hidden if len(rest) == len(rows) else last_hidden[rest]
                logits = self.model.compute_logits(rest_hidden)  # (len(rest), V)
                t3 = time.perf_counter()
                rest_tokens, top = self.sampler(logits, [rows[k] for k in rest])
                for k, token in zip(rest, rest_tokens, strict=True):
                    tokens[k] = token
            else:
                t3 = time.perf_counter()
            for k, (s, _) in enumerate(sampling):
                token = tokens[k]
                assert token is not None
                rid = s.request.request_id
                result.sampled[rid] = [token]
                if top is not None and s.request.sampling_params.logprobs is not None:
                    i = at[k]  # rows asking for logprobs are never screened
                    n_top = s.request.sampling_params.logprobs
                    result.logprobs[rid] = [
                        TokenLogprobs(
                            token_id=token,
                            logprob=float(top.sampled_logprobs[i]),
                            rank=int(top.sampled_ranks[i]),
                            top=_top_list(top, i)[:n_top],
                        )
                    ]

        for j, s in enumerate(order):
            if s.request.sampling_params.prompt_logprobs is not None:
                self._prompt_logprobs(s, hidden, q_starts[j], result)
        if timing is not None:
            timing.prepare, timing.forward = t1 - t0, t2 - t1
            timing.logits, timing.sample = t3 - t2, time.perf_counter() - t3
        return result

    def _prompt_logprobs(
        self, s: ScheduledRequest, hidden: torch.Tensor, q_start: int, result: ModelOutput
    ) -> None:
        """Logprobs of prompt tokens predicted within this chunk: position p scores token p+1."""
        request = s.request
        last = min(s.start + s.num_tokens, request.num_prompt_tokens - 1)  # exclusive, in positions
        if last <= s.start:
            return
        rows = hidden[q_start : q_start + (last - s.start)]
        logprobs = torch.log_softmax(self.model.compute_logits(rows), dim=-1)
        targets = torch.tensor(request.prompt_token_ids[s.start + 1 : last + 1], device=self.device)
        k = request.sampling_params.prompt_logprobs or 0
        top = gather_logprobs(logprobs, targets, k)
        entries = [
            TokenLogprobs(
                token_id=int(t),
                logprob=float(lp),
                rank=int(rk),
                top=_top_list(top, i),
            )
            for i, (t, lp, rk) in enumerate(
                zip(
                    targets.tolist(),
                    top.sampled_logprobs.tolist(),
                    top.sampled_ranks.tolist(),
                    strict=True,
                )
            )
        ]
        result.prompt_logprobs[request.request_id] = (s.start + 1, entries)

    def _shared_prefixes(
        self, decodes: list[ScheduledRequest], tables: torch.Tensor, ctx: torch.Tensor
    ) -> tuple[list[SharedPrefixDecode], torch.Tensor | None, torch.Tensor | None]:
        """Groups of decodes whose block tables start alike, and each row's remaining slots.

        A block id in two tables is one shared block (prefix cache, n > 1). A group is a run of
        neighbouring rows sharing at least ``MIN_SHARED_BLOCKS`` leading blocks; its prefix
        always leaves each row at least its newest token. Returns no groups (and no suffixes)
        when no two rows share that much.
        """
        bs = self.block_size
        groups: list[SharedPrefixDecode] = []
        prefix_lens = [0] * len(decodes)

        def usable(d: ScheduledRequest) -> int:
            # Blocks before the newest token's (which stays in the row's own part).
            return min(len(d.block_table), d.start // bs)

        start = 0
        while start < len(decodes):
            lead = decodes[start].block_table
            shared = usable(decodes[start])
            end = start + 1
            # Rows come sorted by block table, so rows sharing a prefix are neighbours; the
            # group grows while its common prefix stays long enough.
            while end < len(decodes):
                table = decodes[end].block_table
                limit = min(shared, usable(decodes[end]))
                k = 0
                while k < limit and table[k] == lead[k]:
                    k += 1
                if k < MIN_SHARED_BLOCKS:
                    break
                shared, end = k, end + 1
            if end - start > 1:
                pos = torch.arange(shared * bs, device=self.device)
                slots = tables[start, pos // bs] * bs + pos % bs
                groups.append(SharedPrefixDecode(start, end, slots))
                prefix_lens[start:end] = [shared * bs] * (end - start)
            start = end
        if not groups:
            return [], None, None
        plen = torch.tensor(prefix_lens, dtype=torch.long, device=self.device)
        suffix_lens = ctx - plen
        pos = plen[:, None] + torch.arange(int(suffix_lens.max()), device=self.device)[None, :]
        real = pos < ctx[:, None]
        blk = torch.gather(tables, 1, (pos // bs).clamp(max=tables.shape[1] - 1))
        suffix_slots = torch.where(real, blk * bs + pos % bs, self.pad_slot)
        return groups, suffix_slots, suffix_lens

    def _prepare(
        self, order: list[ScheduledRequest]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten the scheduled tokens into ids, positions, slots and attention metadata.

        Python touches each request once (its new token ids, its block table); everything
        per token is computed with tensor ops.
        """
        bs = self.block_size
        dev = self.device
        tokens: list[int] = []
        q_starts: list[int] = []
        for s in order:
            q_starts.append(len(tokens))
            tokens.extend(s.request.all_token_ids[s.start : s.start + s.num_tokens])
        input_ids = torch.tensor(tokens, dtype=torch.long, device=dev)

        num_decodes = sum(1 for s in order if s.num_tokens == 1)
        max_blocks = max(len(s.block_table) for s in order)
        # Rows padded with block 0: entries past a row's context are never read.
        tables = torch.tensor(
            [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in order],
            dtype=torch.long,
            device=dev,
        )
        starts = torch.tensor([s.start for s in order], dtype=torch.long, device=dev)
        if num_decodes == len(order):
            req_of_token = torch.arange(len(order), device=dev)  # one token per request
            positions = starts
        else:
            # Position of each flat token: its request's start plus its offset within it.
            lens = torch.tensor([s.num_tokens for s in order], dtype=torch.long, device=dev)
            req_of_token = torch.repeat_interleave(torch.arange(len(order), device=dev), lens)
            offsets = torch.arange(len(tokens), device=dev) - torch.repeat_interleave(
                torch.tensor(q_starts, device=dev), lens
            )
            positions = starts[req_of_token] + offsets  # (T,)
        slot_mapping = tables[req_of_token, positions // bs] * bs + positions % bs

        decode_slots = decode_lens = decode_tables = suffix_slots = suffix_lens = None
        prefix_groups: list[SharedPrefixDecode] = []
        if num_decodes:
            decode_lens = starts[:num_decodes] + 1  # context length after this token
            lmax = max(s.start for s in order[:num_decodes]) + 1  # from the host: no sync
            graphed = (
                self.decode_graphs is not None
                and num_decodes == len(order)
                and self.decode_graphs.fits(num_decodes, lmax)
            )
            if not graphed:
                # (A graph replays one launch for the whole step: worth more than reading
                # shared prefixes once, which would need a step shape of its own.)
                prefix_groups, suffix_slots, suffix_lens = self._shared_prefixes(
                    order[:num_decodes], tables[:num_decodes], decode_lens
                )
            if self.attention_kernels is not None:
                decode_tables = tables[:num_decodes]
            else:
                pos = torch.arange(lmax, device=dev)
                blk = tables[:num_decodes, (pos // bs).clamp(max=max_blocks - 1)]
                real = pos[None, :] < decode_lens[:, None]
                decode_slots = torch.where(real, blk * bs + pos % bs, self.pad_slot)  # (D, Lmax)

        prefills = []
        for j in range(num_decodes, len(order)):
            s = order[j]
            ctx_len = s.start + s.num_tokens
            pos = torch.arange(ctx_len, device=dev)
            prefills.append(
                PrefillChunk(
                    q_start=q_starts[j],
                    q_end=q_starts[j] + s.num_tokens,
                    context_slots=tables[j, pos // bs] * bs + pos % bs,
                    query_positions=pos[s.start :],
                )
            )
        paged_prefill = None
        if self.attention_kernels is not None and prefills:
            paged_prefill = PagedPrefill(
                kernel=self.attention_kernels,
                block_tables=tables[num_decodes:],
                query_starts=torch.tensor(q_starts[num_decodes:], dtype=torch.long, device=dev),
                positions=starts[num_decodes:],
                num_queries=torch.tensor(
                    [s.num_tokens for s in order[num_decodes:]], dtype=torch.long, device=dev
                ),
            )
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decode_tokens=num_decodes,
            decode_slots=decode_slots,
            decode_context_lens=decode_lens,
            prefills=prefills,
            decode_block_tables=decode_tables,
            decode_kernel=self.attention_kernels if decode_tables is not None else None,
            block_size=bs,
            paged_prefill=paged_prefill,
            prefix_groups=prefix_groups,
            suffix_slots=suffix_slots,
            suffix_lens=suffix_lens,
        )
        if num_decodes < len(order) and not any(
            s.request.sampling_params.prompt_logprobs is not None for s in order
        ):
            self._restrict_output(order, meta)
        return input_ids, positions, meta, q_starts

    def _restrict_output(self, order: list[ScheduledRequest], meta: AttentionMetadata) -> None:
        """Let the last layer compute only the rows that sample (``meta.output_rows``).

        A prompt chunk needs the final hidden state of its last token only, and only if that
        is the prompt's last one; its other tokens feed the next tokens through their keys and
        values, which every layer, the last included, still writes. So the last layer's
        queries, attention, output projection and MLP skip them: a 1/num_layers share of a
        prefill step's work. Each sampling chunk becomes a single query at its last position
        over its whole context; decodes, which all sample, come first as before, with the
        same metadata. (A step with a one-token prompt chunk that does not sample among the
        decode rows, rare, computes every row.)
        """
        d = meta.num_decode_tokens
        if not all(s.samples for s in order[:d]):
            return
        rows = list(range(d))
        prefills = []
        for s, chunk in zip(order[d:], meta.prefills, strict=True):
            if not s.samples:
                continue
            rows.append(chunk.q_end - 1)
            prefills.append(
                PrefillChunk(
                    q_start=len(rows) - 1,
                    q_end=len(rows),
                    context_slots=chunk.context_slots,
                    query_positions=chunk.query_positions[-1:],
                )
            )
        meta.output_rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        paged_prefill = None
        if meta.paged_prefill is not None and prefills:
            sampling = [j for j, s in enumerate(order[d:]) if s.samples]
            pick = torch.tensor(sampling, dtype=torch.long, device=self.device)
            pp = meta.paged_prefill
            paged_prefill = PagedPrefill(
                kernel=pp.kernel,
                block_tables=pp.block_tables.index_select(0, pick),
                query_starts=torch.arange(d, d + len(sampling), device=self.device),
                positions=(pp.positions + pp.num_queries - 1).index_select(0, pick),
                num_queries=torch.ones(len(sampling), dtype=torch.long, device=self.device),
            )
        meta.output_meta = replace(
            meta,
            slot_mapping=meta.slot_mapping[meta.output_rows],
            prefills=prefills,
            paged_prefill=paged_prefill,
            output_rows=None,
            output_meta=None,
            _masks={},
        )
