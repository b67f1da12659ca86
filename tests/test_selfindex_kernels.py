"""The self-indexing CUDA kernels against their PyTorch references (kernels/selfindex.py), on random shapes: odd
lengths, batch > 1, GQA 1/4/8, head_dim 64/128, bf16 and fp16, both storage settings. GPU only."""

import pytest
import torch

from kvbench import LayerSpec, parse_method
from kvbench.kernels import selfindex as ops
import oracles
from oracles import naive_attention

pytestmark = pytest.mark.gpu

SHAPES = [  # B, Hq, Hkv, D, T
    (1, 8, 8, 64, 333),
    (3, 8, 2, 64, 1000),
    (2, 32, 8, 128, 4097),
    (1, 16, 2, 128, 2049),
    (4, 4, 1, 128, 777),
]
DTYPES = [torch.bfloat16, torch.float16]


def rand_kv(B, H, T, D, dtype):
    return oracles.rand_kv(B, H, T, D, dtype, "cuda")


def layer(spec, B, Hq, Hkv, D, dtype, impl):
    return parse_method(f"{spec},impl={impl}").make_layer(LayerSpec(0, 1, Hq, Hkv, D, dtype, torch.device("cuda")))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_matches_reference(shape, dtype):
    torch.manual_seed(0)
    B, Hq, H, D, T = shape
    k, v = rand_kv(B, H, T, D, dtype)
    mu = ops.centre_stats(k, "median")
    chmax = (k.float() - mu[:, :, None]).abs().amax(2).clamp(min=1e-6)
    inv = 1.0 / chmax
    G = D // 4
    signs = torch.zeros(B, H, T, D // 8, dtype=torch.uint8, device="cuda")
    q2 = ops.q2_buffers(torch.zeros(B, H, T, 3 * D // 4, dtype=torch.uint8, device="cuda"))
    kmag, vq, kscale, vscale = q2["kmag"], q2["vq"], q2["kscale"], q2["vscale"]
    sums = torch.zeros(B, H, G, 16, 4, device="cuda")
    counts = torch.zeros(B, H, G, 16, dtype=torch.int32, device="cuda")
    abs_sum = torch.zeros(B, H, G, device="cuda")
    lo, hi = 5, T - 7  # a quantized range that is not the whole chunk
    ops.cuda_ops().pack(k, v, mu, inv, signs, kmag, kscale, vq, vscale, sums, counts, abs_sum, 0, lo, hi)
    ref_signs, (rk, rks, rv, rvs) = ops.pack_ref(k, v, mu, inv)
    assert torch.equal(signs, ref_signs)
    for got, want in ((kmag, rk), (vq, rv)):
        mismatch = (ops.unpack2(got[:, :, lo:hi]) != ops.unpack2(want[:, :, lo:hi])).float().mean().item()
        assert mismatch < 1e-4, mismatch  # rounding ties at .5 may fall either way, nothing more
    torch.testing.assert_close(kscale[:, :, lo:hi], rks[:, :, lo:hi], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(vscale[:, :, lo:hi], rvs[:, :, lo:hi], rtol=1e-3, atol=1e-3)
    cb = ops.finish_codebook(sums, counts, abs_sum, T)
    torch.testing.assert_close(cb, ops.codebook_ref(k, mu, ref_signs), rtol=1e-4, atol=1e-4)


def valid_topk(selected, bins_ref, K, slack=1):
    """selected [K] positions are a top-K of bins_ref up to `slack` bins (LUT rounding ties may flip one bin)."""
    sel = selected.tolist()
    assert len(sel) == K and len(set(sel)) == K
    bins_ref = torch.where(bins_ref == ops.EXCLUDED, torch.full_like(bins_ref, -1), bins_ref)
    kth = bins_ref.float().topk(K).values[-1].item()
    got = bins_ref[selected.long()]
    assert got.min().item() >= kth - slack
    must = (bins_ref > kth + slack).nonzero().flatten().tolist()
    assert set(must) <= set(sel)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setting", ["2+1", "16+1"])
@pytest.mark.parametrize("fixed", ["sinks", "scored"])
def test_decode_steps_match_reference(shape, dtype, setting, fixed):
    torch.manual_seed(1)
    B, Hq, H, D, T = shape
    spec = f"selfindex:setting={setting},budget=0.1,fixed={fixed},sinks=16,window=16"
    fast, ref = (layer(spec, B, Hq, H, D, dtype, impl) for impl in ("auto", "torch"))
    k, v = rand_kv(B, H, T, D, dtype)
    q = torch.randn(B, Hq, 3, D, device="cuda", dtype=dtype)
    torch.testing.assert_close(fast.prefill(q, k, v), ref.prefill(q, k, v))
    assert torch.equal(fast.kv.signs, ref.kv.signs) and torch.equal(fast.kv.fpos, ref.kv.fpos)
    for step in range(40):  # past the window, so tokens leave it and get quantized by the append kernel
        q1 = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
        k1, v1 = rand_kv(B, H, 1, D, dtype)
        fast._append(k1[:, :, 0], v1[:, :, 0])
        ref._append(k1[:, :, 0], v1[:, :, 0])
        assert torch.equal(fast.kv.signs[:, :, : fast.kv.n], ref.kv.signs[:, :, : ref.kv.n])
        assert torch.equal(fast.kv.fk, ref.kv.fk) and torch.equal(fast.kv.fpos, ref.kv.fpos)
        if setting == "2+1":
            lo, hi = fast.selectable()
            assert (fast.kv.kmag[:, :, lo:hi] != ref.kv.kmag[:, :, lo:hi]).float().mean().item() < 1e-3
        # selection: a valid top-K of the reference's bins (ties and 1-bin LUT rounding flips aside)
        idx = fast._select(q1[:, :, 0])
        lo, hi = ref.selectable()
        K = ref.n_select()
        qm = q1[:, :, 0].float().reshape(B, H, Hq // H, D).mean(2)
        excluded = ops.unpack_bits(ref.kv.excl)[:, :, lo:hi] if ref.kv.excl is not None else None
        bins = ops.score_bins_ref(ops.lut8_ref(qm, ref.kv.cb), ref.kv.signs[:, :, lo:hi], excluded)
        for b in range(B):
            for h in range(H):
                valid_topk(idx[b, h] - lo, bins[b, h], K)
        # attention over the same selection: the kernel against the reference
        out_fast = fast._attend(q1[:, :, 0], idx)
        out_ref = ref._attend(q1[:, :, 0], idx.long())
        torch.testing.assert_close(out_fast.float(), out_ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_budget_16_1_on_cuda_matches_dense_attention(shape, dtype):
    torch.manual_seed(2)
    B, Hq, H, D, T = shape
    lay = layer("selfindex:setting=16+1,budget=1000000", B, Hq, H, D, dtype, "auto")
    k, v = rand_kv(B, H, T, D, dtype)
    lay.prefill(torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype), k, v)
    ks, vs = [k], [v]
    for _ in range(5):
        q1 = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
        k1, v1 = rand_kv(B, H, 1, D, dtype)
        ks.append(k1), vs.append(v1)
        out = lay.extend(q1, k1, v1)
        ref = naive_attention(q1.cpu(), torch.cat(ks, 2).cpu(), torch.cat(vs, 2).cpu())
        torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2)


def test_long_context_many_splits_and_large_budget():
    """128 K-scale selection (thousands of picks, hundreds of attention splits) stays right."""
    torch.manual_seed(3)
    B, Hq, H, D, T = 2, 32, 8, 128, 40000
    fast, ref = (layer("selfindex:budget=0.075", B, Hq, H, D, torch.bfloat16, impl) for impl in ("auto", "torch"))
    k, v = rand_kv(B, H, T, D, torch.bfloat16)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    fast.prefill(q, k, v)
    ref.prefill(q, k, v)
    q1 = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    k1, v1 = rand_kv(B, H, 1, D, torch.bfloat16)
    fast._append(k1[:, :, 0], v1[:, :, 0])
    ref._append(k1[:, :, 0], v1[:, :, 0])
    idx = fast._select(q1[:, :, 0])
    assert idx.shape[-1] == ref.n_select() > 2000
    torch.testing.assert_close(fast._attend(q1[:, :, 0], idx).float(), ref._attend(q1[:, :, 0], idx.long()).float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", SHAPES + [(2, 32, 8, 128, 40000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setting", ["2+1", "16+1"])
@pytest.mark.parametrize("fixed", ["sinks", "scored"])
def test_small_budget_decode_matches_reference(shape, dtype, setting, fixed):
    """Decode steps at the paper's 160-token budget (96 picks: one attention part per head) against the reference."""
    torch.manual_seed(4)
    B, Hq, H, D, T = shape
    spec = f"selfindex:setting={setting},budget=160,fixed={fixed}"
    fast, ref = (layer(spec, B, Hq, H, D, dtype, impl) for impl in ("auto", "torch"))
    k, v = rand_kv(B, H, T, D, dtype)
    q = torch.randn(B, Hq, 2, D, device="cuda", dtype=dtype)
    fast.prefill(q, k, v)
    ref.prefill(q, k, v)
    for step in range(3):
        q1 = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
        k1, v1 = rand_kv(B, H, 1, D, dtype)
        out = fast.extend(q1, k1, v1)[:, :, 0]
        ref._append(k1[:, :, 0], v1[:, :, 0])
        K = ref.n_select()
        assert 0 < K <= 256 and fast.last_idx.shape[-1] == K
        lo, hi = ref.selectable()
        qm = q1[:, :, 0].float().reshape(B, H, Hq // H, D).mean(2)
        excluded = ops.unpack_bits(ref.kv.excl)[:, :, lo:hi] if ref.kv.excl is not None else None
        bins = ops.score_bins_ref(ops.lut8_ref(qm, ref.kv.cb), ref.kv.signs[:, :, lo:hi], excluded)
        for b in range(B):
            for h in range(H):
                valid_topk(fast.last_idx[b, h] - lo, bins[b, h], K)
        want = ref._attend(q1[:, :, 0], fast.last_idx.long())
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("setting", ["2+1", "16+1"])
@pytest.mark.parametrize("fixed", ["sinks", "scored"])
def test_selection_is_deterministic_and_planned_steps_equal_eager_ones(setting, fixed):
    """The select kernels give the same list every time (above-threshold tokens, then the threshold bin's lowest
    positions, each in position order), and a reserved (planned) step selects exactly what an eager step does, its
    attention within rounding (the planned one's grid is sized for the largest step)."""
    torch.manual_seed(7)
    B, Hq, H, D, T = 2, 16, 4, 128, 3000
    spec = f"selfindex:budget=0.1,setting={setting},fixed={fixed}"
    eager, planned = (layer(spec, B, Hq, H, D, torch.bfloat16, "auto") for _ in range(2))
    k, v = rand_kv(B, H, T, D, torch.bfloat16)
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16)
    eager.prefill(q, k, v), planned.prefill(q, k, v)
    q1 = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    first = eager._select(q1)
    assert torch.equal(first, eager._select(q1)) and torch.equal(first, eager._select(q1))
    descents = (first[..., 1:] < first[..., :-1]).sum(-1)
    assert (descents <= 1).all()  # two runs in position order: above the threshold bin, then from it
    planned.reserve(40)
    assert planned.kv.pinned
    for _ in range(40):
        q1 = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
        k1, v1 = rand_kv(B, H, 1, D, torch.bfloat16)
        want, got = eager.extend(q1, k1, v1), planned.extend(q1, k1, v1)
        assert planned.seq_len() == eager.seq_len()
        assert torch.equal(planned.last_idx, eager.last_idx)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    n = eager.kv.n
    assert torch.equal(planned.kv.signs[:, :, :n], eager.kv.signs[:, :, :n]) and torch.equal(planned.kv.fk, eager.kv.fk)


ATTEND_PATHS = {  # selfindex_attend's module switches: the CUDA kernel, the Triton kernel, Triton with PTX unpacking
    "cuda": dict(USE_CUDA=True, CUDA_ASYNC=True), "cuda-registers": dict(USE_CUDA=True, CUDA_ASYNC=False),
    "triton": dict(USE_CUDA=False, FAST_DEQUANT=False),
    "triton-ptx": dict(USE_CUDA=False, FAST_DEQUANT=True)}


# the PTX path was written and compiled (sm_90) without a GPU run of this test: opt-in until it has passed (the CUDA
# paths passed on an H200)
NOT_YET_ON_A_GPU = pytest.mark.xfail(reason="not yet run on a GPU (opt-in: KVBENCH_SELFINDEX_ATTEND)", strict=False)


@pytest.mark.parametrize("shape", SHAPES + [(2, 8, 1, 128, 3001), (1, 32, 8, 64, 1500)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", [pytest.param(p, marks=NOT_YET_ON_A_GPU) if p == "triton-ptx" else p
                                  for p in ATTEND_PATHS])
def test_attend_paths_match_reference(shape, dtype, path, monkeypatch):
    """Each implementation of the 2+1 sparse attention against the reference over the same selection: random
    selections of odd sizes (none, fewer than a tile, many parts), explicit splits, and the planned form (selection
    size read on the device, grid sized for a larger buffer)."""
    from kvbench.kernels import selfindex_attend

    for name, value in ATTEND_PATHS[path].items():
        monkeypatch.setattr(selfindex_attend, name, value)
    torch.manual_seed(5)
    B, Hq, H, D, T = shape
    fast, ref = (layer("selfindex:budget=0.3,sinks=8,window=8", B, Hq, H, D, dtype, impl) for impl in ("auto", "torch"))
    k, v = rand_kv(B, H, T, D, dtype)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
    fast.prefill(q, k, v), ref.prefill(q, k, v)
    for _ in range(9):  # past the window: the appended tokens leave it quantized
        k1, v1 = rand_kv(B, H, 1, D, dtype)
        q1 = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
        fast.extend(q1, k1, v1), ref.extend(q1, k1, v1)
    lo, hi = fast.selectable()
    q1 = torch.randn(B, Hq, D, device="cuda", dtype=dtype)
    for K in (0, 5, 77, min(hi - lo, 1234)):
        idx = torch.stack([torch.stack([torch.randperm(hi - lo, device="cuda")[:K] + lo for _ in range(H)])
                           for _ in range(B)]).int()
        want = ref._attend(q1, idx.long()).float()
        for split in (None, 64, 192):
            got = selfindex_attend.attend(q1, fast.kv, idx, split=split)
            torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
        # planned: K live of a larger buffer
        buf = torch.zeros(B, H, K + 100, dtype=torch.int32, device="cuda")
        buf[:, :, :K] = idx
        nsel = torch.tensor([K], dtype=torch.int32, device="cuda")
        out = torch.empty(B, Hq, D, dtype=dtype, device="cuda")
        got = selfindex_attend.attend(q1, fast.kv, buf, nsel=nsel, out=out)
        assert got is out
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", SHAPES + [(2, 32, 8, 128, 40000)])
@pytest.mark.parametrize("blocks", [0, 3, 64])
def test_select_paths_agree(shape, blocks, monkeypatch):
    """The one-launch select (select_kernel) and the three-kernel one pick the same list, at the launcher's grid and
    at forced ones (64 blocks a (b, h): capped to one wave on the one-launch path), twice in a row (its counters
    reset themselves)."""
    torch.manual_seed(8)
    B, Hq, H, D, T = shape
    lay = layer("selfindex:budget=0.1,fixed=scored", B, Hq, H, D, torch.bfloat16, "auto")
    k, v = rand_kv(B, H, T, D, torch.bfloat16)
    lay.prefill(torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16), k, v)
    q1 = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(ops, "SELECT_BLOCKS", blocks)
    got = {}
    for launches in (1, 3):
        monkeypatch.setattr(ops, "SELECT_LAUNCHES", launches)
        got[launches] = lay._select(q1)
        assert torch.equal(got[launches], lay._select(q1))
    assert torch.equal(got[1], got[3])
