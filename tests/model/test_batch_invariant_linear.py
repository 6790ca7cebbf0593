"""Batch-invariant float32 CPU linear layers: a row's result is bitwise the same whatever the
number of rows in the step, across the switch from convoy's ordered matrix-vector kernel (a
few rows) to oneDNN (more), and close to the exact product. The ordered kernel itself is a
valid product for any block size, and sums exactly as its FMA chains say."""

from __future__ import annotations

import logging

import pytest
import torch

from convoy.config import ModelConfig
from convoy.model import batch_invariant, cpu_kernels
from convoy.model.linear import SKINNY_MAX_ROWS, CpuLinear, Linear, onednn_available
from convoy.worker.model_ops import choose_linear

kernels = cpu_kernels.load()
needs_kernels = pytest.mark.skipif(kernels is None, reason="convoy's CPU kernels did not build")
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")

SHAPES = [(256, 768), (768, 256), (256, 8192), (640, 128), (1536, 64), (3072, 64)]
MAX_ROWS = 70  # well past SKINNY_MAX_ROWS, into several of oneDNN's row blocks


def _layer(in_features: int, out_features: int, bias: bool, method: CpuLinear) -> Linear:
    gen = torch.Generator().manual_seed(in_features * 7 + out_features)
    layer = Linear(in_features, out_features, bias, method)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        layer.weight.mul_(in_features**-0.5)  # outputs of order one, as in a trained model
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(out_features, generator=gen))
    return layer


def _exact(layer: Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    want = x.double() @ weight.double().t()
    return want if layer.bias is None else want + layer.bias.double()


def _assert_batch_invariant(layer: Linear, weight: torch.Tensor) -> None:
    """Every row of every row count 1..MAX_ROWS equals that row computed alone, bitwise, and
    is close to the exact product."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(MAX_ROWS, layer.in_features, generator=gen)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(MAX_ROWS)])
        for rows in range(1, MAX_ROWS + 1):
            got = layer(x[:rows])
            assert got.shape == (rows, layer.out_features) and got.dtype == torch.float32
            assert torch.equal(got, alone[:rows]), f"{rows} rows differ from one at a time"
    torch.testing.assert_close(alone.double(), _exact(layer, x, weight), rtol=1e-5, atol=1e-5)


@needs_kernels
@needs_onednn
@pytest.mark.parametrize("keep_plain", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
def test_a_row_is_the_same_whatever_rows_share_the_step(
    in_features: int, out_features: int, bias: bool, keep_plain: bool
) -> None:
    method = CpuLinear(kernels, onednn=True, pack=False, batch_invariant=True)
    layer = _layer(in_features, out_features, bias, method)
    weight = layer.weight.detach().clone()
    layer.method.process_weights_after_loading(layer, keep_plain=keep_plain)
    assert layer.onednn_weight is not None and layer.onednn_weight.is_mkldnn
    if layer.ordered_k_block is not None:  # the kernel reproduces oneDNN on this CPU
        # Its own layout replaces the plain weight unless another module reads that.
        assert (layer.ordered_weight is None) == keep_plain
    assert (layer.weight.numel() == 0) != keep_plain
    _assert_batch_invariant(layer, weight)


@needs_kernels
@needs_onednn
def test_the_kernel_takes_a_few_rows_and_onednn_more() -> None:
    method = CpuLinear(kernels, onednn=True, pack=False, batch_invariant=True)
    assert method.batch_invariant and method.pack
    assert method.name == "onednn-packed+ordered-matvec"
    layer = _layer(256, 96, True, method)
    layer.method.process_weights_after_loading(layer, keep_plain=False)
    found = batch_invariant.calibrate(kernels, 256, 64)
    assert layer.ordered_k_block == found.k_block
    if found.k_block is None:
        pytest.skip("no k_block reproduces oneDNN on this CPU: oneDNN takes every row count")
    x = torch.randn(SKINNY_MAX_ROWS + 1, 256)
    assert kernels is not None and layer.ordered_weight is not None and layer.bias is not None
    with torch.inference_mode():
        few = kernels.skinny_linear_ordered_blocks(
            x[:SKINNY_MAX_ROWS], layer.ordered_weight, layer.bias, found.k_block, 96
        )
        assert torch.equal(layer(x[:SKINNY_MAX_ROWS]), few)
        many = batch_invariant.onednn_linear(x, layer.onednn_weight, layer.bias)
        assert torch.equal(layer(x), many)
        assert torch.equal(many[:SKINNY_MAX_ROWS], few)


def _fma_chains(x: torch.Tensor, w: torch.Tensor, k_block: int) -> torch.Tensor:
    """oneDNN's order, emulated: per output an FMA chain over each block of k_block inputs
    (a float64 multiply-add is exact for float32 operands, then rounded once), the blocks'
    float32 sums added in order."""
    xd, wd = x.double(), w.double()
    total: torch.Tensor | None = None
    for lo in range(0, x.shape[1], k_block):
        c = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
        for k in range(lo, min(x.shape[1], lo + k_block)):
            c = (c + xd[:, k : k + 1] * wd[:, k]).float().double()
        total = c.float() if total is None else total + c.float()
    assert total is not None
    return total


@needs_kernels
@pytest.mark.parametrize("k_block", [16, 40, 7, 1000])
def test_ordered_kernel_sums_as_fused_multiply_add_chains(k_block: int) -> None:
    assert kernels is not None
    gen = torch.Generator().manual_seed(k_block)
    x, w = torch.randn(5, 100, generator=gen), torch.randn(37, 100, generator=gen)
    want = _fma_chains(x, w, k_block)
    assert torch.equal(kernels.skinny_linear_ordered(x, w, None, k_block), want)
    blocks = kernels.ordered_weight_blocks(w)
    assert torch.equal(kernels.skinny_linear_ordered_blocks(x, blocks, None, k_block, 37), want)


@needs_kernels
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 70])
@pytest.mark.parametrize(("in_features", "out_features"), [*SHAPES, (100, 37), (24, 5)])
def test_any_k_block_gives_the_product(
    in_features: int, out_features: int, bias: bool, rows: int
) -> None:
    """A k_block oneDNN does not use is still a valid order: both layouts agree bitwise, and
    are close to the exact product."""
    assert kernels is not None
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, in_features, generator=gen) * in_features**-0.5
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(rows, in_features, generator=gen)
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    blocks = kernels.ordered_weight_blocks(w)
    for k_block in (in_features, 512, 64, 100, 13):
        got = kernels.skinny_linear_ordered(x, w, b, k_block)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(
            kernels.skinny_linear_ordered_blocks(x, blocks, b, k_block, out_features), got
        )


@needs_kernels
def test_without_onednn_the_ordered_kernel_takes_every_row_count() -> None:
    method = CpuLinear(kernels, onednn=False, pack=False, batch_invariant=True)
    assert method.name == "ordered-matvec"
    layer = _layer(640, 128, True, method)
    weight = layer.weight.detach().clone()
    layer.method.process_weights_after_loading(layer, keep_plain=False)
    assert layer.onednn_weight is None and layer.ordered_k_block is not None
    _assert_batch_invariant(layer, weight)


@needs_onednn
def test_without_kernels_onednn_takes_every_row_count_padded() -> None:
    if not batch_invariant.calibrate(None, 1536, 64).onednn_invariant:
        pytest.skip("oneDNN is not row-count invariant on this CPU")
    method = CpuLinear(None, onednn=True, pack=False, batch_invariant=True)
    assert method.name == "onednn-packed+padded-rows"
    # 1536 inputs: oneDNN sums a single row in another order than several, on AVX-512.
    layer = _layer(1536, 64, False, method)
    weight = layer.weight.detach().clone()
    layer.method.process_weights_after_loading(layer, keep_plain=False)
    assert layer.ordered_k_block is None
    _assert_batch_invariant(layer, weight)


@needs_kernels
@needs_onednn
def test_where_no_k_block_fits_onednn_takes_every_row_count_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As on a CPU whose oneDNN sums in an order the kernel cannot reproduce."""
    monkeypatch.setattr(batch_invariant, "_cache", {})
    monkeypatch.setattr(batch_invariant, "k_block_candidates", lambda in_features: [13])
    method = CpuLinear(kernels, onednn=True, pack=False, batch_invariant=True)
    with caplog.at_level(logging.INFO, logger="convoy.model.batch_invariant"):
        layers = [_layer(640, n, True, method) for n in (128, 96)]
        weight = layers[0].weight.detach().clone()
        for layer in layers:
            layer.method.process_weights_after_loading(layer, keep_plain=False)
    said = [r.getMessage() for r in caplog.records if "in_features=640" in r.getMessage()]
    assert len(said) == 1 and "oneDNN at every row count" in said[0]  # once per in_features
    assert layers[0].ordered_k_block is None and layers[0].onednn_weight is not None
    _assert_batch_invariant(layers[0], weight)


@needs_kernels
@needs_onednn
def test_where_onednn_is_not_row_count_invariant_the_kernel_takes_every_row_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batch_invariant, "_cache", {})
    monkeypatch.setattr(
        batch_invariant,
        "_probe",
        lambda kernels, in_features, pack_rows: batch_invariant.Calibration(
            in_features, None, onednn_invariant=False
        ),
    )
    layer = _layer(
        768, 256, False, CpuLinear(kernels, onednn=True, pack=False, batch_invariant=True)
    )
    weight = layer.weight.detach().clone()
    layer.method.process_weights_after_loading(layer, keep_plain=False)
    assert layer.onednn_weight is None and layer.ordered_k_block is not None
    _assert_batch_invariant(layer, weight)


def test_choose_linear_is_batch_invariant_only_when_asked() -> None:
    config = ModelConfig()
    cpu = torch.device("cpu")
    default = choose_linear(config, cpu, torch.float32, 8)
    assert isinstance(default, CpuLinear) and not default.batch_invariant
    assert "ordered" not in default.name
    asked = choose_linear(config, cpu, torch.float32, 1, batch_invariant=True)
    assert isinstance(asked, CpuLinear) and asked.batch_invariant
    assert asked.pack == onednn_available()
