"""llmkit's CPU kernels (llmkit/kernels/quant.c) against the definitions they implement.

The reference is written here from ggml's definitions, in float64: activations rounded per block of 32 as
ggml's `quantize_row_q8_1_ref` does (d = max|x| / 127, q = round(x / d)) — or, with fine=True, that plus a
second int8 part for the remainder, round((x - d q) * 128 / d) — times the dequantized weights. The kernel
must equal that (to float32 rounding), whatever the batch, group size or instruction set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmkit import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.why_not()}")


def q8_1_round(x: torch.Tensor, fine: bool = False) -> torch.Tensor:
    """x (M, K) -> the values the kernel keeps: per block of 32, d = amax / 127, q = round(x / d) (ggml's
    Q8_1); fine: plus l = round((x - d q) * 128 / d). float32 steps as quant.c takes them, float64 out."""
    b = x.float().reshape(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d, inv = amax / 127, torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv)
    out = q.double() * d.double()
    if fine:
        lo = torch.round((b - d * q) * inv * 128)
        out = (128 * q.double() + lo.double()) * (d / 128).double()
    return out.reshape(x.shape)


def int4_weight(n: int, k: int, gs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    s = torch.rand(k // gs, n, generator=g) * 0.02
    z = torch.randn(k // gs, n, generator=g) * 0.05
    sz = torch.stack([s, z], -1).bfloat16()  # (G, N, 2): Int4Linear's layout
    S, Z = sz.double().transpose(0, 1).unbind(-1)  # (N, G)
    w = ((q.double().view(n, k // gs, gs) - 8) * S[..., None] + Z[..., None]).view(n, k)
    return kernels.pack_q4(q), sz, w


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 40  # outlier channels, as in real hidden states
    x[:, k // 2 + 1] *= -25
    return x


@pytest.mark.parametrize("fine", [False, True])
@pytest.mark.parametrize("m,n,k,gs", [(1, 960, 576, 32), (1, 48, 96, 32), (3, 16, 224, 32), (5, 32, 160, 32),
                                      (9, 64, 1536, 32), (2, 48, 576, 64), (1, 32, 1536, 128)])
def test_int4_matmul_is_weights_times_rounded_activations(m, n, k, gs, fine):
    qw, sz, w = int4_weight(n, k, gs, seed=n + k)
    x = activations(m, k, seed=m)
    want = q8_1_round(x, fine) @ w.t()
    got = kernels.q4_mm(x, qw, sz, gs, fine=fine)
    assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()
    exact = x.double() @ w.t()  # and the rounding of the activations is what it costs, no more
    err = ((got.double() - exact).norm() / exact.norm()).item()
    assert (1e-3 < err < 3e-2) if not fine else (1e-6 < err < 1e-3)  # fine: ~100x smaller


@pytest.mark.parametrize("fine", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 64, 576), (4, 32, 96), (7, 16, 160)])
def test_int8_matmul_is_weights_times_rounded_activations(m, n, k, fine):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01
    x = activations(m, k, seed=k)
    want = q8_1_round(x, fine) @ (q.double() * s.double()[:, None]).t()
    got = kernels.q8_mm(x, q, s, fine=fine)
    assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()


@pytest.mark.parametrize("n,k,gs", [(96, 576, 32), (97, 160, 32), (42, 224, 32), (33, 1536, 128),
                                    (6, 192, 64), (45, 256, 32)])
def test_rows_give_the_same_bits_alone_or_batched(n, k, gs):
    """Every row is summed in one order whatever the batch: decode (1 row, 2 rows of W at a time) and
    prefill (4 rows of x at a time) agree to the bit. The shapes cover K with 0-3 blocks left
    after the 4-block steps, N not a multiple of 4, and 13 rows (3 steps of 4, then 1); decode's chunks of 8
    rows of W (K / 32 even) with 0, 1 and 5 rows after them."""
    qw, sz, _ = int4_weight(n, k, gs, seed=0)
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    s8 = torch.rand(n)
    x = activations(13, k, seed=2)
    for fine in (False, True):
        batch4, batch8 = kernels.q4_mm(x, qw, sz, gs, fine=fine), kernels.q8_mm(x, q8, s8, fine=fine)
        for i in range(13):
            assert torch.equal(kernels.q4_mm(x[i:i + 1], qw, sz, gs, fine=fine)[0], batch4[i])
            assert torch.equal(kernels.q8_mm(x[i:i + 1], q8, s8, fine=fine)[0], batch8[i])


@pytest.mark.parametrize("n,k,gs", [(96, 576, 32), (97, 160, 32), (42, 224, 32), (33, 1536, 128),
                                    (6, 192, 64), (3, 96, 32), (45, 256, 32)])
def test_scales_in_blocks_of_rows_give_the_same_bits(n, k, gs):
    """The decode-friendly layout of the (s, z) pairs (blocks of 4 rows; the last block 1-3 rows when N % 4
    != 0) reads the very pairs of the standard one: decode, prefill and the portable C build give the same
    bits with either. And the kernel reads the layout it is told: read as standard, other numbers."""
    qw, sz, _ = int4_weight(n, k, gs, seed=n)
    blocked = kernels.block_rows(sz)
    assert torch.equal(kernels.unblock_rows(blocked), sz)
    x = activations(13, k, seed=3)
    builds = [None] + ([kernels.build_variant(["-mno-avx2"])] if kernels.simd() == "avx2" else [])
    for lib in builds:
        for fine in (False, True):
            for rows in (x[:1], x):
                want = kernels._q4_eager(rows, qw, sz, gs, fine, lib=lib)
                got = kernels._q4_eager(rows, qw, blocked, gs, fine, lib=lib, rb=kernels.RB)
                assert torch.equal(got, want)
                if n > 4:
                    assert not torch.equal(kernels._q4_eager(rows, qw, blocked, gs, fine, lib=lib), want)


def test_avx512_build_gives_the_avx2_builds_bits():
    """The AVX-512 VNNI integers (vpdpbusd) and quantizer give the AVX2 kernel's lanes: both builds agree to
    the bit, so a result does not depend on which of the two a machine runs either."""
    if "avx512_vnni" not in kernels._cpu_flags().split():
        pytest.skip("this CPU has no AVX-512 VNNI: its build is the AVX2 one")
    avx2 = kernels.build_variant(["-mno-avx512f"])
    for n, k, gs in [(97, 576, 32), (42, 224, 32), (8, 160, 32), (33, 1536, 64)]:
        qw, sz, _ = int4_weight(n, k, gs, seed=n)
        x = activations(11, k, seed=k)
        for fine in (False, True):
            assert torch.equal(kernels.q4_mm(x, qw, sz, gs, fine=fine),
                               kernels._q4_eager(x, qw, sz, gs, fine, lib=avx2))
            assert torch.equal(kernels.q4_mm(x[:1], qw, sz, gs, fine=fine),
                               kernels._q4_eager(x[:1], qw, sz, gs, fine, lib=avx2))
            blocked = kernels.block_rows(sz)  # and the blocked layout reads as the AVX2 kernel reads it
            assert torch.equal(kernels.q4_mm(x, qw, blocked, gs, fine=fine, rb=kernels.RB),
                               kernels._q4_eager(x, qw, sz, gs, fine, lib=avx2))


def test_portable_c_build_agrees_with_the_simd_one():
    if kernels.simd() != "avx2":
        pytest.skip("this machine's build is already the portable one")
    port = kernels.build_variant(["-mno-avx2"])
    assert port.llmkit_simd() == 0
    for (m, n, k), fine in [((1, 64, 576), False), ((6, 32, 224), False), ((3, 32, 224), True)]:
        qw, sz, _ = int4_weight(n, k, 32, seed=k)
        x = activations(m, k, seed=n)
        a, b = kernels.q4_mm(x, qw, sz, fine=fine), kernels._q4_eager(x, qw, sz, 32, fine, lib=port)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s = torch.rand(n)
        a, b = kernels.q8_mm(x, q, s, fine=fine), kernels._q8_eager(x, q, s, fine, lib=port)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_pack_q4_round_trips_and_rejects_bad_shapes():
    for k in (64, 128, 160, 224, 576):  # no quad of blocks; one; then 1, 3 and 2 blocks after the quads
        q = torch.randint(0, 16, (8, k), dtype=torch.uint8)
        assert torch.equal(kernels.unpack_q4(kernels.pack_q4(q), 8, k), q)
    block = (torch.arange(128) // 32).to(torch.uint8).view(1, 128)  # a quad, each weight its block's number
    words = kernels.pack_q4(block).view(16, 4).tolist()  # every 4 adjacent bytes hold one block's weights
    assert words == [[17 * i] * 4 for _ in range(4) for i in range(4)]  # blocks 0 1 2 3 0 1 2 3 ...
    qw, sz, _ = int4_weight(16, 64, 32, seed=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.q4_mm(torch.randn(2, 48), qw[:, :24], sz)


def test_int4_linear_uses_the_kernel_eager_and_compiled():
    from llmkit.quant import Int4Linear, Int8Linear, int4_layout_name

    assert int4_layout_name() == "q4x"
    lin = torch.nn.Linear(96, 32, bias=True)
    x = torch.randn(2, 5, 96)
    for mod in (Int4Linear.from_linear(lin), Int8Linear.from_linear(lin)):
        with torch.inference_mode():
            eager = mod(x)
            compiled = torch.compile(mod, dynamic=False)(x)
            fine = kernels.ACTIVATIONS == "int16"
            xr = q8_1_round(x.view(-1, 96), fine).float()
            dense = torch.nn.functional.linear(xr, mod.dequantize(), lin.bias)
        assert torch.equal(eager, compiled)
        torch.testing.assert_close(eager.view(-1, 32), dense, atol=1e-5, rtol=1e-5)


def test_without_a_compiler_llmkit_falls_back_to_pytorchs_kernels(tmp_path):
    code = ("from llmkit import kernels; from llmkit.quant import int4_layout_name, Int4Linear\n"
            "import torch\n"
            "print(kernels.available(), '|', kernels.why_not(), '|', int4_layout_name())\n"
            "m = Int4Linear.from_linear(torch.nn.Linear(64, 32))\n"
            "print(tuple(m(torch.randn(3, 64)).shape))\n")
    env = {**os.environ, "LLMKIT_HOME": str(tmp_path), "PATH": str(tmp_path), "CC": ""}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    out = run.stdout
    first, shape = out.strip().splitlines()
    avail, why, layout = (p.strip() for p in first.split("|"))
    assert avail == "False" and "no C compiler" in why and layout != "q4x"
    assert shape == "(3, 32)"
