"""torch-ops attention whose decode steps replay CUDA graphs: one launch, not hundreds.

A decode step of a small model is a few hundred tiny kernels; launched one by one from
Python, the GPU waits on the host most of the time. A captured graph replays them all with
one launch. A graph fixes its tensors' shapes and addresses, so steps are padded to a captured
shape and their inputs copied into static buffers:

- batch: the decode rows, rounded up to :data:`BATCH_SIZES` (vLLM's buckets);
- context: the longest row's context, rounded up to :data:`CONTEXT_BUCKET` tokens; the
  attention mask (built inside the graph from each row's length) hides the padding.

Padding rows decode token 0 at position 0 with a context of one key, written to and read
from a scratch slot of the KV cache that no request owns, so they compute finite values and
touch no request's keys or values. Graphs are captured on first use and share one memory
pool; steps they do not cover (prompt chunks, prefix-sharing decode groups, batches or
contexts beyond the largest bucket) run eagerly.
"""

from __future__ import annotations

import torch

from convoy.model.attention.base import AttentionMetadata, Forward
from convoy.model.attention.batch import AttentionBatch
from convoy.model.attention.torch_ops import GatheredDecode, GatheredPrefill, TorchAttention
from convoy.utils import cdiv

BATCH_SIZES = (1, 2, 4, 8, *range(16, 513, 16))
CONTEXT_BUCKET = 256
# Graphs cover decode contexts up to this many tokens (vLLM's max_seq_len_to_capture).
MAX_GRAPH_CONTEXT = 8192

TorchMetadata = AttentionMetadata[GatheredDecode, GatheredPrefill]


def batch_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes graphs are captured for: :data:`BATCH_SIZES` up to the first
    that holds ``max_batch`` rows (bigger batches, past the last size, run eagerly)."""
    cap = min(max_batch, BATCH_SIZES[-1])
    return [b for b in BATCH_SIZES if b < cap] + [next(b for b in BATCH_SIZES if b >= cap)]


class DecodeGraphs:
    """Captured decode forwards keyed by (padded batch, padded context)."""

    def __init__(
        self,
        max_batch: int,
        max_context: int,
        block_size: int,
        scratch_slot: int,
        pad_slot: int,
        device: torch.device,
    ) -> None:
        self.batch_sizes = batch_buckets(max_batch)
        self.max_batch = self.batch_sizes[-1]
        self.max_context = cdiv(max_context, CONTEXT_BUCKET) * CONTEXT_BUCKET
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        self.pad_slot = pad_slot
        n, lmax = self.max_batch, self.max_context
        # The static inputs every graph reads (views of their leading rows and columns).
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.long, device=device)
        self.context_lens = torch.ones(n, dtype=torch.long, device=device)
        self.decode_slots = torch.full((n, lmax), scratch_slot, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = 0  # steps run through a graph (tests check the path is taken)

    def fits(self, num_rows: int, context_len: int) -> bool:
        """Whether a decode-only step of this many rows and longest context has a graph shape
        (the runner asks before it builds the step's metadata)."""
        return num_rows <= self.max_batch and context_len <= self.max_context

    def covers(self, meta: TorchMetadata, num_tokens: int) -> bool:
        """Whether a step with this metadata can replay a graph: decodes only, attention over
        gathered slots (no shared-prefix groups), every row's output needed, within bounds."""
        return (
            meta.decode is not None
            and meta.prefill is None
            and meta.shared_prefix is None
            and meta.output_rows is None
            and meta.num_decode_tokens == num_tokens
            and self.fits(num_tokens, meta.decode.slots.shape[1])
        )

    def run(
        self,
        forward: Forward,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: TorchMetadata,
    ) -> torch.Tensor:
        """The step's final hidden states ``(D, C)``, from a graph of ``forward`` (captured
        now if new). The result is a view of the graph's output buffer: valid until the next
        replay."""
        assert meta.decode is not None
        d, lctx = meta.decode.slots.shape
        b = next(x for x in self.batch_sizes if x >= d)
        lpad = cdiv(lctx, CONTEXT_BUCKET) * CONTEXT_BUCKET
        key = (b, lpad)
        if key not in self.graphs:
            self.graphs[key] = self._capture(forward, b, lpad)
        self.input_ids[:d].copy_(input_ids)
        self.positions[:d].copy_(positions)
        self.slot_mapping[:d].copy_(meta.slot_mapping)
        self.context_lens[:d].copy_(meta.decode.context_lens)
        self.decode_slots[:d, :lctx].copy_(meta.decode.slots)
        if lpad > lctx:
            self.decode_slots[:d, lctx:lpad].fill_(self.pad_slot)
        if b > d:
            # Rows a bigger earlier step used: back to padding, or they would write into the
            # slots of that step's requests.
            self._reset_padding(d, b, lpad)
        graph, out = self.graphs[key]
        graph.replay()
        self.replays += 1
        return out[:d]

    def _reset_padding(self, start: int, end: int, width: int) -> None:
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        self.slot_mapping[start:end].fill_(self.scratch_slot)
        self.context_lens[start:end].fill_(1)
        self.decode_slots[start:end, :width].fill_(self.scratch_slot)

    def _static_meta(self, b: int, width: int) -> TorchMetadata:
        decode = GatheredDecode(self.decode_slots[:b, :width], self.context_lens[:b])
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], num_decode_tokens=b, decode=decode, prefill=None
        )

    def _capture(
        self, forward: Forward, b: int, width: int
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Every row padding (the scratch slot) while warming up and capturing, so those runs
        # write no request's keys and values; a step's inputs are copied in after.
        self._reset_padding(0, b, width)
        ids, pos = self.input_ids[:b], self.positions[:b]
        # Warm up on a side stream first: lazy initialisations must not be captured.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward(ids, pos, self._static_meta(b, width))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward(ids, pos, self._static_meta(b, width))
        return graph, out


class CudaGraphAttention(TorchAttention):
    """:class:`TorchAttention` on CUDA, decode-only steps replayed from :class:`DecodeGraphs`.

    The KV cache needs one slot more than the pad slot: graphs' padding rows write there.
    """

    name = "cuda-graphs"
    # The pad slot, and the scratch slot graphs' padding rows write to.
    extra_kv_slots = 2

    def __init__(
        self,
        block_size: int,
        pad_slot: int,
        device: torch.device,
        max_batch: int,
        max_context: int,
    ) -> None:
        super().__init__(block_size, pad_slot, device)
        self.graphs = DecodeGraphs(
            max_batch=max_batch,
            max_context=min(max_context, MAX_GRAPH_CONTEXT),
            block_size=block_size,
            scratch_slot=pad_slot + 1,
            pad_slot=pad_slot,
            device=device,
        )

    def groups_shared_prefixes(self, batch: AttentionBatch) -> bool:
        # A graph replays one launch for the whole step: worth more than reading shared
        # prefixes once, which would need a step shape of its own.
        d = batch.num_decodes
        return not (d == batch.num_rows and self.graphs.fits(d, max(batch.starts[:d]) + 1))

    def run_model(
        self,
        forward: Forward,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: TorchMetadata,
    ) -> torch.Tensor:
        if self.graphs.covers(meta, len(input_ids)):
            return self.graphs.run(forward, input_ids, positions, meta)
        return forward(input_ids, positions, meta)
