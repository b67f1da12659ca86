// KIVI decode attention over the packed tokens [0, Nv) of kernels/kivi_ref.py's layout (keys and values both packed),
// split-KV: block (part, b * H + h) attends tokens [part * split, +split) for the query heads of KV head h and writes
// their normalized output and log2-sum-exp2 in the layout of kernels/kivi.py's Triton split kernel, whose last part
// (the full-precision residual and the new token) and combine kernel finish the step.
//
// Why this shape (the Triton kernel it replaces spent ~7 instructions per element unpacking and went through shared
// memory to reach the tensor-core operand layout): the packed words are dequantized straight into mma.m16n8k16
// fragments, two fp16 elements per 32-bit register, with the dots transposed so the query heads are the mma's N (8):
//   S^T[tok][head] = K[tok][ch] . Q'^T[ch][head]     A = keys (16 tokens x 16 channels), B = the scaled query
//   O^T[ch][head] += V^T[ch][tok] . P^T[tok][head]   A = values (16 channels x 16 tokens), B = P (movmatrix.trans)
// so a GQA group of 4 wastes nothing of M and a 16-token tile takes D/16 + D/16 mma (not 3 D/16 with heads as M).
// - codes become fp16 by OR-ing them into the mantissa of 1024 (0x6400) and one packed subtract (exact: 1024 + c is
//   an fp16); a code at bit 2i of a byte gives 4^i c (16^i c at 4 bits), whose power of two is folded into a scale;
// - a key's per-channel (scale, min) of its 32-token group is folded into the query: q . k = (q * scale) . codes +
//   q . min, so a key element costs a LOP3 and an HSUB2; q . min per group and head is one mma per 16 groups in the
//   block's prologue, kept in shared memory; the k dimension of the QK mma is a permutation of the channels chosen so
//   each lane's two registers come from one word without shifts (the query fragment uses the same permutation);
// - a value's per-token (scale, min) is applied by one HFMA2 on (token, token + 1) pairs that a PRMT builds from
//   the bytes of two rows; each lane owns D/8 contiguous channels, so its rows are one 2- to 8-byte load per token;
// - the online softmax rescales only when a head's max grows by more than kLazy (2^8 fits fp16 P), as FlashAttention
//   4 does: most tiles skip the D/4 multiplies.
// Raw pointers only (no torch headers): nvcc builds it in seconds; kernels/kivi.py loads it with ctypes.
// tests/test_kivi_emulated.py runs this very source on the CPU (KVBENCH_EMU, tests/kivi_emu.h).
#ifdef KVBENCH_EMU
#include "kivi_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include <stdint.h>

namespace kivi {

// One call's arguments; kernels/kivi.py mirrors this struct field for field (ctypes).
struct Params {
  const void* q;                      // [B, Hq, D] rows at (q_sb, q_sh) element strides, last dim contiguous
  const void* kq;                     // int32 [B, H, Ck, W]: key codes
  const void* ks; const void* km;     // fp16 [B, H, Ck / G, D]: key scale and min
  const void* vq;                     // int32 [B, H, Cv, W]: value codes
  const void* vs; const void* vm;     // fp16 [B, H, Cv, D / G]: value scale and min
  float* part_o; float* part_lse;     // [B * Hq * n_parts, D], [B * Hq * n_parts]: row (b * Hq + head) * n_parts + part
  const int* len;                     // int32 [1]: tokens seen (a pinned cache), or null: n_tok
  int64_t q_sb, q_sh, s_kq, s_ks, s_vq, s_vs;  // strides; the last four per (b, h), in elements
  int B, H, group, n_tok, R, G, split, n_parts;  // n_parts: all parts, the Triton ring part (the last) included
  float qk_scale;                     // D^-0.5 * log2(e): scores in base 2
};

constexpr int kWarps = 4;
constexpr int kMaxGroup = 8;         // query heads per KV head: the mma's N
constexpr int kMaxBiasRows = 512;    // key groups per part at most (q . min in shared memory); kivi.py plans for it
constexpr float kLazy = 8.f;         // rescale when a max grows by more than this (base 2)
constexpr uint32_t kMagic = 0x64006400u;  // the fp16 pair (1024, 1024)
constexpr unsigned kFull = 0xffffffffu;

namespace {

__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

#ifndef KVBENCH_EMU
// d += A B, m16n8k16, fp16 inputs, fp32 accumulators (PTX ISA fragment layouts)
__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// the 8x8 fp16 matrix whose row lane/4, columns 2(lane%4) + {0, 1} this lane holds, transposed
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}
#endif

// fp16 pair of codes at bits [BITS i, BITS (i + 1)) of each 16-bit half of x: (1024 + 2^(BITS i) c) - 1024
template <int BITS>
__device__ __forceinline__ uint32_t codes2(uint32_t x, int i) {
  const uint32_t mask = ((1u << BITS) - 1u) << (BITS * i);
  return h2u(__hsub2(u2h((x & (mask | mask << 16)) | kMagic), u2h(kMagic)));
}

template <int BYTES>  // BYTES (2, 4, 8 or 16) bytes of a packed row, aligned to BYTES, as 32-bit words
__device__ __forceinline__ void load_row(const uint8_t* p, uint32_t (&w)[(BYTES + 3) / 4]) {
  if constexpr (BYTES == 2) {
    w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
  } else if constexpr (BYTES == 4) {
    w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  } else if constexpr (BYTES == 8) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x; w[1] = v.y;
  } else {
    static_assert(BYTES == 16, "rows of 2 to 16 bytes");
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  }
}

template <int D, int BITS>
struct Layout {
  static constexpr int E = 32 / BITS;              // codes per word
  static constexpr int W = D / E;                  // words per token row
  static constexpr int PER_BYTE = 8 / BITS;
  static constexpr int PAIRS = D / 8;              // key channel pairs per lane: lane % 4 owns D/4 channels
  static constexpr int KB = D * BITS / 32;         // bytes of a key row per lane
  static constexpr int VB = D * BITS / 64;         // bytes of a value row per lane: lane / 4 owns D/8 channels
  static constexpr int KWN = (KB + 3) / 4, VWN = (VB + 3) / 4;
  // key pair p of a lane's chunk: channels lo and lo + E/2, at bits 8k + BITS i and 16 + 8k + BITS i of word p/(E/2)
  __host__ __device__ static constexpr int word(int p) { return p / (E / 2); }
  __host__ __device__ static constexpr int byte(int p) { return p % (E / 2) / PER_BYTE; }
  __host__ __device__ static constexpr int pos(int p) { return p % PER_BYTE; }
  __host__ __device__ static constexpr int lo(int p) { return word(p) * E + byte(p) * PER_BYTE + pos(p); }
};

// What a lane loads for one 16-token tile: key words of tokens t0 + g and t0 + 8 + g (its chunk of channels), value
// bytes of tokens t0 + 2qd, +1, +8, +9, and those tokens' value (scale, min) as fp16 pairs (token pairs 0-1, 8-9).
template <int D, int BITS>
struct Tile {
  using L = Layout<D, BITS>;
  uint32_t k[2][L::KWN];
  uint32_t v[4][L::VWN];
  uint32_t s[2], m[2];
};

// (vgroups, vg: value groups per token and the one holding the lane's channels, computed once per block)
template <int D, int BITS>
__device__ __forceinline__ void load_tile(const Params& p, int64_t bh, int t0, int last, int vgroups, int vg,
                                          Tile<D, BITS>& t) {
  using L = Layout<D, BITS>;
  const int lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
  const uint8_t* kq = static_cast<const uint8_t*>(p.kq) + bh * p.s_kq * 4;
  const uint8_t* vq = static_cast<const uint8_t*>(p.vq) + bh * p.s_vq * 4;
  const unsigned short* vs = static_cast<const unsigned short*>(p.vs) + bh * p.s_vs;
  const unsigned short* vm = static_cast<const unsigned short*>(p.vm) + bh * p.s_vs;
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // rows past the range are clamped to its last (finite) row, and masked
    const int tok = min(t0 + 8 * r + g, last);
    load_row<L::KB>(kq + static_cast<int64_t>(tok) * L::W * 4 + qd * L::KB, t.k[r]);
  }
  uint32_t s16[4], m16[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int tok = min(t0 + 8 * (r >> 1) + 2 * qd + (r & 1), last);
    load_row<L::VB>(vq + static_cast<int64_t>(tok) * L::W * 4 + g * L::VB, t.v[r]);
    s16[r] = __ldg(vs + static_cast<int64_t>(tok) * vgroups + vg);
    m16[r] = __ldg(vm + static_cast<int64_t>(tok) * vgroups + vg);
  }
#pragma unroll
  for (int pp = 0; pp < 2; ++pp) {
    t.s[pp] = s16[2 * pp] | s16[2 * pp + 1] << 16;
    t.m[pp] = m16[2 * pp] | m16[2 * pp + 1] << 16;
  }
}

// fp16 pair (token A, token B) of value channel j of the lane's chunk, dequantized: va, vb the two rows' words,
// sc[i] the pair of scales times 2^-(BITS i), mn the pair of mins
template <int D, int BITS>
__device__ __forceinline__ uint32_t value_pair(const uint32_t* va, const uint32_t* vb, int j, const uint32_t* sc,
                                               uint32_t mn) {
  using L = Layout<D, BITS>;
  const int k = j / L::PER_BYTE, i = j % L::PER_BYTE, b = k % 4;
  const uint32_t x = __byte_perm(va[k / 4], vb[k / 4], b | b << 4 | (4 + b) << 8 | (4 + b) << 12);  // bytes 0, 2
  return h2u(__hfma2(u2h(codes2<BITS>(x, i)), u2h(sc[i]), u2h(mn)));
}

// The lane's query fragments: qpow[p] = (q[lo], q[lo + E/2]) * qk_scale * 2^-(BITS i) for its key pairs (head g,
// zero for padding heads), and qn[s] the natural-order B fragment (channels 16s + 2qd, +1 and +8, +9) for q . min
template <typename T, int D, int BITS>
__device__ __forceinline__ void load_query(const Params& p, int b, int h, uint32_t (&qpow)[D / 8],
                                           uint32_t (&qn)[D / 16][2]) {
  using L = Layout<D, BITS>;
  const int lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
  const bool live = g < p.group;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + static_cast<int64_t>(h * p.group + (live ? g : 0)) * p.q_sh;
  const float sc = live ? p.qk_scale : 0.f;
  const int base = qd * (D / 4);
#pragma unroll
  for (int i = 0; i < L::PAIRS; ++i) {
    const float f = sc / static_cast<float>(1 << (BITS * L::pos(i)));
    qpow[i] = h2u(__floats2half2_rn(to_float(q[base + L::lo(i)]) * f, to_float(q[base + L::lo(i) + L::E / 2]) * f));
  }
#pragma unroll
  for (int s = 0; s < D / 16; ++s)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int c = 16 * s + 8 * half + 2 * qd;
      qn[s][half] = h2u(__floats2half2_rn(to_float(q[c]) * sc, to_float(q[c + 1]) * sc));
    }
}

// bias[r][head] = q[head] . min[g0 + r] (base-2 scaled) for the part's key groups r < ng: A = mins (16 groups x 16
// channels), B = the natural-order query
template <int D>
__device__ __forceinline__ void group_bias(const Params& p, int64_t bh, int g0, int ng, const uint32_t (&qn)[D / 16][2],
                                           float* bias) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, qd = lane & 3;
  const __half* km = static_cast<const __half*>(p.km) + bh * p.s_ks;
  for (int mt = warp; mt * 16 < ng; mt += kWarps) {
    const int ra = 16 * mt + g, rb = ra + 8;
    const uint32_t* rowa = reinterpret_cast<const uint32_t*>(km + static_cast<int64_t>(g0 + ra) * D);
    const uint32_t* rowb = reinterpret_cast<const uint32_t*>(km + static_cast<int64_t>(g0 + rb) * D);
    float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int s = 0; s < D / 16; ++s) {
      const int w = 8 * s + qd;  // 32-bit word of channels 16s + 2qd, +1
      mma(c, ra < ng ? __ldg(rowa + w) : 0u, rb < ng ? __ldg(rowb + w) : 0u, ra < ng ? __ldg(rowa + w + 4) : 0u,
          rb < ng ? __ldg(rowb + w + 4) : 0u, qn[s][0], qn[s][1]);
    }
    bias[ra * kMaxGroup + 2 * qd] = c[0];
    bias[ra * kMaxGroup + 2 * qd + 1] = c[1];
    bias[rb * kMaxGroup + 2 * qd] = c[2];
    bias[rb * kMaxGroup + 2 * qd + 1] = c[3];
  }
}

// q' = qpow * (scale[lo], scale[lo + E/2]) of key group kg, the B fragments of the QK mma
template <int D, int BITS>
__device__ __forceinline__ void scaled_query(const Params& p, int64_t bh, int kg, const uint32_t (&qpow)[D / 8],
                                             uint32_t (&qk)[D / 8]) {
  using L = Layout<D, BITS>;
  const int qd = threadIdx.x & 3;
  const uint4* row = reinterpret_cast<const uint4*>(static_cast<const __half*>(p.ks) + bh * p.s_ks +
                                                    static_cast<int64_t>(kg) * D + qd * (D / 4));
  uint32_t s[D / 8];  // channels 2r, 2r + 1 of the lane's chunk
#pragma unroll
  for (int i = 0; i < D / 32; ++i) {
    const uint4 v = __ldg(row + i);
    s[4 * i] = v.x; s[4 * i + 1] = v.y; s[4 * i + 2] = v.z; s[4 * i + 3] = v.w;
  }
#pragma unroll
  for (int i = 0; i < L::PAIRS; ++i) {
    const int lo = L::lo(i), hi = lo + L::E / 2;  // same parity: both low or both high halves
    const uint32_t sp = __byte_perm(s[lo / 2], s[hi / 2], (lo & 1) ? 0x7632 : 0x5410);
    qk[i] = h2u(__hmul2(u2h(qpow[i]), u2h(sp)));
  }
}

// One warp's online softmax state: m, l for heads 2qd, 2qd + 1 (l lane-partial), o[mt] = O^T rows (channel
// chunk + 2mt, chunk + 2mt + 1) x those heads
template <int D>
struct State {
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[D / 16][4];
};

// One 16-token tile [t0, t0 + 16) of the warp's range (tokens >= end masked) through both mma
template <int D, int BITS>
__device__ __forceinline__ void attend_tile(const Tile<D, BITS>& t, int t0, int end, const uint32_t (&qk)[D / 8],
                                            float bias0, float bias1, State<D>& st) {
  using L = Layout<D, BITS>;
  const int lane = threadIdx.x & 31, g = lane >> 2;
  float s[4] = {0.f, 0.f, 0.f, 0.f};  // S^T[tok g][head 2qd, 2qd + 1], S^T[tok g + 8][...]
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int p0 = 2 * ks, p1 = 2 * ks + 1;
    const uint32_t a0 = codes2<BITS>(L::byte(p0) ? t.k[0][L::word(p0)] >> 8 : t.k[0][L::word(p0)], L::pos(p0));
    const uint32_t a1 = codes2<BITS>(L::byte(p0) ? t.k[1][L::word(p0)] >> 8 : t.k[1][L::word(p0)], L::pos(p0));
    const uint32_t a2 = codes2<BITS>(L::byte(p1) ? t.k[0][L::word(p1)] >> 8 : t.k[0][L::word(p1)], L::pos(p1));
    const uint32_t a3 = codes2<BITS>(L::byte(p1) ? t.k[1][L::word(p1)] >> 8 : t.k[1][L::word(p1)], L::pos(p1));
    mma(s, a0, a1, a2, a3, qk[p0], qk[p1]);
  }
  const bool ok0 = t0 + g < end, ok1 = t0 + 8 + g < end;
  s[0] = ok0 ? s[0] + bias0 : -INFINITY;
  s[1] = ok0 ? s[1] + bias1 : -INFINITY;
  s[2] = ok1 ? s[2] + bias0 : -INFINITY;
  s[3] = ok1 ? s[3] + bias1 : -INFINITY;
  float mx0 = fmaxf(s[0], s[2]), mx1 = fmaxf(s[1], s[3]);
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {  // over the 8 lanes of the same heads
    mx0 = fmaxf(mx0, __shfl_xor_sync(kFull, mx0, o));
    mx1 = fmaxf(mx1, __shfl_xor_sync(kFull, mx1, o));
  }
  if (__any_sync(kFull, mx0 > st.m[0] + kLazy || mx1 > st.m[1] + kLazy)) {
    const float n0 = fmaxf(st.m[0], mx0), n1 = fmaxf(st.m[1], mx1);
    const float al0 = exp2f(st.m[0] - (n0 == -INFINITY ? 0.f : n0));
    const float al1 = exp2f(st.m[1] - (n1 == -INFINITY ? 0.f : n1));
    st.l[0] *= al0;
    st.l[1] *= al1;
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
      st.o[mt][0] *= al0; st.o[mt][1] *= al1; st.o[mt][2] *= al0; st.o[mt][3] *= al1;
    }
    st.m[0] = n0;
    st.m[1] = n1;
  }
  const float u0 = st.m[0] == -INFINITY ? 0.f : st.m[0], u1 = st.m[1] == -INFINITY ? 0.f : st.m[1];
  const float p0 = exp2f(s[0] - u0), p1 = exp2f(s[1] - u1), p2 = exp2f(s[2] - u0), p3 = exp2f(s[3] - u1);
  st.l[0] += p0 + p2;
  st.l[1] += p1 + p3;
  // P^T[tok 2qd, 2qd + 1][head g] (and tokens + 8): the B fragments of the PV mma
  const uint32_t pb0 = transpose8x8(h2u(__floats2half2_rn(p0, p1)));
  const uint32_t pb1 = transpose8x8(h2u(__floats2half2_rn(p2, p3)));
  uint32_t sc[2][L::PER_BYTE];
#pragma unroll
  for (int pp = 0; pp < 2; ++pp)
#pragma unroll
    for (int i = 0; i < L::PER_BYTE; ++i) {
      const float f = 1.f / static_cast<float>(1 << (BITS * i));
      sc[pp][i] = i ? h2u(__hmul2(u2h(t.s[pp]), __floats2half2_rn(f, f))) : t.s[pp];
    }
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt) {
    mma(st.o[mt], value_pair<D, BITS>(t.v[0], t.v[1], 2 * mt, sc[0], t.m[0]),
        value_pair<D, BITS>(t.v[0], t.v[1], 2 * mt + 1, sc[0], t.m[0]),
        value_pair<D, BITS>(t.v[2], t.v[3], 2 * mt, sc[1], t.m[1]),
        value_pair<D, BITS>(t.v[2], t.v[3], 2 * mt + 1, sc[1], t.m[1]), pb0, pb1);
  }
}

template <typename T, int D, int BITS>
__global__ void __launch_bounds__(kWarps * 32, 4) attend_kernel(Params p) {
  __shared__ __align__(16) float s_buf[kMaxBiasRows * kMaxGroup > kWarps * kMaxGroup * D ? kMaxBiasRows * kMaxGroup
                                                                                          : kWarps * kMaxGroup * D];
  __shared__ float s_m[kWarps][kMaxGroup], s_l[kWarps][kMaxGroup];
  const int part = blockIdx.x, bhi = blockIdx.y, b = bhi / p.H, h = bhi % p.H;
  const int64_t bh = bhi;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, qd = lane & 3;
  const int n_tok = p.len ? *p.len : p.n_tok;
  const int n_v = max(n_tok - p.R, 0);
  const int lo = part * p.split, hi = min(lo + p.split, n_v);
  int gs = 0;  // log2(G): G is a power of two, and a shift keeps integer division out of the loop
  while ((1 << gs) < p.G) ++gs;
  const int g0 = lo >> gs, ng = hi > lo ? ((hi - 1) >> gs) + 1 - g0 : 0;
  const int vgroups = D >> gs, vg = (g * (D / 8)) >> gs;  // the lane's value channels lie in one group

  uint32_t qpow[D / 8], qk[D / 8];
  {
    uint32_t qn[D / 16][2];
    load_query<T, D, BITS>(p, b, h, qpow, qn);
    group_bias<D>(p, bh, g0, ng, qn, s_buf);
  }
  __syncthreads();

  // each warp a contiguous quarter of the range, whole tiles, so a key group's scaled query serves its tiles in turn
  const int quarter = (hi - lo + 16 * kWarps - 1) / (16 * kWarps) * 16;
  const int wlo = lo + warp * quarter, whi = min(wlo + quarter, hi);
  State<D> st;
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt) st.o[mt][0] = st.o[mt][1] = st.o[mt][2] = st.o[mt][3] = 0.f;
  if (wlo < whi) {
    Tile<D, BITS> cur, nxt;
    load_tile<D, BITS>(p, bh, wlo, whi - 1, vgroups, vg, cur);
    int kg = -1;
    float bias0 = 0.f, bias1 = 0.f;
    for (int t0 = wlo; t0 < whi; t0 += 16) {
      load_tile<D, BITS>(p, bh, t0 + 16, whi - 1, vgroups, vg, nxt);  // in flight during this tile's math
      if (t0 >> gs != kg) {
        kg = t0 >> gs;
        scaled_query<D, BITS>(p, bh, kg, qpow, qk);
        bias0 = s_buf[(kg - g0) * kMaxGroup + 2 * qd];
        bias1 = s_buf[(kg - g0) * kMaxGroup + 2 * qd + 1];
      }
      attend_tile<D, BITS>(cur, t0, whi, qk, bias0, bias1, st);
      cur = nxt;
    }
  }
  // merge the warps: l summed over the 8 lanes of each head pair
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    st.l[0] += __shfl_xor_sync(kFull, st.l[0], o);
    st.l[1] += __shfl_xor_sync(kFull, st.l[1], o);
  }
  __syncthreads();  // every warp is done with the bias table before s_buf holds outputs
  float* s_o = s_buf;  // [warp][head][D]
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int hd = 2 * qd + e;
    if (hd < p.group) {
#pragma unroll
      for (int mt = 0; mt < D / 16; ++mt) {
        s_o[(warp * kMaxGroup + hd) * D + g * (D / 8) + 2 * mt] = st.o[mt][e];
        s_o[(warp * kMaxGroup + hd) * D + g * (D / 8) + 2 * mt + 1] = st.o[mt][2 + e];
      }
      if (g == 0) {
        s_m[warp][hd] = st.m[e];
        s_l[warp][hd] = st.l[e];
      }
    }
  }
  __syncthreads();
  const int64_t rows0 = static_cast<int64_t>(b) * p.H * p.group + h * p.group;  // first query head of this (b, h)
  for (int e = tid; e < p.group * D; e += kWarps * 32) {
    const int hd = e / D, c = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][hd]);
    const float mu = mx == -INFINITY ? 0.f : mx;
    float o = 0.f, l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float a = exp2f(s_m[w][hd] - mu);
      o += a * s_o[(w * kMaxGroup + hd) * D + c];
      l += a * s_l[w][hd];
    }
    const int64_t row = (rows0 + hd) * p.n_parts + part;
    p.part_o[row * D + c] = l > 0.f ? o / l : 0.f;
    if (c == 0) p.part_lse[row] = l > 0.f ? mu + log2f(l) : -INFINITY;  // an empty part weighs nothing
  }
}

}  // namespace
}  // namespace kivi

#ifndef KVBENCH_EMU
namespace {
template <typename T, int D, int BITS>
cudaError_t launch(const kivi::Params& p, cudaStream_t s) {
  const dim3 grid(p.n_parts - 1, p.B * p.H);
  kivi::attend_kernel<T, D, BITS><<<grid, kivi::kWarps * 32, 0, s>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t by_bits(const kivi::Params& p, int bits, cudaStream_t s) {
  return bits == 2 ? launch<T, D, 2>(p, s) : launch<T, D, 4>(p, s);
}

template <typename T>
const void* kernel_of(int head_dim, int bits) {
  using kivi::attend_kernel;
  if (head_dim == 64) return bits == 2 ? (const void*)attend_kernel<T, 64, 2> : (const void*)attend_kernel<T, 64, 4>;
  return bits == 2 ? (const void*)attend_kernel<T, 128, 2> : (const void*)attend_kernel<T, 128, 4>;
}
}  // namespace

// The packed parts [0, n_parts - 1) of one decode step on `stream`; 0 or a cudaError_t. Shapes kivi.py's
// cuda_path() admits: fp16/bf16 (bf16 = 1), head_dim 64/128, 2 or 4 bits, G a power of two 16..128, groups <= 8.
extern "C" int kivi_attend(const kivi::Params* p, int bf16, int head_dim, int bits, void* stream) {
  if ((head_dim != 64 && head_dim != 128) || (bits != 2 && bits != 4) || p->group < 1 || p->group > kivi::kMaxGroup ||
      p->G < 16 || (p->G & (p->G - 1)) || p->G > 128 || p->split < 16 || p->split % 16 || p->n_parts < 2 ||
      p->split / p->G + 2 > kivi::kMaxBiasRows)
    return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (bf16) return head_dim == 64 ? by_bits<__nv_bfloat16, 64>(*p, bits, s) : by_bits<__nv_bfloat16, 128>(*p, bits, s);
  return head_dim == 64 ? by_bits<__half, 64>(*p, bits, s) : by_bits<__half, 128>(*p, bits, s);
}

// Blocks of the kernel for these shapes resident on one SM (for kivi.py's plan), or 0 on error.
extern "C" int kivi_blocks_per_sm(int bf16, int head_dim, int bits) {
  int n = 0;
  const void* k = bf16 ? kernel_of<__nv_bfloat16>(head_dim, bits) : kernel_of<__half>(head_dim, bits);
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k, kivi::kWarps * 32, 0) == cudaSuccess ? n : 0;
}

extern "C" const char* kivi_error_string(int e) { return cudaGetErrorString(static_cast<cudaError_t>(e)); }
#endif
