// Self-indexing 1-bit VQ cache kernels: pack, append, score-and-select, and a sparse decode attention of 2+1 storage
// (opt-in: kernels/selfindex_attend.py's Triton kernel runs by default, and always for 16+1 and query groups above 8).
// Raw pointers only (no torch headers): nvcc compiles this file in seconds, and CI compiles it without a GPU.
// Every kernel has a PyTorch reference of the same name in kernels/selfindex.py; tests/test_selfindex_kernels.py
// checks one against the other.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "selfindex.h"

namespace si {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// Programmatic dependent launch (Hopper): a kernel launched with the attribute may start while its predecessor
// drains; it must wait before reading what the predecessor writes. Both are no-ops without the attribute.
__device__ __forceinline__ void wait_for_predecessor() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void allow_dependents() { asm volatile("griddepcontrol.launch_dependents;" :::); }

// A flag or count another block publishes: read from L2 every time (a spin loop must not keep a stale copy).
__device__ __forceinline__ unsigned long long load_volatile(const unsigned long long* p) {
  return *reinterpret_cast<const volatile unsigned long long*>(p);
}

// Ask for a line in L2 ahead of its load (no register waits for it).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// A block's shared memory as one struct (tests/selfindex_emu.h gives every emulated block its own).
template <typename S>
__device__ __forceinline__ S& block_shared() {
  __shared__ S s;
  return s;
}

template <typename T> struct Vec;
template <> struct Vec<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <> struct Vec<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

// Token tok's part of a 2-bit buffer (kmag, kscale, vq or vscale): kernels/selfindex.py interleaves the four in one
// row per token, so a gathered token is one run of bytes (whole sectors) rather than four scattered pieces.
template <typename T>
__device__ __forceinline__ T* at_row(void* base, int64_t tok, int64_t row) {
  return reinterpret_cast<T*>(static_cast<uint8_t*>(base) + tok * row);
}
template <typename T>
__device__ __forceinline__ const T* at_row(const void* base, int64_t tok, int64_t row) {
  return reinterpret_cast<const T*>(static_cast<const uint8_t*>(base) + tok * row);
}

// 4 consecutive elements (8 bytes) as floats
template <typename T>
__device__ __forceinline__ void load4(const T* p, float out[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = Vec<T>::to(e[j]);
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float in[4]) {
  uint2 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) e[j] = Vec<T>::from(in[j]);
  *reinterpret_cast<uint2*>(p) = raw;
}

// Signs of this lane's 4 channels -> nibble; 8 lanes' nibbles -> one 32-bit word written by the first of them.
__device__ __forceinline__ int sign_nibble(const float kc[4]) {
  int nib = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) nib |= (kc[j] > 0.f ? 1 : 0) << j;
  return nib;
}

__device__ __forceinline__ void store_signs(int nib, int lane, bool active, uint8_t* token_signs) {
  uint32_t w = static_cast<uint32_t>(active ? nib : 0) << (4 * (lane & 7));
  w |= __shfl_xor_sync(kFull, w, 1);
  w |= __shfl_xor_sync(kFull, w, 2);
  w |= __shfl_xor_sync(kFull, w, 4);
  if (active && (lane & 7) == 0) reinterpret_cast<uint32_t*>(token_signs)[lane >> 3] = w;
}

// Asymmetric 2-bit quantization of a 32-channel group spread over 8 lanes (4 channels each), exactly as
// kernels/selfindex.py's quant2: fp16-rounded (scale, zero), codes = clamp(rint((x - zero) / scale), 0, 3).
__device__ __forceinline__ void quant2_store(const float x[4], int lane, bool active, uint8_t* token_codes,
                                             __half2* token_sz) {
  float mn = active ? fminf(fminf(x[0], x[1]), fminf(x[2], x[3])) : INFINITY;
  float mx = active ? fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3])) : -INFINITY;
#pragma unroll
  for (int o = 1; o < 8; o <<= 1) {
    mn = fminf(mn, __shfl_xor_sync(kFull, mn, o));
    mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, o));
  }
  const float scale = __half2float(__float2half_rn(__fdiv_rn(__fsub_rn(mx, mn), 3.f)));
  const float zero = __half2float(__float2half_rn(mn));
  uint32_t byte = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float q = 0.f;
    if (scale > 0.f) q = fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x[j], zero), scale)), 0.f), 3.f);
    byte |= static_cast<uint32_t>(q) << (2 * j);
  }
  uint32_t w = byte << (8 * (lane & 3));
  w |= __shfl_xor_sync(kFull, w, 1);
  w |= __shfl_xor_sync(kFull, w, 2);
  if (active && (lane & 3) == 0) reinterpret_cast<uint32_t*>(token_codes)[lane >> 2] = w;
  if (active && (lane & 7) == 0) token_sz[lane >> 3] = __floats2half2_rn(scale, zero);
}

// ------------------------------------------------------------------------------------------------------------------
// pack: one warp per token, lane l holds channels 4l..4l+3 (D/4 lanes active)

constexpr int kPackWarps = 8;
constexpr int kPackTokens = 512;  // tokens per block: the shared codebook is flushed once per block

template <typename T, int D>
__global__ void __launch_bounds__(kPackWarps * 32) pack_kernel(PackParams p) {
  constexpr int G = D / 4;
  __shared__ float s_sum[G * 16 * 4];
  __shared__ int s_cnt[G * 16];
  __shared__ float s_abs[G];
  const int b = blockIdx.z, h = blockIdx.y, bh = b * p.H + h;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool acc = p.cb_sum != nullptr;
  if (acc) {
    for (int i = threadIdx.x; i < G * 64; i += blockDim.x) s_sum[i] = 0.f;
    for (int i = threadIdx.x; i < G * 16; i += blockDim.x) s_cnt[i] = 0;
    for (int i = threadIdx.x; i < G; i += blockDim.x) s_abs[i] = 0.f;
    __syncthreads();
  }
  const bool active = lane < G;
  const int c0 = 4 * lane;
  float mu[4] = {0.f, 0.f, 0.f, 0.f}, inv[4] = {0.f, 0.f, 0.f, 0.f};
  if (active) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      mu[j] = p.mu[bh * D + c0 + j];
      if (p.inv_chmax) inv[j] = p.inv_chmax[bh * D + c0 + j];
    }
  }
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + c0;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + c0;
  const int t_end = min(p.n_tok, (blockIdx.x + 1) * kPackTokens);
  for (int t = blockIdx.x * kPackTokens + warp; t < t_end; t += kPackWarps) {
    const int pos = p.pos0 + t;
    const int64_t tok = static_cast<int64_t>(bh) * p.cap + pos;
    float kc[4] = {0.f, 0.f, 0.f, 0.f};
    if (active) {
      load4(kb + t * p.k_st, kc);
#pragma unroll
      for (int j = 0; j < 4; ++j) kc[j] = __fsub_rn(kc[j], mu[j]);
    }
    const int nib = sign_nibble(kc);
    store_signs(nib, lane, active, p.signs + tok * (D / 8));
    if (acc && active) {
      float a = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        atomicAdd(&s_sum[(lane * 16 + nib) * 4 + j], kc[j]);
        a += fabsf(kc[j]);
      }
      atomicAdd(&s_cnt[lane * 16 + nib], 1);
      atomicAdd(&s_abs[lane], a);
    }
    if (p.inv_chmax && pos >= p.qlo && pos < p.qhi) {  // warp-uniform
      float kn[4], vv[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < 4; ++j) kn[j] = __fmul_rn(fabsf(kc[j]), inv[j]);
      quant2_store(kn, lane, active, at_row<uint8_t>(p.kmag, tok, p.row), at_row<__half2>(p.kscale, tok, p.row));
      if (active) load4(vb + t * p.v_st, vv);
      quant2_store(vv, lane, active, at_row<uint8_t>(p.vq, tok, p.row), at_row<__half2>(p.vscale, tok, p.row));
    }
  }
  if (acc) {
    __syncthreads();
    const int64_t cb0 = static_cast<int64_t>(bh) * G * 16;
    for (int i = threadIdx.x; i < G * 16; i += blockDim.x) {
      if (s_cnt[i] == 0) continue;
      atomicAdd(&p.cb_cnt[cb0 + i], s_cnt[i]);
#pragma unroll
      for (int j = 0; j < 4; ++j) atomicAdd(&p.cb_sum[(cb0 + i) * 4 + j], s_sum[i * 4 + j]);
    }
    for (int i = threadIdx.x; i < G; i += blockDim.x) atomicAdd(&p.cb_abs[bh * G + i], s_abs[i]);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// append: one warp per (b, h)

template <typename T, int D>
__global__ void __launch_bounds__(32) append_kernel(AppendParams p) {
  constexpr int G = D / 4;
  const int b = blockIdx.y, h = blockIdx.x, bh = b * p.H + h;
  const int lane = threadIdx.x;
  const bool active = lane < G;
  const int c0 = 4 * lane;
  const int pos = p.plan ? p.plan[0] : p.pos, slot = p.plan ? p.plan[1] : p.slot;
  const int old_pos = p.plan ? p.plan[2] : p.old_pos;
  float k[4] = {0.f, 0.f, 0.f, 0.f}, v[4] = {0.f, 0.f, 0.f, 0.f}, mu[4] = {0.f, 0.f, 0.f, 0.f};
  T* fk = static_cast<T*>(p.fk) + (static_cast<int64_t>(bh) * p.F + slot) * D + c0;
  T* fv = static_cast<T*>(p.fv) + (static_cast<int64_t>(bh) * p.F + slot) * D + c0;
  if (active) {
    load4(static_cast<const T*>(p.k1) + b * p.k_sb + h * p.k_sh + c0, k);
    load4(static_cast<const T*>(p.v1) + b * p.v_sb + h * p.v_sh + c0, v);
#pragma unroll
    for (int j = 0; j < 4; ++j) mu[j] = p.mu[bh * D + c0 + j];
  }
  const int64_t tok = static_cast<int64_t>(bh) * p.cap + pos;
  float kc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) kc[j] = __fsub_rn(k[j], mu[j]);
  store_signs(sign_nibble(kc), lane, active, p.signs + tok * (D / 8));
  if (p.kfull && active) {
    store4(static_cast<T*>(p.kfull) + tok * D + c0, k);
    store4(static_cast<T*>(p.vfull) + tok * D + c0, v);
  }
  if (old_pos >= 0 && p.inv_chmax) {  // the token leaving the window: 2-bit storage from its full-precision slot
    float ok[4] = {0.f, 0.f, 0.f, 0.f}, ov[4] = {0.f, 0.f, 0.f, 0.f};
    if (active) {
      load4(fk, ok);
      load4(fv, ov);
#pragma unroll
      for (int j = 0; j < 4; ++j) ok[j] = __fmul_rn(fabsf(__fsub_rn(ok[j], mu[j])), p.inv_chmax[bh * D + c0 + j]);
    }
    const int64_t otok = static_cast<int64_t>(bh) * p.cap + old_pos;
    quant2_store(ok, lane, active, at_row<uint8_t>(p.kmag, otok, p.row), at_row<__half2>(p.kscale, otok, p.row));
    quant2_store(ov, lane, active, at_row<uint8_t>(p.vq, otok, p.row), at_row<__half2>(p.vscale, otok, p.row));
  }
  __syncwarp();
  if (active) {
    store4(fk, k);
    store4(fv, v);
  }
  if (lane == 0) p.fpos[static_cast<int64_t>(bh) * p.F + slot] = pos;
}

// ------------------------------------------------------------------------------------------------------------------
// Scoring: the GQA-mean query's LUT on chip (int8, one scale per (b, h), the arithmetic of lut8_ref), one thread per
// token, a shared histogram of the bins.

constexpr int kSelThreads = 256;

template <int D>
__device__ __forceinline__ int bin_of(int score) {
  constexpr int G = D / 4;
  constexpr int span = 254 * G + 1;
  constexpr int shift = span <= kNBins ? 0 : (span <= 2 * kNBins ? 1 : (span <= 4 * kNBins ? 2 : 3));
  return (score + 127 * G) >> shift;
}

// s_q [D], s_lut [G*16] float scratch, s_lut8 [G*16] the result, s_red [kSelThreads/32]. Ends with a barrier.
template <typename T, int D>
__device__ void build_lut(const SelectParams& p, int b, int h, float* s_q, float* s_lut, int* s_lut8, float* s_red) {
  constexpr int G = D / 4;
  constexpr int NC = (G * 16 + kSelThreads - 1) / kSelThreads;  // codebook entries per thread
  const int tid = threadIdx.x, bh = b * p.H + h;
  // this thread's centroids first: their load and the query's are in flight together
  const float4* cb = reinterpret_cast<const float4*>(p.cb + static_cast<int64_t>(bh) * G * 64);
  float4 c[NC];
#pragma unroll
  for (int n = 0; n < NC; ++n)
    if (tid + n * kSelThreads < G * 16) c[n] = cb[tid + n * kSelThreads];
  for (int d = tid; d < D; d += blockDim.x) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb + static_cast<int64_t>(h) * p.group * p.q_sh + d;
    float s = 0.f;
    for (int i = 0; i < p.group; ++i) s = __fadd_rn(s, Vec<T>::to(q[i * p.q_sh]));
    s_q[d] = __fdiv_rn(s, static_cast<float>(p.group));
  }
  __syncthreads();
  float amax = 0.f;
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    const int i = tid + n * kSelThreads, g = i >> 4;
    if (i >= G * 16) break;
    float l = __fmul_rn(s_q[4 * g], c[n].x);
    l = __fadd_rn(l, __fmul_rn(s_q[4 * g + 1], c[n].y));
    l = __fadd_rn(l, __fmul_rn(s_q[4 * g + 2], c[n].z));
    l = __fadd_rn(l, __fmul_rn(s_q[4 * g + 3], c[n].w));
    s_lut[i] = l;
    amax = fmaxf(amax, fabsf(l));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, o));
  if ((tid & 31) == 0) s_red[tid >> 5] = amax;
  __syncthreads();
  amax = 0.f;
  for (int w = 0; w < kSelThreads / 32; ++w) amax = fmaxf(amax, s_red[w]);
  const float s = __fdiv_rn(amax, 127.f);
  for (int i = tid; i < G * 16; i += blockDim.x)
    s_lut8[i] = s > 0.f ? static_cast<int>(fminf(fmaxf(rintf(__fdiv_rn(s_lut[i], s)), -127.f), 127.f)) : 0;
  __syncthreads();
}

// Score tokens [t0, t1): bins[tt - t0] (global or shared) and the shared histogram. 4 tokens in flight per thread.
template <int D, typename BinT>
__device__ void score_chunk(const SelectParams& p, int bh, int t0, int t1, const int* s_lut8, int* s_hist, BinT* bins) {
  const uint8_t* signs = p.signs + static_cast<int64_t>(bh) * p.cap * (D / 8);
  const uint8_t* excl = p.excl ? p.excl + static_cast<int64_t>(bh) * p.excl_stride : nullptr;
  constexpr int U = 4;
  using Word = typename std::conditional<D == 128, uint4, uint2>::type;
  for (int t = t0 + threadIdx.x; t < t1; t += U * blockDim.x) {
    Word w[U];
    bool live[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int tt = t + u * blockDim.x;
      live[u] = tt < t1 && !(excl && ((excl[tt >> 3] >> (tt & 7)) & 1));
      if (live[u]) w[u] = reinterpret_cast<const Word*>(signs)[tt];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int tt = t + u * blockDim.x;
      if (tt >= t1) break;
      if (!live[u]) {
        bins[tt - t0] = static_cast<BinT>(kExcluded);
        continue;
      }
      const uint32_t* words = reinterpret_cast<const uint32_t*>(&w[u]);
      int score = 0;
#pragma unroll
      for (int wi = 0; wi < D / 32; ++wi)
#pragma unroll
        for (int n = 0; n < 8; ++n) score += s_lut8[(wi * 8 + n) * 16 + ((words[wi] >> (4 * n)) & 15)];
      const int bin = bin_of<D>(score);
      bins[tt - t0] = static_cast<BinT>(bin);
      atomicAdd(&s_hist[bin], 1);
    }
  }
}

// The sign rows this thread will score in [t0, t1) (score_chunk's tokens), fetched into L2 while the LUT is built.
template <int D>
__device__ __forceinline__ void prefetch_chunk(const SelectParams& p, int bh, int t0, int t1) {
  const uint8_t* signs = p.signs + static_cast<int64_t>(bh) * p.cap * (D / 8);
  for (int t = t0 + threadIdx.x; t < t1; t += blockDim.x) prefetch_l2(signs + static_cast<int64_t>(t) * (D / 8));
}

// Block-wide: the threshold bin of a top-k over a histogram (counts(bin) reads it): out[0] = the highest bin B* with
// count(bins >= B*) >= k, out[1] = count(bins > B*), out[2] = how many to take from B*. Fewer than k candidates:
// out = {-1, total, 0} (take all). s_scan [kSelThreads]. Ends with a barrier.
template <typename Counts>
__device__ void threshold(Counts counts, int k, int* s_scan, int* out) {
  constexpr int per = kNBins / kSelThreads;  // bins per thread, thread 0 owns the highest
  const int tid = threadIdx.x;
  int local[per];
  int mine = 0;
#pragma unroll
  for (int j = 0; j < per; ++j) {
    local[j] = counts(kNBins - 1 - (tid * per + j));
    mine += local[j];
  }
  s_scan[tid] = mine;
  __syncthreads();
  for (int o = 1; o < kSelThreads; o <<= 1) {  // inclusive scan over threads, highest bins first
    const int add = tid >= o ? s_scan[tid - o] : 0;
    __syncthreads();
    s_scan[tid] += add;
    __syncthreads();
  }
  const int before = s_scan[tid] - mine;
  if (tid == kSelThreads - 1 && s_scan[tid] < k) {
    out[0] = -1;
    out[1] = s_scan[tid];
    out[2] = 0;
  }
  if (before < k && k <= s_scan[tid]) {
    int cum = before;
#pragma unroll
    for (int j = 0; j < per; ++j) {
      if (cum + local[j] >= k) {
        out[0] = kNBins - 1 - (tid * per + j);
        out[1] = cum;
        out[2] = k - cum;
        break;
      }
      cum += local[j];
    }
  }
  __syncthreads();
}

// ---- scores to global bins, the last block of each (b, h) finds the threshold
template <typename T, int D>
__global__ void __launch_bounds__(kSelThreads) score_kernel(SelectParams p) {
  constexpr int G = D / 4;
  __shared__ float s_q[D];
  __shared__ float s_lut[G * 16];
  __shared__ int s_lut8[G * 16];
  __shared__ int s_hist[kNBins];
  __shared__ float s_red[kSelThreads / 32];
  __shared__ int s_scan[kSelThreads];
  __shared__ int s_last;
  const int b = blockIdx.z, h = blockIdx.y, bh = b * p.H + h, tid = threadIdx.x;
  allow_dependents();
  for (int i = tid; i < kNBins; i += blockDim.x) s_hist[i] = 0;
  build_lut<T, D>(p, b, h, s_q, s_lut, s_lut8, s_red);
  const int hi = p.plan ? p.plan[3] : p.hi, k = p.plan ? p.plan[4] : p.k;
  const int t0 = p.lo + blockIdx.x * p.chunk;
  score_chunk<D>(p, bh, t0, min(hi, t0 + p.chunk), s_lut8, s_hist, p.bins + static_cast<int64_t>(bh) * p.bstride + t0);
  __syncthreads();
  int* ghist = p.hist + static_cast<int64_t>(bh) * kNBins;
  for (int i = tid; i < kNBins; i += blockDim.x)
    if (s_hist[i]) atomicAdd(&ghist[i], s_hist[i]);
  __threadfence();
  __syncthreads();
  int* ctr = p.ctr + bh * kCounters;
  if (tid == 0) s_last = atomicAdd(&ctr[0], 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (k > 0) {
    threshold([&](int bin) { return __ldcg(&ghist[bin]); }, k, s_scan, ctr + 1);
  } else if (tid == 0) {  // a planned step that selects nothing: a threshold above every bin, nothing tied
    ctr[1] = kNBins;
    ctr[2] = 0;
    ctr[3] = 0;
  }
  for (int i = tid; i < kNBins; i += blockDim.x) ghist[i] = 0;  // ready for the next step
  if (tid == 0) ctr[0] = 0;
}

// The 8 bins (16 bytes) of tokens t .. t+7 (kExcluded outside [t0, t1)) passed to fn(token, bin) one by one; the trip
// count over [t0 & ~7, t1) is warp-uniform, as the ballots in place() need.
template <typename Fn>
__device__ __forceinline__ void for_each_bin(const uint16_t* bins, int t0, int t1, Fn fn) {
  for (int base = t0 & ~7; base < t1; base += 8 * blockDim.x) {
    const int t = base + 8 * threadIdx.x;
    uint4 raw = make_uint4(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu);  // all kExcluded
    if (t < t1) raw = *reinterpret_cast<const uint4*>(bins + t);
    const uint16_t* v = reinterpret_cast<const uint16_t*>(&raw);
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int tt = t + u;
      fn(tt, (tt >= t0 && tt < t1) ? static_cast<int>(v[u]) : kExcluded);
    }
  }
}

// Exclusive prefix sums of two per-thread counts over the block, in thread order, and their block totals. All
// threads must call it (it has barriers); blockDim.x == kSelThreads.
__device__ __forceinline__ void block_scan2(int a, int e, int* s_warp, int& ea, int& ee, int& ta, int& te) {
  constexpr int W = kSelThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int ia = a, ie = e;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int xa = __shfl_up_sync(kFull, ia, o), xe = __shfl_up_sync(kFull, ie, o);
    if (lane >= o) {
      ia += xa;
      ie += xe;
    }
  }
  if (lane == 31) {
    s_warp[warp] = ia;
    s_warp[W + warp] = ie;
  }
  __syncthreads();
  int wa = 0, we = 0;
  ta = 0;
  te = 0;
#pragma unroll
  for (int w = 0; w < W; ++w) {
    const int xa = s_warp[w], xe = s_warp[W + w];
    if (w < warp) {
      wa += xa;
      we += xe;
    }
    ta += xa;
    te += xe;
  }
  ea = wa + ia - a;
  ee = we + ie - e;
  __syncthreads();  // s_warp may be written again
}

// The chunk of tokens block blockIdx.x of a (b, h) scores and selects from: [t0, t1).
__device__ __forceinline__ void chunk_range(const SelectParams& p, int& t0, int& t1) {
  t0 = p.lo + static_cast<int>(blockIdx.x) * p.chunk;
  t1 = min(p.plan ? p.plan[3] : p.hi, t0 + p.chunk);
}

// Selection, deterministic, in two kernels after the scores: count_kernel counts each chunk's tokens above and in
// the threshold bin; place_kernel gives every chunk the sum of the chunks before it, and each token its rank inside
// the chunk by a block scan, so the list is the tokens above the threshold in position order, then the lowest
// positions of the threshold bin. (One atomic cursor per (b, h) placed tokens in whatever order blocks and warps ran,
// so the same state could select different tied tokens and attend in a different order, and a graph replay could not
// be checked token for token against an eager step.) Bins are read twice, just written, so from L2.
__global__ void __launch_bounds__(kSelThreads) count_kernel(SelectParams p) {
  __shared__ int s_cnt[2];
  const int b = blockIdx.z, h = blockIdx.y, bh = b * p.H + h;
  allow_dependents();
  if (threadIdx.x < 2) s_cnt[threadIdx.x] = 0;
  wait_for_predecessor();  // the score kernel's bins and threshold
  const int* ctr = p.ctr + bh * kCounters;
  const int thr = __ldcg(&ctr[1]);
  int t0, t1;
  chunk_range(p, t0, t1);
  int n_above = 0, n_tied = 0;
  for_each_bin(p.bins + static_cast<int64_t>(bh) * p.bstride, t0, t1, [&](int, int bin) {
    n_above += bin != kExcluded && bin > thr;
    n_tied += bin == thr;
  });
  n_above = __reduce_add_sync(kFull, n_above);
  n_tied = __reduce_add_sync(kFull, n_tied);
  __syncthreads();  // s_cnt is zeroed
  if ((threadIdx.x & 31) == 0) {
    if (n_above) atomicAdd(&s_cnt[0], n_above);
    if (n_tied) atomicAdd(&s_cnt[1], n_tied);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int* out = p.counts + (static_cast<int64_t>(bh) * kMaxChunks + blockIdx.x) * 2;
    out[0] = s_cnt[0];
    out[1] = s_cnt[1];
  }
}

// Writes the picks of chunk [t0, t1) to idx: pa / pe tokens above / tied come before it, in position order. All
// threads call it (block scans); bins of the chunk are read once, 8 at a time.
__device__ __forceinline__ void place_chunk(const SelectParams& p, int bh, int t0, int t1, int thr, int n_gt,
                                            int need_eq, int pa, int pe, int* s_warp) {
  const uint16_t* bins = p.bins + static_cast<int64_t>(bh) * p.bstride;
  int* out = p.idx + static_cast<int64_t>(bh) * p.kmax;
  for (int base = t0 & ~7; base < t1; base += 8 * blockDim.x) {  // block-uniform trip count
    const int t = base + 8 * threadIdx.x;
    uint4 raw = make_uint4(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu);  // all kExcluded
    if (t < t1) raw = *reinterpret_cast<const uint4*>(bins + t);
    const uint16_t* v = reinterpret_cast<const uint16_t*>(&raw);
    unsigned above = 0, tied = 0;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int tt = t + u;
      const int bin = (tt >= t0 && tt < t1) ? static_cast<int>(v[u]) : kExcluded;
      above |= static_cast<unsigned>(bin != kExcluded && bin > thr) << u;
      tied |= static_cast<unsigned>(bin == thr) << u;
    }
    int ea, ee, ta, te;
    block_scan2(__popc(above), __popc(tied), s_warp, ea, ee, ta, te);
    int ra = pa + ea, re = pe + ee;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if ((above >> u) & 1) out[ra++] = t + u;
      if ((tied >> u) & 1) {
        if (re < need_eq) out[n_gt + re] = t + u;
        ++re;
      }
    }
    pa += ta;
    pe += te;
  }
}

__global__ void __launch_bounds__(kSelThreads) place_kernel(SelectParams p) {
  __shared__ int s_warp[2 * (kSelThreads / 32)];
  const int b = blockIdx.z, h = blockIdx.y, bh = b * p.H + h;
  wait_for_predecessor();  // count_kernel's counts
  const int* ctr = p.ctr + bh * kCounters;
  const int thr = __ldcg(&ctr[1]), n_gt = __ldcg(&ctr[2]), need_eq = __ldcg(&ctr[3]);
  const int* counts = p.counts + static_cast<int64_t>(bh) * kMaxChunks * 2;
  int pa = 0, pe = 0;  // tokens above / tied in the chunks before this one
  for (int j = threadIdx.x; j < static_cast<int>(blockIdx.x); j += blockDim.x) {
    pa += __ldcg(&counts[2 * j]);
    pe += __ldcg(&counts[2 * j + 1]);
  }
  int unused_a, unused_e;
  block_scan2(pa, pe, s_warp, unused_a, unused_e, pa, pe);
  const int own_a = __ldcg(&counts[2 * blockIdx.x]), own_e = __ldcg(&counts[2 * blockIdx.x + 1]);
  if (own_a == 0 && (own_e == 0 || pe >= need_eq)) return;  // block-uniform: nothing of this chunk is taken
  int t0, t1;
  chunk_range(p, t0, t1);
  place_chunk(p, bh, t0, t1, thr, n_gt, need_eq, pa, pe, s_warp);
}

// ---- the whole selection in one launch, when every block of the grid is resident at once (one wave): each block
// scores its chunk (as score_kernel), the last block of a (b, h) to arrive finds the threshold and raises a flag the
// others wait on; then each block counts its chunk's tokens above and in the threshold bin from its own shared
// histogram, publishes the pair, sums the pairs of the chunks before it as they appear (a decoupled look-back: those
// blocks were dispatched first and never wait on later ones, so it cannot deadlock) and places its tokens. Against
// score + count + place: two launches fewer and no count pass over the bins. Counters (selfindex.h): 0 arrivals,
// 4-5 the threshold as one 64-bit word (bit 63 the flag, then bin + 1, tokens above it, tokens taken from it: one
// read gets all), 6 departures (the last block to leave zeroes 0, 4-5 and 6); chunk pairs live in `counts` as 64-bit
// words (bit 63 set once published), each zeroed by its own block before it arrives. Each block's sign rows are
// prefetched into L2 before its LUT is built, so the scoring loads wait on L2, not on DRAM.
template <int D>
struct SelectShared {
  float q[D];
  float lut[D / 4 * 16];
  int lut8[D / 4 * 16];
  int hist[kNBins];
  float red[kSelThreads / 32];
  int scan[kSelThreads];
  int warp[2 * (kSelThreads / 32)];
  int thr[3];
  int pre[2];
  int last;
};

// Tokens of this block's chunk above / in bin thr, from its histogram (excluded tokens are not in it), in every
// thread. Has barriers.
__device__ __forceinline__ void hist_counts(const int* s_hist, int thr, int* s_warp, int& above, int& tied) {
  int a = 0, e = 0;
  for (int i = threadIdx.x; i < kNBins; i += blockDim.x) {
    a += i > thr ? s_hist[i] : 0;
    e += i == thr ? s_hist[i] : 0;
  }
  int ea, ee;
  block_scan2(a, e, s_warp, ea, ee, above, tied);
}

template <typename T, int D>
// 6 blocks an SM (40 registers, as score_kernel): more of the grid resident, so more blocks per (b, h) in one wave
__global__ void __launch_bounds__(kSelThreads, 6) select_kernel(SelectParams p) {
  SelectShared<D>& sm = block_shared<SelectShared<D>>();
  const int b = blockIdx.z, h = blockIdx.y, bh = b * p.H + h, tid = threadIdx.x, j = blockIdx.x;
  int* ctr = p.ctr + bh * kCounters;
  unsigned long long* ready = reinterpret_cast<unsigned long long*>(ctr + 4);
  unsigned long long* pairs = reinterpret_cast<unsigned long long*>(p.counts) + static_cast<int64_t>(bh) * kMaxChunks;
  if (tid == 0) pairs[j] = 0ull;  // before this block arrives: no look-back reads it until every block has
  int t0, t1;
  chunk_range(p, t0, t1);
  prefetch_chunk<D>(p, bh, t0, t1);
  for (int i = tid; i < kNBins; i += blockDim.x) sm.hist[i] = 0;
  build_lut<T, D>(p, b, h, sm.q, sm.lut, sm.lut8, sm.red);
  const int k = p.plan ? p.plan[4] : p.k;
  score_chunk<D>(p, bh, t0, t1, sm.lut8, sm.hist, p.bins + static_cast<int64_t>(bh) * p.bstride + t0);
  __syncthreads();
  int* ghist = p.hist + static_cast<int64_t>(bh) * kNBins;
  for (int i = tid; i < kNBins; i += blockDim.x)
    if (sm.hist[i]) atomicAdd(&ghist[i], sm.hist[i]);
  __threadfence();
  __syncthreads();
  if (tid == 0) sm.last = atomicAdd(&ctr[0], 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (sm.last) {  // every block's histogram is in ghist: the threshold, raised as one word with its flag bit
    __threadfence();
    if (k > 0) {
      threshold([&](int bin) { return __ldcg(&ghist[bin]); }, k, sm.scan, sm.thr);
    } else if (tid == 0) {  // a planned step that selects nothing: a threshold above every bin, nothing tied
      sm.thr[0] = kNBins;
      sm.thr[1] = 0;
      sm.thr[2] = 0;
    }
    if (tid == 0)
      atomicExch(ready, (1ull << 63) | (static_cast<unsigned long long>(sm.thr[0] + 1) << 42) |
                            (static_cast<unsigned long long>(sm.thr[1]) << 21) | static_cast<unsigned>(sm.thr[2]));
    for (int i = tid; i < kNBins; i += blockDim.x) ghist[i] = 0;  // ready for the next step
  } else if (tid == 0) {
    unsigned long long v;
    while (!((v = load_volatile(ready)) >> 63)) {
    }
    __threadfence();  // the look-back's loads below come after the flag (every block's pair is zeroed before it)
    sm.thr[0] = static_cast<int>((v >> 42) & 0xfffu) - 1;  // bin -1: fewer candidates than k, every one taken
    sm.thr[1] = static_cast<int>((v >> 21) & 0x1fffffu);
    sm.thr[2] = static_cast<int>(v & 0x1fffffu);
  }
  __syncthreads();
  const int thr = sm.thr[0], n_gt = sm.thr[1], need_eq = sm.thr[2];
  int own_a, own_e;
  hist_counts(sm.hist, thr, sm.warp, own_a, own_e);
  if (tid == 0)
    atomicExch(&pairs[j], (1ull << 63) | (static_cast<unsigned long long>(own_a) << 32) | static_cast<unsigned>(own_e));
  if (tid < 32) {  // look-back: the pairs of chunks 0 .. j-1, waiting for each to be published
    int pa = 0, pe = 0;
    for (int i = tid; i < j; i += 32) {
      unsigned long long v;
      while (!((v = load_volatile(&pairs[i])) >> 63)) {
      }
      pa += static_cast<int>((v >> 32) & 0x7fffffffu);
      pe += static_cast<int>(v & 0xffffffffu);
    }
    pa = __reduce_add_sync(kFull, pa);
    pe = __reduce_add_sync(kFull, pe);
    if (tid == 0) {
      sm.pre[0] = pa;
      sm.pre[1] = pe;
    }
  }
  __syncthreads();
  const int pa = sm.pre[0], pe = sm.pre[1];
  if (!(own_a == 0 && (own_e == 0 || pe >= need_eq)))  // block-uniform: something of this chunk is taken
    place_chunk(p, bh, t0, t1, thr, n_gt, need_eq, pa, pe, sm.warp);
  // the last block to leave (every other one has read the flag) readies the counters for the next call
  if (tid == 0 && atomicAdd(&ctr[6], 1) == static_cast<int>(gridDim.x) - 1) {
    ctr[0] = 0;
    *ready = 0ull;
    ctr[6] = 0;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// sparse decode attention (2+1): flash-decoding over the full-precision set (part 0) and `split` selected tokens per
// part, with m16n8k16 tensor-core dots. Rows of the A operand are the query heads of the KV head (group <= 8: rows
// 8-15 are zero padding, their outputs dropped), so a warp's lane l works for head l/4. Each lane dequantizes exactly
// the key and value pairs its B fragments need, from whole packed rows (16-byte loads), two fp16 channels per 32-bit
// register: OR the 2-bit code into the mantissa of 1024 (0x6400), one packed subtract and one packed FMA with the
// group's (scale, zero), the sign bit XOR-ed in. (The Triton kernel it replaces spent about 12 instructions per
// channel unpacking, most of its loop.) Warps take 16-token tiles in turn; the block merges its 4 warps' online
// softmax states, the last block of a (b, h) merges the parts with a log-sum-exp, in part order (deterministic).

constexpr int kAttWarps = 4;
constexpr uint32_t kF16Magic = 0x64006400u;  // the fp16 pair (1024, 1024)

__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// d = A * B + d over rows 0-7 of A (a_lo: k 0-7 of this lane's row, a_hi: k 8-15); rows 8-15 are zero and dropped
__device__ __forceinline__ void mma_rows8(float& d0, float& d1, uint32_t a_lo, uint32_t a_hi, uint32_t b0,
                                          uint32_t b1) {
  [[maybe_unused]] float x2, x3;  // rows 8-15 of D: padding
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
      : "=f"(d0), "=f"(d1), "=f"(x2), "=f"(x3)
      : "r"(a_lo), "r"(0u), "r"(a_hi), "r"(0u), "r"(b0), "r"(b1), "f"(d0), "f"(d1), "f"(0.f), "f"(0.f));
}

// two 2-bit codes at bits 0-1 and 16-17 of x -> the fp16 pair zero + scale * code
__device__ __forceinline__ uint32_t dq2(uint32_t x, __half2 scale, __half2 zero) {
  const uint32_t h = (x & 0x00030003u) | kF16Magic;
  return h2u(__hfma2(__hsub2(u2h(h), u2h(kF16Magic)), scale, zero));
}

template <int N>
__device__ __forceinline__ void load_words(const void* p, uint32_t (&w)[N]) {
  static_assert(N % 2 == 0, "rows are whole 8-byte words");
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
      w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + i);
      w[2 * i] = v.x; w[2 * i + 1] = v.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pair_to_h2(const T* p) {  // two consecutive elements -> an fp16 pair
  if constexpr (std::is_same<T, __half>::value) {
    return *reinterpret_cast<const uint32_t*>(p);
  } else {
    return h2u(__float22half2_rn(__bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p))));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t two_to_h2(const T* a, const T* b) {  // one element of two rows -> an fp16 pair
  return h2u(__floats2half2_rn(Vec<T>::to(*a), Vec<T>::to(*b)));
}

// One warp's online softmax over its tiles: S = Q K^T for head row lane/4, then O += P V. State per lane: m and a
// lane-partial l for its head, o[j][0..1] = O[head][8j + 2(lane%4) + {0, 1}].
template <int D>
struct WarpState {
  float m = -INFINITY, l = 0.f;
  float o[D / 8][2];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = 0.f;
  }
  // s[nt][e]: scores (base 2, bias included) of tokens nt*8 + 2(lane%4) + e of the tile, -inf where masked;
  // returns the fp16 A fragments of P (pa: tokens 0-7, pb: 8-15) after rescaling o
  __device__ __forceinline__ void softmax(float (&s)[2][2], uint32_t& pa, uint32_t& pb) {
    float mx = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
    mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
    const float m_new = fmaxf(m, mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing but masked tokens so far
    const float alpha = exp2f(m - m_use);
    float p[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) p[nt][e] = exp2f(s[nt][e] - m_use);
    l = l * alpha + (p[0][0] + p[0][1]) + (p[1][0] + p[1][1]);
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][0] *= alpha;
      o[j][1] *= alpha;
    }
    m = m_new;
    pa = h2u(__floats2half2_rn(p[0][0], p[0][1]));
    pb = h2u(__floats2half2_rn(p[1][0], p[1][1]));
  }
};

// One key row's dots with this lane's query pairs (S = Q K^T for its two C columns, base 2, no bias): its 2-bit
// magnitudes km, sign bits sg and (scale, zero) pairs sz dequantized to fp16 pairs in registers, channels
// 16k + 2qd + {0,1} (pair a) and 16k + 8 + 2qd + {0,1} (pair b) of each k.
template <int D>
__device__ __forceinline__ void key_dots(const uint32_t (&km)[D / 16], const uint32_t (&sg)[D / 32],
                                         const uint32_t (&sz)[D / 32], const uint32_t (&qa)[D / 16],
                                         const uint32_t (&qb)[D / 16], int qd, float& d0, float& d1) {
  d0 = d1 = 0.f;
#pragma unroll
  for (int k = 0; k < D / 16; ++k) {
    const uint32_t y = km[k] >> (4 * qd);
    const uint32_t u = sg[k >> 1] >> (16 * (k & 1) + 2 * qd);  // sign bits: pair a at 0-1, pair b at 8-9
    const __half2 szk = u2h(sz[k >> 1]);
    const __half2 sc = __low2half2(szk), ze = __high2half2(szk);
    uint32_t ka = dq2((y & 0x3u) | ((y << 14) & 0x30000u), sc, ze);
    uint32_t kb = dq2(((y >> 16) & 0x3u) | ((y >> 2) & 0x30000u), sc, ze);
    ka ^= ((~u & 0x1u) << 15) | ((~u & 0x2u) << 30);  // magnitudes are >= 0: a clear sign bit negates
    kb ^= ((~u & 0x100u) << 7) | ((~u & 0x200u) << 22);
    mma_rows8(d0, d1, qa[k], qb[k], ka, kb);
  }
}

// O += P V for one tile: the 2-bit value words vw and (scale, zero) pairs vs of this lane's four B rows (tokens
// 2qd, 2qd + 1, 8 + 2qd, 9 + 2qd) dequantized in registers; word w holds channels 16w + g (n-tile 2w) and
// 16w + 8 + g (n-tile 2w + 1).
template <int D>
__device__ __forceinline__ void value_mmas(const uint32_t (&vw)[4][D / 16], const uint32_t (&vs)[4][D / 32], int g,
                                           uint32_t pa, uint32_t pb, WarpState<D>& st) {
#pragma unroll
  for (int w = 0; w < D / 16; ++w) {
    uint32_t h[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const __half2 szw = u2h(vs[r][w >> 1]);
      h[r] = dq2(vw[r][w] >> (2 * g), __low2half2(szw), __high2half2(szw));
    }
    mma_rows8(st.o[2 * w][0], st.o[2 * w][1], pa, pb, __byte_perm(h[0], h[1], 0x5410),
              __byte_perm(h[2], h[3], 0x5410));
    mma_rows8(st.o[2 * w + 1][0], st.o[2 * w + 1][1], pa, pb, __byte_perm(h[0], h[1], 0x7632),
              __byte_perm(h[2], h[3], 0x7632));
  }
}

// Selected tokens [lo, hi) of the list, 2-bit rows. qa/qb[s]: this lane's fp16 query pairs (q * scale * chmax) at
// channels 16s + 2(lane%4) and 16s + 8 + 2(lane%4); bias: q . mu (base 2) of its head.
template <int D>
__device__ __forceinline__ void quant_tiles(const AttendParams& p, int64_t bh, int lo, int hi,
                                            const uint32_t (&qa)[D / 16], const uint32_t (&qb)[D / 16], float bias,
                                            WarpState<D>& st) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, qd = lane & 3;
  const int* idx = p.idx + bh * p.kmax;
  const int64_t row0 = bh * p.cap;
  for (int t0 = lo + warp * 16; t0 < hi; t0 += kAttWarps * 16) {
    // this lane's rows: keys of tokens t0 + nt*8 + g (its B columns of S), values of tokens t0 + 2qd, +1, +8, +9
    // (its B rows of O). (Loading the next tile's positions early costs 17 spilled registers at 3 blocks an SM.)
    int tk[2], tv[4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) tk[nt] = t0 + nt * 8 + g < hi ? __ldg(idx + t0 + nt * 8 + g) : 0;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = t0 + (r >> 1) * 8 + 2 * qd + (r & 1);
      tv[r] = j < hi ? __ldg(idx + j) : 0;
    }
    // every row of the tile issued at once (ptxas still sinks some value loads below the first key dots)
    uint32_t km[2][D / 16], sg[2][D / 32], sz[2][D / 32], vw[4][D / 16], vs[4][D / 32];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int64_t tok = row0 + tk[nt];
      load_words(at_row<uint8_t>(p.kmag, tok, p.row), km[nt]);
      load_words(p.signs + tok * (D / 8), sg[nt]);
      load_words(at_row<__half2>(p.kscale, tok, p.row), sz[nt]);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t tok = row0 + tv[r];
      load_words(at_row<uint8_t>(p.vq, tok, p.row), vw[r]);
      load_words(at_row<__half2>(p.vscale, tok, p.row), vs[r]);
    }
    float s[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      float d0, d1;
      key_dots<D>(km[nt], sg[nt], sz[nt], qa, qb, qd, d0, d1);
      const int c = t0 + nt * 8 + 2 * qd;  // C fragment: tokens c, c + 1 for head g
      s[nt][0] = c < hi ? d0 + bias : -INFINITY;
      s[nt][1] = c + 1 < hi ? d1 + bias : -INFINITY;
    }
    uint32_t pa, pb;
    st.softmax(s, pa, pb);
    value_mmas<D>(vw, vs, g, pa, pb, st);
  }
}

// The same over a ring of kAttStages tiles per warp in shared memory, filled by cp.async (no registers hold a load in
// flight, so each warp keeps kAttStages - 1 tiles of rows in the air while it computes one; the register version
// above waits for each tile's rows). A tile's row of token r: 7 chunks of D/8 bytes, [kmag 2][signs][kscale][vq 2]
// [vscale]; lane l copies token l % 16's key chunks (l < 16) or value chunks (l >= 16). Positions are loaded one
// tile ahead of their copies.
constexpr int kAttStages = 3;

template <int D>
__device__ __forceinline__ void cp_async_chunk(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  if constexpr (D / 8 == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(s), "l"(gmem) : "memory");
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

template <int N, int VEC>  // N 32-bit words from shared memory aligned to VEC bytes
__device__ __forceinline__ void lds_words(const uint8_t* p, uint32_t (&w)[N]) {
  if constexpr (VEC == 16 && N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const uint2 v = reinterpret_cast<const uint2*>(p)[i];
      w[2 * i] = v.x; w[2 * i + 1] = v.y;
    }
  }
}

template <int D>
__device__ __forceinline__ void quant_tiles_async(const AttendParams& p, int64_t bh, int lo, int hi,
                                                  const uint32_t (&qa)[D / 16], const uint32_t (&qb)[D / 16],
                                                  float bias, WarpState<D>& st, uint8_t* ring) {
  constexpr int C = D / 8, ROW = 7 * C, TILE = 16 * ROW;  // chunk, row and tile bytes
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, qd = lane & 3;
  const int* idx = p.idx + bh * p.kmax;
  const int64_t row0 = bh * p.cap;
  const int first = lo + warp * 16;
  const int n_tiles = first < hi ? (hi - first + kAttWarps * 16 - 1) / (kAttWarps * 16) : 0;  // warp-uniform
  auto position = [&](int i) {  // this lane's token of tile i
    const int j = first + i * kAttWarps * 16 + (lane & 15);
    return i < n_tiles && j < hi ? __ldg(idx + j) : 0;
  };
  auto issue = [&](int i, int pos) {  // tile i's rows into stage i % kAttStages; a group per call, empty or not
    if (i < n_tiles) {
      const int64_t tok = row0 + pos;
      uint8_t* row = ring + (i % kAttStages) * TILE + (lane & 15) * ROW;
      if (lane < 16) {
        cp_async_chunk<D>(row, at_row<uint8_t>(p.kmag, tok, p.row));
        cp_async_chunk<D>(row + C, at_row<uint8_t>(p.kmag, tok, p.row) + C);
        cp_async_chunk<D>(row + 2 * C, p.signs + tok * (D / 8));
        cp_async_chunk<D>(row + 3 * C, at_row<uint8_t>(p.kscale, tok, p.row));
      } else {
        cp_async_chunk<D>(row + 4 * C, at_row<uint8_t>(p.vq, tok, p.row));
        cp_async_chunk<D>(row + 5 * C, at_row<uint8_t>(p.vq, tok, p.row) + C);
        cp_async_chunk<D>(row + 6 * C, at_row<uint8_t>(p.vscale, tok, p.row));
      }
    }
    cp_async_commit();
  };
  int next = position(0);
#pragma unroll
  for (int i = 0; i < kAttStages - 1; ++i) {
    const int pos = next;
    next = position(i + 1);
    issue(i, pos);
  }
  for (int i = 0; i < n_tiles; ++i) {
    {
      const int pos = next;
      next = position(i + kAttStages);
      issue(i + kAttStages - 1, pos);
    }
    cp_async_wait<kAttStages - 1>();  // this lane's copies of tile i have landed
    __syncwarp();                     // and every lane's
    const int t0 = first + i * kAttWarps * 16;
    const uint8_t* tile = ring + (i % kAttStages) * TILE;
    float s[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const uint8_t* row = tile + (nt * 8 + g) * ROW;
      uint32_t km[D / 16], sg[D / 32], sz[D / 32];
      lds_words<D / 16, C>(row, km);
      lds_words<D / 32, C>(row + 2 * C, sg);
      lds_words<D / 32, C>(row + 3 * C, sz);
      float d0, d1;
      key_dots<D>(km, sg, sz, qa, qb, qd, d0, d1);
      const int c = t0 + nt * 8 + 2 * qd;
      s[nt][0] = c < hi ? d0 + bias : -INFINITY;
      s[nt][1] = c + 1 < hi ? d1 + bias : -INFINITY;
    }
    uint32_t pa, pb;
    st.softmax(s, pa, pb);
    uint32_t vw[4][D / 16], vs[4][D / 32];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const uint8_t* row = tile + ((r >> 1) * 8 + 2 * qd + (r & 1)) * ROW;
      lds_words<D / 16, C>(row + 4 * C, vw[r]);
      lds_words<D / 32, C>(row + 6 * C, vs[r]);
    }
    value_mmas<D>(vw, vs, g, pa, pb, st);
    __syncwarp();  // every lane is done with this stage before a later issue() overwrites it
  }
  cp_async_wait<0>();  // nothing in flight into shared memory when the block moves on
}

// The full-precision set: slots [0, F), those with fpos >= 0; keys and values of the model dtype as fp16.
template <typename T, int D>
__device__ __forceinline__ void full_tiles(const AttendParams& p, int64_t bh, const uint32_t (&qa)[D / 16],
                                           const uint32_t (&qb)[D / 16], WarpState<D>& st) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, qd = lane & 3;
  const T* fk = static_cast<const T*>(p.fk) + bh * p.F * D;
  const T* fv = static_cast<const T*>(p.fv) + bh * p.F * D;
  const int64_t* fpos = p.fpos + bh * p.F;
  for (int t0 = warp * 16; t0 < p.F; t0 += kAttWarps * 16) {
    float s[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int j = min(t0 + nt * 8 + g, p.F - 1);
      const T* kr = fk + static_cast<int64_t>(j) * D + 2 * qd;
      float d0 = 0.f, d1 = 0.f;
#pragma unroll
      for (int k = 0; k < D / 16; ++k)
        mma_rows8(d0, d1, qa[k], qb[k], pair_to_h2(kr + 16 * k), pair_to_h2(kr + 16 * k + 8));
      const int c = t0 + nt * 8 + 2 * qd;
      s[nt][0] = (c < p.F && fpos[c] >= 0) ? d0 : -INFINITY;
      s[nt][1] = (c + 1 < p.F && fpos[c + 1] >= 0) ? d1 : -INFINITY;
    }
    uint32_t pa, pb;
    st.softmax(s, pa, pb);
    const T* vr[4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
      vr[r] = fv + static_cast<int64_t>(min(t0 + (r >> 1) * 8 + 2 * qd + (r & 1), p.F - 1)) * D + g;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      mma_rows8(st.o[j][0], st.o[j][1], pa, pb, two_to_h2(vr[0] + 8 * j, vr[1] + 8 * j),
                two_to_h2(vr[2] + 8 * j, vr[3] + 8 * j));
  }
}

template <typename T, int D, bool ASYNC>
__global__ void __launch_bounds__(kAttWarps * 32, 3) attend_kernel(AttendParams p) {
  __shared__ __align__(16) uint8_t s_ring[ASYNC ? kAttWarps * kAttStages * 16 * 7 * (D / 8) : 16];
  __shared__ float s_o[kAttWarps][kAttMaxGroup][D];
  __shared__ float s_m[kAttWarps][kAttMaxGroup], s_l[kAttWarps][kAttMaxGroup];
  __shared__ float s_lse[kAttMaxGroup][kAttMaxParts];
  __shared__ int s_last;
  const int part = blockIdx.x, bhi = blockIdx.y, b = bhi / p.H, h = bhi % p.H;
  const int64_t bh = bhi;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, qd = lane & 3;
  const int Hq = p.H * p.group;
  const int n_sel = p.nsel ? min(*p.nsel, p.kmax) : p.n_sel;
  // this lane's query pairs for head g (zero for padding heads), scaled; the selected parts fold chmax in
  uint32_t qa[D / 16], qb[D / 16];
  float bias = 0.f;
  {
    const bool live = g < p.group;
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb + static_cast<int64_t>(h * p.group + (live ? g : 0)) * p.q_sh;
    const float* chm = p.chmax + bh * D;
    const float* mu = p.mu + bh * D;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      float2 v[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = 16 * k + 8 * half + 2 * qd;
        float x0 = live ? Vec<T>::to(q[c]) * p.qk_scale : 0.f, x1 = live ? Vec<T>::to(q[c + 1]) * p.qk_scale : 0.f;
        if (part > 0) {
          bias += x0 * mu[c] + x1 * mu[c + 1];
          x0 *= chm[c];
          x1 *= chm[c + 1];
        }
        v[half] = make_float2(x0, x1);
      }
      qa[k] = h2u(__float22half2_rn(v[0]));
      qb[k] = h2u(__float22half2_rn(v[1]));
    }
    bias += __shfl_xor_sync(kFull, bias, 1);
    bias += __shfl_xor_sync(kFull, bias, 2);
  }
  WarpState<D> st;
  st.init();
  if (part == 0) {
    full_tiles<T, D>(p, bh, qa, qb, st);
  } else {
    const int lo = (part - 1) * p.split, hi = min(lo + p.split, n_sel);
    if constexpr (ASYNC) {
      quant_tiles_async<D>(p, bh, lo, hi, qa, qb, bias, st, s_ring + warp * kAttStages * 16 * 7 * (D / 8));
    } else {
      quant_tiles<D>(p, bh, lo, hi, qa, qb, bias, st);
    }
  }
  // merge the warps: lane-partial l summed over the 4 lanes of a head
  st.l += __shfl_xor_sync(kFull, st.l, 1);
  st.l += __shfl_xor_sync(kFull, st.l, 2);
  if (g < p.group) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      s_o[warp][g][8 * j + 2 * qd] = st.o[j][0];
      s_o[warp][g][8 * j + 2 * qd + 1] = st.o[j][1];
    }
    if (qd == 0) {
      s_m[warp][g] = st.m;
      s_l[warp][g] = st.l;
    }
  }
  __syncthreads();
  const int64_t rows0 = static_cast<int64_t>(b) * Hq + h * p.group;  // first query head of this (b, h)
  for (int e = tid; e < p.group * D; e += blockDim.x) {
    const int hd = e / D, c = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttWarps; ++w) mx = fmaxf(mx, s_m[w][hd]);
    const float mu_ = mx == -INFINITY ? 0.f : mx;
    float o = 0.f, l = 0.f;
#pragma unroll
    for (int w = 0; w < kAttWarps; ++w) {
      const float a = exp2f(s_m[w][hd] - mu_);
      o += a * s_o[w][hd][c];
      l += a * s_l[w][hd];
    }
    const int64_t row = (rows0 + hd) * p.n_parts + part;
    p.part_o[row * D + c] = l > 0.f ? o / l : 0.f;
    if (c == 0) p.part_lse[row] = l > 0.f ? mu_ + log2f(l) : -INFINITY;  // an empty part weighs nothing
  }
  // the last part of this (b, h) to finish merges them all
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(&p.ctr[bh * kCounters], 1) == p.n_parts - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int e = tid; e < p.group * p.n_parts; e += blockDim.x) {  // weights exp2(lse - max) per head and part
    const int hd = e / p.n_parts, i = e % p.n_parts;
    s_lse[hd][i] = __ldcg(&p.part_lse[(rows0 + hd) * p.n_parts + i]);
  }
  __syncthreads();
  if (tid < p.group) {
    float mx = -INFINITY;
    for (int i = 0; i < p.n_parts; ++i) mx = fmaxf(mx, s_lse[tid][i]);
    s_m[0][tid] = mx == -INFINITY ? 0.f : mx;
  }
  __syncthreads();
  for (int e = tid; e < p.group * p.n_parts; e += blockDim.x) {
    const int hd = e / p.n_parts, i = e % p.n_parts;
    s_lse[hd][i] = exp2f(s_lse[hd][i] - s_m[0][hd]);  // an empty part (lse -inf) weighs 0
  }
  __syncthreads();
  // this thread's output entries: 4 consecutive channels of one head (float4 e = tid + 128 k), so one 16-byte load
  // per part and entry, 8 parts in flight: the tail of the step waits on about n_parts / 8 round trips to L2
  constexpr int E = kAttMaxGroup * D / 4 / (kAttWarps * 32);
  float4 o[E];
  float l[E];
#pragma unroll
  for (int k = 0; k < E; ++k) {
    o[k] = make_float4(0.f, 0.f, 0.f, 0.f);
    l[k] = 0.f;
  }
#pragma unroll 8
  for (int i = 0; i < p.n_parts; ++i) {
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int e = 4 * (tid + k * kAttWarps * 32);
      if (e < p.group * D) {
        const int hd = e / D, c = e % D;
        const float a = s_lse[hd][i];
        const float4 v = __ldcg(reinterpret_cast<const float4*>(p.part_o + ((rows0 + hd) * p.n_parts + i) * D + c));
        o[k].x += a * v.x;
        o[k].y += a * v.y;
        o[k].z += a * v.z;
        o[k].w += a * v.w;
        l[k] += a;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < E; ++k) {
    const int e = 4 * (tid + k * kAttWarps * 32);
    if (e < p.group * D) {
      const float w[4] = {o[k].x, o[k].y, o[k].z, o[k].w};
      T* out = static_cast<T*>(p.out) + rows0 * D + e;
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = Vec<T>::from(l[k] > 0.f ? w[j] / l[k] : 0.f);
    }
  }
  if (tid == 0) p.ctr[bh * kCounters] = 0;  // every part has counted: ready for the next step
}

// ------------------------------------------------------------------------------------------------------------------
// dispatch on dtype and head_dim

template <template <typename, int> class Fn, typename... Args>
cudaError_t dispatch(DType dt, int head_dim, Args&&... args) {
  if (head_dim != 64 && head_dim != 128) return cudaErrorInvalidValue;
  if (dt == DType::F16) {
    return head_dim == 64 ? Fn<__half, 64>::run(args...) : Fn<__half, 128>::run(args...);
  }
  return head_dim == 64 ? Fn<__nv_bfloat16, 64>::run(args...) : Fn<__nv_bfloat16, 128>::run(args...);
}

template <typename T, int D> struct PackLaunch {
  static cudaError_t run(const PackParams& p, cudaStream_t s) {
    if (p.n_tok <= 0) return cudaSuccess;
    const dim3 grid((p.n_tok + kPackTokens - 1) / kPackTokens, p.H, p.B);
    pack_kernel<T, D><<<grid, kPackWarps * 32, 0, s>>>(p);
    return cudaGetLastError();
  }
};

template <typename T, int D> struct AppendLaunch {
  static cudaError_t run(const AppendParams& p, cudaStream_t s) {
    append_kernel<T, D><<<dim3(p.H, p.B), 32, 0, s>>>(p);
    return cudaGetLastError();
  }
};

// Launch `kern` so that it may start while the previous kernel on the stream drains (it waits in the kernel).
template <typename P>
cudaError_t launch_dependent(void (*kern)(P), dim3 grid, dim3 block, size_t smem, cudaStream_t s, const P& p) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kern, p);
}

// Blocks per (b, h) for a scoring grid: one full wave when the tokens allow (a partial second wave would cost up to a
// whole block's time), at least min_tokens per block, at most max_tokens.
inline int blocks_per_bh(const void* kernel, int threads, size_t smem, int n, int bh, int min_tokens, int max_tokens) {
  int dev = 0, sms = 0, resident = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, smem);
  const int wave = max(1, (max(resident, 1) * sms) / bh);
  return max((n + max_tokens - 1) / max_tokens, max(1, min(wave, (n + min_tokens - 1) / min_tokens)));
}

inline void chunk_grid(SelectParams& p, int& nblocks) {
  nblocks = min(nblocks, kMaxChunks);
  p.chunk = (p.hi - p.lo + nblocks - 1) / nblocks;
  p.chunk = (p.chunk + 7) & ~7;  // select reads bins 8 at a time
  nblocks = (p.hi - p.lo + p.chunk - 1) / p.chunk;
}

// Blocks of `kernel` resident on the whole GPU at once.
inline int resident_blocks(const void* kernel, int threads, size_t smem) {
  int dev = 0, sms = 0, resident = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, smem);
  return resident * sms;
}

template <typename T, int D> struct SelectLaunch {
  static cudaError_t run(SelectParams p, int nblocks, cudaStream_t s) {
    if (p.k <= 0 || p.hi <= p.lo) return cudaSuccess;
    if (nblocks <= 0)
      nblocks = blocks_per_bh(reinterpret_cast<const void*>(score_kernel<T, D>), kSelThreads, 0, p.hi - p.lo,
                              p.B * p.H, 1024, 1 << 30);
    const int bh = p.B * p.H;
    const int wave = p.launches == 1 ? resident_blocks(reinterpret_cast<const void*>(select_kernel<T, D>),
                                                       kSelThreads, 0) / bh : 0;
    if (wave >= 1) {  // one launch: its blocks wait on each other, so all of them must be resident
      nblocks = min(nblocks, wave);
      chunk_grid(p, nblocks);
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeCooperative;  // the runtime refuses a grid that does not fit, never hangs
      attr[0].val.cooperative = 1;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(nblocks, p.H, p.B);
      cfg.blockDim = dim3(kSelThreads);
      cfg.stream = s;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      return cudaLaunchKernelEx(&cfg, select_kernel<T, D>, p);
    }
    chunk_grid(p, nblocks);
    const dim3 grid(nblocks, p.H, p.B);
    score_kernel<T, D><<<grid, kSelThreads, 0, s>>>(p);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    e = launch_dependent(count_kernel, grid, dim3(kSelThreads), 0, s, p);
    if (e != cudaSuccess) return e;
    return launch_dependent(place_kernel, grid, dim3(kSelThreads), 0, s, p);
  }
};

template <typename T, int D> struct AttendLaunch {
  static cudaError_t run(const AttendParams& p, cudaStream_t s) {
    if (p.group > kAttMaxGroup || p.n_parts > kAttMaxParts || p.n_parts < 1) return cudaErrorInvalidValue;
    const dim3 grid(p.n_parts, p.B * p.H);
    if (p.mode == 1) {
      attend_kernel<T, D, true><<<grid, kAttWarps * 32, 0, s>>>(p);
    } else {
      attend_kernel<T, D, false><<<grid, kAttWarps * 32, 0, s>>>(p);
    }
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t attend(const AttendParams& p, DType dt, int head_dim, cudaStream_t stream) {
  return dispatch<AttendLaunch>(dt, head_dim, p, stream);
}
cudaError_t pack(const PackParams& p, DType dt, int head_dim, cudaStream_t stream) {
  return dispatch<PackLaunch>(dt, head_dim, p, stream);
}
cudaError_t append(const AppendParams& p, DType dt, int head_dim, cudaStream_t stream) {
  return dispatch<AppendLaunch>(dt, head_dim, p, stream);
}
cudaError_t score_select(const SelectParams& p, DType dt, int head_dim, int nblocks, cudaStream_t stream) {
  return dispatch<SelectLaunch>(dt, head_dim, p, nblocks, stream);
}
}  // namespace si
