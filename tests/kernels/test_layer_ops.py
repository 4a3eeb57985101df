"""The native residual add + RMSNorm and rotary calls against their torch references, over
row counts, widths, head layouts (q and k as column views of one fused output) and dtypes."""

import pytest
import torch

from loraquilt.kernels import layer_ops

needs_native = pytest.mark.skipif(not layer_ops.available(), reason="native layer ops not built on this CPU")
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows, hidden", [(1, 64), (7, 576), (33, 100), (133, 2048), (300, 576)])
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "norm_only"])
def test_add_rms_norm_matches_reference(dtype, rows, hidden, with_delta):
    gen = torch.Generator().manual_seed(rows * hidden)
    residual = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    delta = torch.randn(rows, hidden, generator=gen).to(dtype) if with_delta else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    expected_residual = residual.clone()
    expected = layer_ops.add_rms_norm_reference(expected_residual, delta, weight, 1e-5)
    got = layer_ops.add_rms_norm(residual, delta, weight, 1e-5)
    assert got.dtype == dtype and got.shape == (rows, hidden)
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0)  # the add rounds the same way
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows, heads, kv_heads, head_dim", [(1, 9, 3, 64), (24, 4, 4, 32), (130, 32, 8, 128),
                                                             (5, 2, 1, 6)])
def test_rotary_in_place_on_fused_columns_matches_reference(dtype, rows, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(rows + heads)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)  # one fused output
    q = qkv[:, : heads * head_dim].view(rows, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    angles = torch.rand(rows, head_dim // 2, generator=gen) * 50
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype)  # [T, D]
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(dtype)
    expected_q, expected_k = layer_ops.rotary_reference(q, cos, sin), layer_ops.rotary_reference(k, cos, sin)
    got_q, got_k = layer_ops.rotary(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr()  # in place on the fused output
    torch.testing.assert_close(got_q.float(), expected_q.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(got_k.float(), expected_k.float(), **TOLERANCE[dtype])
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # v untouched


def test_torch_path_for_other_dtypes_and_layouts():
    x = torch.randn(3, 8, dtype=torch.float16)
    w = torch.ones(8, dtype=torch.float16)
    out = layer_ops.add_rms_norm(x.clone(), None, w, 1e-6)
    torch.testing.assert_close(out, layer_ops.add_rms_norm_reference(x.clone(), None, w, 1e-6))
    q = torch.randn(2, 3, 8).transpose(0, 1)  # heads not side by side in rows: reference path, new tensors
    k = torch.randn(3, 1, 8)
    cos, sin = torch.ones(3, 8), torch.zeros(3, 8)
    got_q, got_k = layer_ops.rotary(q, k, cos, sin)
    torch.testing.assert_close(got_q, q)  # cos 1, sin 0: identity
    torch.testing.assert_close(got_k, k)
