"""convoy's fused CPU kernels for the decoder's elementwise parts (RMSNorm with the residual
add, SiLU(gate) * up, rotary embeddings) compute what the torch path of the same modules
computes, to float32 rounding, on strided inputs and row lengths that are not multiples of the
kernels' 8-float vectors."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from convoy.model import cpu_kernels
from convoy.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from convoy.model.linear import TorchLinear

kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="convoy's CPU kernels did not build")


@pytest.mark.parametrize("dim", [1024, 20, 3])
def test_rms_norm_and_fused_residual_add_match_torch(dim: int) -> None:
    torch.manual_seed(0)
    norm, fused = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6, kernels)
    norm.weight.data.normal_()
    fused.weight.data.copy_(norm.weight.data)
    # Rows of a wider tensor: the kernel takes any row stride.
    x = torch.randn(37, dim + 5)[:, :dim] * 3
    residual = torch.randn(37, dim)
    with torch.inference_mode():
        want = norm(x)
        want_h, want_r = norm(x, residual)
        got = fused(x)
        got_h, got_r = fused(x.clone(), residual.clone())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_r, want_r, rtol=0, atol=0)  # the add is the same add
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)


def test_fused_residual_add_updates_both_in_place() -> None:
    norm = RMSNorm(16, 1e-5, kernels)
    x, residual = torch.randn(4, 16), torch.randn(4, 16)
    want_r = x + residual
    h, r = norm(x, residual)
    assert h.data_ptr() == x.data_ptr() and r.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(r, want_r, rtol=0, atol=0)


@pytest.mark.parametrize("intermediate", [2816, 13])
def test_silu_and_mul_matches_torch(intermediate: int) -> None:
    torch.manual_seed(0)
    mlp = GatedMLP(32, intermediate, "silu", False, TorchLinear())
    fused_mlp = GatedMLP(32, intermediate, "silu", False, TorchLinear(), kernels)
    fused_mlp.load_state_dict(mlp.state_dict())
    gate_up = torch.randn(50, 2 * intermediate) * 8
    # Arguments out where exp over- or underflows: silu is then x or -0.
    gate_up[0, :8] = torch.tensor([-120.0, -88.5, -87.0, -30.0, 30.0, 88.0, 89.0, 120.0])
    gate, up = gate_up.split(intermediate, dim=-1)
    want = F.silu(gate) * up
    got = kernels.silu_and_mul(gate_up)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)
    with torch.inference_mode():
        x = torch.randn(5, 32)
        fused = fused_mlp(x)
        torch.testing.assert_close(fused, mlp(x), rtol=1e-5, atol=1e-6)


def test_silu_and_mul_refuses_odd_widths() -> None:
    with pytest.raises(RuntimeError, match="even number"):
        kernels.silu_and_mul(torch.randn(2, 7))


@pytest.mark.parametrize("head_dim", [64, 24, 6])
def test_rotary_in_place_matches_torch(head_dim: int) -> None:
    torch.manual_seed(0)
    heads, kv_heads, t = 8, 2, 19
    rotary = RotaryEmbedding(head_dim, 10000.0, None, max_positions=512)
    # q and k as the attention layer has them: strided views of one qkv product.
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim)
    q = qkv[:, : heads * head_dim].view(t, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(t, kv_heads, head_dim)
    positions = torch.randint(0, 512, (t,))
    want_q, want_k = rotary(positions, q, k)
    in_place = RotaryEmbedding(head_dim, 10000.0, None, max_positions=512, kernels=kernels)
    got_q, got_k = in_place(positions, q, k)
    assert got_q.data_ptr() == qkv.data_ptr()  # rotated in place
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-6)


def test_rotary_refuses_positions_outside_its_table() -> None:
    rotary = RotaryEmbedding(8, 10000.0, None, max_positions=16)
    q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        kernels.rotary_embedding(torch.tensor([3, 16]), q, k, rotary.cos, rotary.sin)


@pytest.mark.parametrize("vocab", [32000, 13, 1])
def test_argmax_rows_matches_torch_on_ties_nan_and_inf(vocab: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(9, vocab)
    if vocab > 1:
        x[1, vocab // 2 :] = x[1].max() + 1  # ties: the first wins
        x[2, :] = float("-inf")  # nothing finite
        x[3, vocab - 1] = float("nan")  # NaN counts as the largest
        x[4, vocab // 2] = float("nan")
        x[4, 0] = float("inf")
        x[5, :] = 0.0
    # Rows of a wider tensor: any row stride.
    x = torch.cat([x, torch.zeros(9, 3)], dim=1)[:, :vocab]
    torch.testing.assert_close(kernels.argmax_rows(x), x.argmax(dim=-1), rtol=0, atol=0)
