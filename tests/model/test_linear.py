"""Every CPU path of convoy's Linear computes the same product as torch's, to float32 rounding:
oneDNN on packed or plain weights, the few-row matrix-vector kernel, and the runner's choice
between them (packing frees the plain weight, except under a head tied to the embedding table,
which is packed as a second copy)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from convoy import LLM, SamplingParams
from convoy.bench.memory import memory_report
from convoy.model import cpu_kernels
from convoy.model.linear import (
    SKINNY_MAX_ROWS,
    CpuLinear,
    Linear,
    LinearMethod,
    TorchLinear,
    onednn_available,
)
from convoy.model.quantization import Int8Linear

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def _layer(bias: bool, method: LinearMethod | None = None) -> Linear:
    torch.manual_seed(0)
    layer = Linear(96, 200, bias, method or TorchLinear())
    layer.weight.data.normal_()
    if bias:
        assert layer.bias is not None
        layer.bias.data.normal_()
    return layer


@needs_onednn
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1, 64, 300])
def test_cpu_paths_equal_torch_linear(pack: bool, bias: bool, rows: int) -> None:
    layer = _layer(bias, CpuLinear(cpu_kernels.load(), onednn=True, pack=pack))
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        want = torch.nn.functional.linear(x.double(), layer.weight.double(), None)
        if layer.bias is not None:
            want = want + layer.bias.double()
        layer.method.process_weights_after_loading(layer, keep_plain=False)
        got = layer(x)
    assert got.shape == (rows, 200) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # Packing keeps one copy of the weight, in oneDNN's layout.
    assert (layer.weight.numel() == 0) == pack


@needs_onednn
def test_runner_packs_a_tied_head_beside_the_embedding_table(
    make_checkpoint: Callable[..., Path],
) -> None:
    path = make_checkpoint("llama3-tied-mqa")
    llm = LLM(model=str(path), max_model_len=128, linear_backend="packed")
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m.onednn_weight is not None and m.onednn_weight.is_mkldnn for m in linears)
    # The embedding lookup still reads the plain table the head shares; the head multiplies
    # by its own packed copy, which the memory report counts.
    head = model.lm_head
    table = model.model.embed_tokens.weight
    assert head.weight.data_ptr() == table.data_ptr() and head.weight.numel() > 0
    assert all(m.weight.numel() == 0 for m in linears if m is not head)
    plain = LLM(model=str(path), max_model_len=128, linear_backend="plain")
    extra = memory_report(llm).weights_bytes - memory_report(plain).weights_bytes
    assert extra == table.numel() * table.element_size()
    # Few rows still go through the matrix-vector kernel on the plain table, more through
    # oneDNN on the packed copy; both give the plain product.
    for rows in (1, SKINNY_MAX_ROWS + 3):
        x = torch.randn(rows, table.shape[1])
        torch.testing.assert_close(head(x), x @ table.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("max_num_seqs", "packed"), [(1, False), (SKINNY_MAX_ROWS + 1, True)])
def test_auto_packs_only_when_batches_outgrow_the_matrix_vector_kernel(
    make_checkpoint: Callable[..., Path], max_num_seqs: int, packed: bool
) -> None:
    if not onednn_available():
        pytest.skip("torch built without oneDNN")
    llm = LLM(model=str(make_checkpoint("llama")), max_model_len=128, max_num_seqs=max_num_seqs)
    proj = llm.engine.runner.model.model.layers[0].mlp.down_proj
    assert isinstance(proj, Linear) and proj.onednn_weight is not None
    assert proj.onednn_weight.is_mkldnn == packed


def test_unknown_linear_backend_is_refused(make_checkpoint: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        LLM(model=str(make_checkpoint("llama")), linear_backend="fast")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1])
def test_int8_matrix_vector_kernel_equals_torchs_int8_product(bias: bool, rows: int) -> None:
    kernel = cpu_kernels.load()
    if kernel is None:
        pytest.skip("convoy's CPU kernels could not be built here")
    layer = _layer(bias, Int8Linear(kernel))
    layer.method.process_weights_after_loading(layer, keep_plain=False)
    assert layer.qweight is not None and layer.qscale is not None
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        # The dequantized weight, exactly: int8 values times their row's scale.
        w = layer.qweight.double() * layer.qscale.double()[:, None]
        want = x.double() @ w.t()
        if layer.bias is not None:
            want = want + layer.bias.double()
        got = layer(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_int8_model_runs_every_linear_on_int8_weights_close_to_float32(
    make_checkpoint: Callable[..., Path],
) -> None:
    path = str(make_checkpoint("llama"))
    prompt = list(range(5, 45))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    f32 = LLM(model=path, max_model_len=128)
    int8 = LLM(model=path, max_model_len=128, quantization="int8")
    linears = [m for m in int8.engine.runner.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.qweight is not None and m.weight.numel() == 0 for m in linears)
    if cpu_kernels.load() is not None:
        assert all(isinstance(m.method, Int8Linear) for m in linears)
        assert all(m.method.skinny is not None for m in linears)
    # Prompt logprobs (a 40-row product: torch's int8 GEMM) and a decode (one row: the
    # matrix-vector kernel) stay close to float32's.
    got, want = (llm.generate([prompt], params, use_tqdm=False)[0] for llm in (int8, f32))
    assert got.prompt_logprobs is not None and want.prompt_logprobs is not None
    diffs = [
        abs(g[t].logprob - w[t].logprob)
        for g, w, t in zip(
            got.prompt_logprobs[1:], want.prompt_logprobs[1:], prompt[1:], strict=True
        )
    ]
    # Per-row int8 rounding of a random-weight model: ~0.01 on average here, 0.05 at most.
    assert sum(diffs) / len(diffs) < 0.03 and max(diffs) < 0.2, diffs
    assert got.outputs[0].finish_reason == "length" and len(got.outputs[0].token_ids) == 1
