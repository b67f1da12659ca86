// Torch binding of the self-indexing kernels: checks shapes, devices, dtypes and alignment, then calls the launchers
// of selfindex.cu on the current stream. Outputs are written in place into the caller's buffers.
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <utility>

#include "selfindex.h"

namespace {

using at::Tensor;
using Opt = std::optional<Tensor>;

si::DType dtype_of(const Tensor& t) {
  if (t.scalar_type() == at::kHalf) return si::DType::F16;
  if (t.scalar_type() == at::kBFloat16) return si::DType::BF16;
  TORCH_CHECK(false, "selfindex kernels take fp16 or bf16 keys/values, got ", t.scalar_type(),
              "; use selfindex:impl=torch for other dtypes");
}

void check(const Tensor& t, const char* name, at::ScalarType st, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == st, name, " must be ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_rows(const Tensor& t, const char* name, int64_t dim) {  // strided activations: last dim contiguous
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, " must have a contiguous last dimension");
  for (int64_t i = 0; i < dim - 1; ++i) TORCH_CHECK(t.size(i) == 1 || t.stride(i) % 4 == 0, name, ": strides must be multiples of 4");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 8 == 0, name, " must be 8-byte aligned");
}

// The 2-bit buffers kmag, vq [B, H, cap, D/4] bytes and kscale, vscale [B, H, cap, D/32, 2] fp16: views of one
// buffer of rows (kernels/selfindex.py: q2_buffers), the same token stride in bytes for all four, returned.
int64_t q2_row(const Tensor& kmag, const Tensor& kscale, const Tensor& vq, const Tensor& vscale, int64_t B, int64_t H,
               int64_t cap, int64_t D) {
  const std::pair<const Tensor*, const char*> all[] = {{&kmag, "kmag"}, {&kscale, "kscale"}, {&vq, "vq"}, {&vscale, "vscale"}};
  const int64_t row = kmag.stride(2);
  for (const auto& [t, name] : all) {
    const bool codes = t == &kmag || t == &vq;  // bytes of 2-bit codes; the others (scale, zero) fp16 pairs
    TORCH_CHECK(t->is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t->scalar_type() == (codes ? at::kByte : at::kHalf), name, ": wrong dtype ", t->scalar_type());
    TORCH_CHECK(t->dim() == (codes ? 4 : 5) && t->size(0) == B && t->size(1) == H && t->size(2) == cap &&
                    t->size(3) == (codes ? D / 4 : D / 32) && (codes || t->size(4) == 2),
                name, ": must be [B, H, cap, ", codes ? "D/4]" : "D/32, 2]", " for the signs' [B, H, cap]");
    const int64_t e = t->element_size();
    TORCH_CHECK(t->stride(-1) == 1 && (codes || t->stride(3) == 2), name, ": the last dimensions must be contiguous");
    TORCH_CHECK(t->stride(2) * e == row && t->stride(1) * e == cap * row && t->stride(0) * e == H * cap * row, name,
                ": not a view of the interleaved rows (kernels/selfindex.py: q2_buffers)");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % (codes ? 16 : 8) == 0, name, ": misaligned");
  }
  TORCH_CHECK(row % 16 == 0, "2-bit rows must be a multiple of 16 bytes, got ", row);
  return row;
}

template <typename P>
P* ptr(const Opt& t) {
  return t.has_value() ? static_cast<P*>(t->data_ptr()) : nullptr;
}

void ok(cudaError_t e, const char* what) { TORCH_CHECK(e == cudaSuccess, "selfindex ", what, ": ", cudaGetErrorString(e)); }

}  // namespace

// k, v [B, H, T, D] -> signs (all tokens), 2-bit storage for positions [qlo, qhi), codebook sums when cb_sum is set
void pack(Tensor k, Tensor v, Tensor mu, Opt inv_chmax, Tensor signs, Opt kmag, Opt kscale, Opt vq, Opt vscale,
          Opt cb_sum, Opt cb_cnt, Opt cb_abs, int64_t pos0, int64_t qlo, int64_t qhi) {
  check_rows(k, "k", 4);
  check_rows(v, "v", 4);
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  TORCH_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(), "v must match k");
  check(mu, "mu", at::kFloat, 3);
  check(signs, "signs", at::kByte, 4);
  const int64_t cap = signs.size(2);
  TORCH_CHECK(signs.size(0) == B && signs.size(1) == H && signs.size(3) == D / 8, "signs must be [B, H, cap, D/8]");
  TORCH_CHECK(pos0 >= 0 && pos0 + T <= cap, "positions out of the buffer");
  int64_t row = 0;
  if (inv_chmax) {
    check(*inv_chmax, "inv_chmax", at::kFloat, 3);
    TORCH_CHECK(kmag && kscale && vq && vscale, "2+1 packing needs kmag, kscale, vq and vscale");
    row = q2_row(*kmag, *kscale, *vq, *vscale, B, H, cap, D);
  }
  if (cb_sum) {
    check(*cb_sum, "cb_sum", at::kFloat, 5);
    TORCH_CHECK(cb_cnt && cb_abs, "codebook accumulation needs cb_cnt and cb_abs");
    check(*cb_cnt, "cb_cnt", at::kInt, 4);
    check(*cb_abs, "cb_abs", at::kFloat, 3);
  }
  si::PackParams p{};
  p.k = k.data_ptr(); p.v = v.data_ptr();
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_st = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_st = v.stride(2);
  p.mu = mu.data_ptr<float>(); p.inv_chmax = ptr<const float>(inv_chmax);
  p.signs = signs.data_ptr<uint8_t>(); p.kmag = ptr<uint8_t>(kmag); p.kscale = ptr<void>(kscale);
  p.vq = ptr<uint8_t>(vq); p.vscale = ptr<void>(vscale);
  p.cb_sum = ptr<float>(cb_sum); p.cb_cnt = ptr<int>(cb_cnt); p.cb_abs = ptr<float>(cb_abs);
  p.B = B; p.H = H; p.n_tok = T; p.cap = cap; p.pos0 = pos0; p.qlo = qlo; p.qhi = qhi; p.row = row;
  ok(si::pack(p, dtype_of(k), D, at::cuda::getCurrentCUDAStream()), "pack");
}

// one decode step: k1, v1 [B, H, D] at position pos; the token at old_pos leaves full-precision slot `slot`
// plan: a device step plan (selfindex.h) that gives pos, slot and old_pos instead (the host values are then unused)
void append(Tensor k1, Tensor v1, Tensor mu, Opt inv_chmax, Tensor signs, Opt kmag, Opt kscale, Opt vq, Opt vscale,
            Opt kfull, Opt vfull, Tensor fk, Tensor fv, Tensor fpos, int64_t pos, int64_t slot, int64_t old_pos,
            Opt plan) {
  check_rows(k1, "k1", 3);
  check_rows(v1, "v1", 3);
  const int64_t B = k1.size(0), H = k1.size(1), D = k1.size(2);
  check(signs, "signs", at::kByte, 4);
  check(fk, "fk", k1.scalar_type(), 4);
  check(fv, "fv", k1.scalar_type(), 4);
  check(fpos, "fpos", at::kLong, 3);
  const int64_t cap = signs.size(2), F = fk.size(2);
  if (plan) {
    check(*plan, "plan", at::kInt, 1);
    TORCH_CHECK(plan->numel() >= si::kPlan, "plan must hold ", si::kPlan, " int32");
  } else {
    TORCH_CHECK(pos >= 0 && pos < cap && slot >= 0 && slot < F && old_pos < cap, "append: position out of range");
  }
  if (kfull) {
    check(*kfull, "kfull", k1.scalar_type(), 4);
    check(*vfull, "vfull", k1.scalar_type(), 4);
  }
  int64_t row = 0;
  if (inv_chmax) {
    TORCH_CHECK(kmag && kscale && vq && vscale, "2+1 append needs the 2-bit buffers");
    row = q2_row(*kmag, *kscale, *vq, *vscale, B, H, cap, D);
  }
  si::AppendParams p{};
  p.k1 = k1.data_ptr(); p.v1 = v1.data_ptr();
  p.k_sb = k1.stride(0); p.k_sh = k1.stride(1); p.v_sb = v1.stride(0); p.v_sh = v1.stride(1);
  p.mu = mu.data_ptr<float>(); p.inv_chmax = ptr<const float>(inv_chmax);
  p.signs = signs.data_ptr<uint8_t>(); p.kmag = ptr<uint8_t>(kmag); p.kscale = ptr<void>(kscale);
  p.vq = ptr<uint8_t>(vq); p.vscale = ptr<void>(vscale);
  p.kfull = ptr<void>(kfull); p.vfull = ptr<void>(vfull);
  p.fk = fk.data_ptr(); p.fv = fv.data_ptr(); p.fpos = fpos.data_ptr<int64_t>();
  p.B = B; p.H = H; p.F = F; p.cap = cap; p.pos = pos; p.slot = slot; p.old_pos = old_pos; p.row = row;
  p.plan = ptr<const int>(plan);
  ok(si::append(p, dtype_of(k1), D, at::cuda::getCurrentCUDAStream()), "append");
}

si::SelectParams select_params(const Tensor& q, const Tensor& cb, const Tensor& signs, const Opt& excl, int64_t lo,
                               int64_t hi, int64_t k, const Tensor& ctr, const Tensor& idx) {
  check_rows(q, "q", 3);
  check(cb, "cb", at::kFloat, 5);
  check(signs, "signs", at::kByte, 4);
  check(idx, "idx", at::kInt, 3);
  const int64_t B = signs.size(0), H = signs.size(1), cap = signs.size(2);
  TORCH_CHECK(q.size(0) == B && q.size(1) % H == 0, "q must be [B, Hq, D] with Hq a multiple of the KV heads");
  TORCH_CHECK(ctr.scalar_type() == at::kInt && ctr.numel() >= B * H * si::kCounters, "counter workspace too small");
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= cap && k <= idx.size(2) && k <= hi - lo, "selection: bad range");
  TORCH_CHECK(hi < (1 << 21), "contexts up to 2M tokens are supported");
  si::SelectParams p{};
  p.q = q.data_ptr(); p.q_sb = q.stride(0); p.q_sh = q.stride(1);
  p.cb = cb.data_ptr<float>(); p.signs = signs.data_ptr<uint8_t>();
  p.excl = excl ? excl->data_ptr<uint8_t>() : nullptr; p.excl_stride = excl ? excl->size(2) : 0;
  p.B = B; p.H = H; p.group = q.size(1) / H; p.cap = cap; p.lo = lo; p.hi = hi; p.k = k;
  p.ctr = ctr.data_ptr<int>(); p.idx = idx.data_ptr<int>(); p.kmax = idx.size(2);
  return p;
}

// scoring: q [B, Hq, D] scores positions [lo, hi) and writes the k selected positions to idx[:, :, :k]; with a device
// step plan, hi and k come from it and the arguments are their largest values (they size the grid); launches 1: one
// kernel where the grid fits in one wave (else, and with 3, score, count and place kernels)
void score_select(Tensor q, Tensor cb, Tensor signs, Opt excl, int64_t lo, int64_t hi, int64_t k, Tensor bins,
                  Tensor hist, Tensor ctr, Tensor idx, int64_t nblocks, Tensor counts, Opt plan, int64_t launches) {
  si::SelectParams p = select_params(q, cb, signs, excl, lo, hi, k, ctr, idx);
  TORCH_CHECK(counts.scalar_type() == at::kInt && counts.numel() >= p.B * p.H * si::kMaxChunks * 2,
              "counts workspace too small");
  p.counts = counts.data_ptr<int>();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p.counts) % 8 == 0 && reinterpret_cast<uintptr_t>(p.ctr) % 8 == 0,
              "counts and ctr must be 8-byte aligned");
  TORCH_CHECK(launches == 1 || launches == 3, "launches must be 1 or 3");
  p.launches = static_cast<int>(launches);
  if (plan) {
    check(*plan, "plan", at::kInt, 1);
    TORCH_CHECK(plan->numel() >= si::kPlan, "plan must hold ", si::kPlan, " int32");
  }
  p.plan = ptr<const int>(plan);
  const int64_t bstride = (p.cap + 7) / 8 * 8;
  TORCH_CHECK(bins.scalar_type() == at::kShort && bins.numel() >= p.B * p.H * bstride, "bins workspace too small");
  TORCH_CHECK(hist.scalar_type() == at::kInt && hist.numel() >= p.B * p.H * si::kNBins, "hist workspace too small");
  p.bins = reinterpret_cast<uint16_t*>(bins.data_ptr()); p.bstride = static_cast<int>(bstride);
  p.hist = hist.data_ptr<int>();
  ok(si::score_select(p, dtype_of(q), q.size(2), static_cast<int>(nblocks), at::cuda::getCurrentCUDAStream()),
     "score_select");
}

// sparse decode attention of 2+1 storage: q [B, Hq, D] over the full-precision set fk/fv/fpos and the positions
// idx[:, :, :n_sel] (n_sel from nsel on the device when given), split-KV into n_parts parts of `split` tokens (part 0:
// the full-precision set); out [B, Hq, D] in q's dtype; mode 1 stages the rows through shared memory (cp.async)
void attend(Tensor q, Tensor fk, Tensor fv, Tensor fpos, Tensor idx, Tensor signs, Tensor kmag, Tensor kscale,
            Tensor vq, Tensor vscale, Tensor chmax, Tensor mu, Tensor part_o, Tensor part_lse, Tensor out, Tensor ctr,
            Opt nsel, int64_t n_sel, int64_t split, int64_t n_parts, int64_t mode) {
  check_rows(q, "q", 3);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  check(fk, "fk", q.scalar_type(), 4);
  check(fv, "fv", q.scalar_type(), 4);
  check(fpos, "fpos", at::kLong, 3);
  check(idx, "idx", at::kInt, 3);
  check(signs, "signs", at::kByte, 4);
  check(chmax, "chmax", at::kFloat, 3);
  check(mu, "mu", at::kFloat, 3);
  check(out, "out", q.scalar_type(), 3);
  const int64_t H = fk.size(1), F = fk.size(2), cap = signs.size(2);
  TORCH_CHECK(fk.size(0) == B && fk.size(3) == D && Hq % H == 0, "fk must be [B, Hkv, F, D] for q [B, Hq, D]");
  TORCH_CHECK(F >= 1, "the full-precision set needs a slot");
  TORCH_CHECK(idx.size(0) == B && idx.size(1) == H && n_sel <= idx.size(2), "idx must be [B, Hkv, >= n_sel]");
  const int64_t row = q2_row(kmag, kscale, vq, vscale, B, H, cap, D);
  TORCH_CHECK(out.size(0) == B && out.size(1) == Hq && out.size(2) == D, "out must be [B, Hq, D]");
  TORCH_CHECK(n_parts >= 1 && split >= 1 && (n_parts - 1) * split >= (nsel ? idx.size(2) : n_sel),
              "the parts must cover the selection");
  TORCH_CHECK(part_o.scalar_type() == at::kFloat && part_o.numel() >= B * Hq * n_parts * D, "part_o too small");
  TORCH_CHECK(part_lse.scalar_type() == at::kFloat && part_lse.numel() >= B * Hq * n_parts, "part_lse too small");
  TORCH_CHECK(ctr.scalar_type() == at::kInt && ctr.numel() >= (B * H - 1) * si::kCounters + 1, "ctr too small");
  if (nsel) TORCH_CHECK(nsel->is_cuda() && nsel->scalar_type() == at::kInt && nsel->numel() >= 1, "nsel: int32");
  si::AttendParams p{};
  p.q = q.data_ptr(); p.q_sb = q.stride(0); p.q_sh = q.stride(1);
  p.fk = fk.data_ptr(); p.fv = fv.data_ptr(); p.fpos = fpos.data_ptr<int64_t>();
  p.idx = idx.data_ptr<int>(); p.kmax = idx.size(2);
  p.signs = signs.data_ptr<uint8_t>(); p.kmag = kmag.data_ptr<uint8_t>(); p.kscale = kscale.data_ptr();
  p.vq = vq.data_ptr<uint8_t>(); p.vscale = vscale.data_ptr();
  p.chmax = chmax.data_ptr<float>(); p.mu = mu.data_ptr<float>();
  p.part_o = part_o.data_ptr<float>(); p.part_lse = part_lse.data_ptr<float>();
  p.out = out.data_ptr(); p.ctr = ctr.data_ptr<int>(); p.nsel = ptr<const int>(nsel);
  p.B = B; p.H = H; p.group = Hq / H; p.F = F; p.cap = cap; p.n_sel = n_sel; p.split = split; p.n_parts = n_parts;
  p.qk_scale = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(D)));
  p.mode = static_cast<int>(mode);
  p.row = row;
  ok(si::attend(p, dtype_of(q), D, at::cuda::getCurrentCUDAStream()), "attend");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "sparse decode attention over 2+1 storage");
  m.def("pack", &pack, "centre, signs, 2-bit storage and codebook sums of a chunk");
  m.def("append", &append, "one decode step's append and window slide");
  m.def("score_select", &score_select, "LUT scoring and histogram top-k");
}
