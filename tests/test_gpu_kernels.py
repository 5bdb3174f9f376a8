"""GPU-only checks of the Triton kernels at sizes the interpreter cannot reach (skipped without CUDA).

The interpreter computes offsets in 64-bit numpy, so 32-bit offset overflow only shows on a GPU:
an all-heads attention map of 40 heads x 30k queries x 2448 patches has 3e9 elements.
"""
from __future__ import annotations

import pytest
import torch

from workbench.kernels import moe_experts
from workbench.kernels.attention_map import cross_attention_probs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@cuda
def test_attention_all_heads_output_beyond_2_pow_31_elements():
    T, Hq, Hkv, D = 32768, 40, 8, 128
    dev = "cuda"
    patch = torch.zeros(T, dtype=torch.bool)
    patch[17:17 + 17 * 144] = True
    qi = ((~patch) & (torch.arange(T) > 17)).nonzero()[:, 0].to(dev)
    pi = patch.nonzero()[:, 0].to(dev)
    assert Hq * qi.numel() * pi.numel() > 2 ** 31
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(Hq, T, D, device=dev, generator=g, dtype=torch.bfloat16)
    k = torch.randn(Hkv, T, D, device=dev, generator=g, dtype=torch.bfloat16)
    out = torch.full((Hq, qi.numel(), pi.numel()), float("nan"), device=dev, dtype=torch.float16)
    cross_attention_probs(q, k, D ** -0.5, query_index=qi, key_index=pi, chunk_size=8192, heads="all",
                          out=out, backend="triton", check_indices=False)
    # the last head's last rows sit past 2^31 elements: compare with the torch backend there
    tail = slice(qi.numel() - 256, qi.numel())
    ref = cross_attention_probs(q.float(), k.float(), D ** -0.5, query_index=qi[tail], key_index=pi,
                                chunk_size=8192, heads=[Hq - 1], backend="torch", check_indices=False)
    assert not torch.isnan(out[-1]).any()
    torch.testing.assert_close(out[-1, tail].float(), ref[0], atol=2e-3, rtol=2e-2)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_moe_default_tiles_fit_every_dtype(dtype):
    # tiles chosen for bf16 must still launch for float32 (shared memory is fitted at launch)
    T, H, I, E = 300, 512, 256, 16
    x = torch.randn(T, H, device="cuda").to(dtype)
    gu = (torch.randn(E, H, 2 * I, device="cuda") / H ** 0.5).to(dtype)
    dp = (torch.randn(E, I, H, device="cuda") / I ** 0.5).to(dtype)
    ids = torch.randint(0, E, (T, 1), device="cuda")
    w = torch.rand(T, 1, device="cuda") + 0.25
    y = moe_experts(x, ids, w, gu, dp, backend="triton")
    ref = torch.zeros(T, H, dtype=torch.float64, device="cuda")  # float64, per expert
    for e in ids.unique().tolist():
        rows = (ids[:, 0] == e).nonzero()[:, 0]
        z = (x[rows] * w[rows].to(dtype)).double()
        g, u = (z @ gu[e].double()).chunk(2, dim=-1)
        ref[rows] = (torch.nn.functional.silu(g) * u) @ dp[e].double()
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}[dtype]
