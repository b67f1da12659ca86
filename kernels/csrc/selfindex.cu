// Self-indexing 1-bit VQ cache kernels: pack, append, score-and-select, sparse split-KV decode attention.
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

template <typename T> struct Vec;
template <> struct Vec<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <> struct Vec<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

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
      quant2_store(kn, lane, active, p.kmag + tok * (D / 4), static_cast<__half2*>(p.kscale) + tok * (D / 32));
      if (active) load4(vb + t * p.v_st, vv);
      quant2_store(vv, lane, active, p.vq + tok * (D / 4), static_cast<__half2*>(p.vscale) + tok * (D / 32));
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
  float k[4] = {0.f, 0.f, 0.f, 0.f}, v[4] = {0.f, 0.f, 0.f, 0.f}, mu[4] = {0.f, 0.f, 0.f, 0.f};
  T* fk = static_cast<T*>(p.fk) + (static_cast<int64_t>(bh) * p.F + p.slot) * D + c0;
  T* fv = static_cast<T*>(p.fv) + (static_cast<int64_t>(bh) * p.F + p.slot) * D + c0;
  if (active) {
    load4(static_cast<const T*>(p.k1) + b * p.k_sb + h * p.k_sh + c0, k);
    load4(static_cast<const T*>(p.v1) + b * p.v_sb + h * p.v_sh + c0, v);
#pragma unroll
    for (int j = 0; j < 4; ++j) mu[j] = p.mu[bh * D + c0 + j];
  }
  const int64_t tok = static_cast<int64_t>(bh) * p.cap + p.pos;
  float kc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) kc[j] = __fsub_rn(k[j], mu[j]);
  store_signs(sign_nibble(kc), lane, active, p.signs + tok * (D / 8));
  if (p.kfull && active) {
    store4(static_cast<T*>(p.kfull) + tok * D + c0, k);
    store4(static_cast<T*>(p.vfull) + tok * D + c0, v);
  }
  if (p.old_pos >= 0 && p.inv_chmax) {  // the token leaving the window: 2-bit storage from its full-precision slot
    float ok[4] = {0.f, 0.f, 0.f, 0.f}, ov[4] = {0.f, 0.f, 0.f, 0.f};
    if (active) {
      load4(fk, ok);
      load4(fv, ov);
#pragma unroll
      for (int j = 0; j < 4; ++j) ok[j] = __fmul_rn(fabsf(__fsub_rn(ok[j], mu[j])), p.inv_chmax[bh * D + c0 + j]);
    }
    const int64_t otok = static_cast<int64_t>(bh) * p.cap + p.old_pos;
    quant2_store(ok, lane, active, p.kmag + otok * (D / 4), static_cast<__half2*>(p.kscale) + otok * (D / 32));
    quant2_store(ov, lane, active, p.vq + otok * (D / 4), static_cast<__half2*>(p.vscale) + otok * (D / 32));
  }
  __syncwarp();
  if (active) {
    store4(fk, k);
    store4(fv, v);
  }
  if (lane == 0) p.fpos[static_cast<int64_t>(bh) * p.F + p.slot] = p.pos;
}

// ------------------------------------------------------------------------------------------------------------------
// score: LUT on chip, one thread per token, shared histogram; the last block of each (b, h) finds the threshold bin

constexpr int kSelThreads = 256;

template <int D>
__device__ __forceinline__ int bin_of(int score) {
  constexpr int G = D / 4;
  constexpr int span = 254 * G + 1;
  constexpr int shift = span <= kNBins ? 0 : (span <= 2 * kNBins ? 1 : (span <= 4 * kNBins ? 2 : 3));
  return (score + 127 * G) >> shift;
}

template <typename T, int D>
__global__ void __launch_bounds__(kSelThreads) score_kernel(SelectParams p) {
  constexpr int G = D / 4;
  __shared__ float s_q[D];
  __shared__ float s_lut[G * 16];
  __shared__ int s_lut8[G * 16];
  __shared__ int s_hist[kNBins];
  __shared__ float s_red[kSelThreads / 32];
  __shared__ int s_last;
  const int b = blockIdx.z, h = blockIdx.y, bh = b * p.H + h, tid = threadIdx.x;

  // the GQA-mean query and its LUT, quantized to int8 with one scale (same arithmetic as lut8_ref)
  for (int d = tid; d < D; d += blockDim.x) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb + static_cast<int64_t>(h) * p.group * p.q_sh + d;
    float s = 0.f;
    for (int i = 0; i < p.group; ++i) s = __fadd_rn(s, Vec<T>::to(q[i * p.q_sh]));
    s_q[d] = __fdiv_rn(s, static_cast<float>(p.group));
  }
  for (int i = tid; i < kNBins; i += blockDim.x) s_hist[i] = 0;
  __syncthreads();
  const float* cb = p.cb + static_cast<int64_t>(bh) * G * 64;
  float amax = 0.f;
  for (int i = tid; i < G * 16; i += blockDim.x) {
    const int g = i >> 4;
    const float4 c = reinterpret_cast<const float4*>(cb)[i];
    float l = __fmul_rn(s_q[4 * g], c.x);
    l = __fadd_rn(l, __fmul_rn(s_q[4 * g + 1], c.y));
    l = __fadd_rn(l, __fmul_rn(s_q[4 * g + 2], c.z));
    l = __fadd_rn(l, __fmul_rn(s_q[4 * g + 3], c.w));
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

  // score this block's tokens
  const int t0 = p.lo + blockIdx.x * p.chunk;
  const int t1 = min(p.hi, t0 + p.chunk);
  const uint8_t* signs = p.signs + static_cast<int64_t>(bh) * p.cap * (D / 8);
  uint16_t* bins = p.bins + static_cast<int64_t>(bh) * p.bstride;
  const uint8_t* excl = p.excl ? p.excl + static_cast<int64_t>(bh) * p.excl_stride : nullptr;
  constexpr int U = 4;  // tokens in flight per thread: loads issued before any is used
  using Word = typename std::conditional<D == 128, uint4, uint2>::type;
  for (int t = t0 + tid; t < t1; t += U * blockDim.x) {
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
        bins[tt] = static_cast<uint16_t>(kExcluded);
        continue;
      }
      const uint32_t* words = reinterpret_cast<const uint32_t*>(&w[u]);
      int score = 0;
      if (p.ablate & 4) {
#pragma unroll
        for (int wi = 0; wi < D / 32; ++wi) score += __popc(words[wi]);
      } else {
#pragma unroll
        for (int wi = 0; wi < D / 32; ++wi)
#pragma unroll
          for (int n = 0; n < 8; ++n) score += s_lut8[(wi * 8 + n) * 16 + ((words[wi] >> (4 * n)) & 15)];
      }
      const int bin = bin_of<D>(score);
      if (!(p.ablate & 2)) bins[tt] = static_cast<uint16_t>(bin);
      if (!(p.ablate & 1)) atomicAdd(&s_hist[bin], 1);
    }
  }
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

  // last block: threshold bin = the highest bin B* with count(bins >= B*) >= k, from a suffix scan
  __threadfence();
  constexpr int per = kNBins / kSelThreads;  // bins per thread, thread 0 owns the highest
  int local[per];
  int mine = 0;
#pragma unroll
  for (int j = 0; j < per; ++j) {
    const int bin = kNBins - 1 - (tid * per + j);
    local[j] = __ldcg(&ghist[bin]);
    mine += local[j];
  }
  __shared__ int s_scan[kSelThreads];
  s_scan[tid] = mine;
  __syncthreads();
  for (int o = 1; o < kSelThreads; o <<= 1) {  // inclusive scan over threads (highest bins first)
    const int add = tid >= o ? s_scan[tid - o] : 0;
    __syncthreads();
    s_scan[tid] += add;
    __syncthreads();
  }
  const int before = s_scan[tid] - mine;
  if (tid == kSelThreads - 1 && s_scan[tid] < p.k) {  // fewer candidates than k (the caller prevents it): take all
    ctr[1] = -1;
    ctr[2] = s_scan[tid];
    ctr[3] = 0;
  }
  if (before < p.k && p.k <= s_scan[tid]) {
    int cum = before;
#pragma unroll
    for (int j = 0; j < per; ++j) {
      if (cum + local[j] >= p.k) {
        ctr[1] = kNBins - 1 - (tid * per + j);
        ctr[2] = cum;
        ctr[3] = p.k - cum;
        break;
      }
      cum += local[j];
    }
  }
  for (int i = tid; i < kNBins; i += blockDim.x) ghist[i] = 0;  // ready for the next step
  if (tid == 0) {
    ctr[0] = 0;
    ctr[4] = 0;
    ctr[5] = 0;
  }
}

// select: tokens above the threshold bin all go in; ties in the threshold bin fill what is left, in any order.
// Each thread reads 8 bins (16 bytes) at a time; one ballot per token slot, one atomic per warp and slot kind.
__global__ void __launch_bounds__(kSelThreads) select_kernel(SelectParams p) {
  const int b = blockIdx.z, h = blockIdx.y, bh = b * p.H + h;
  const int lane = threadIdx.x & 31;
  int* ctr = p.ctr + bh * kCounters;
  const int thr = __ldcg(&ctr[1]), n_gt = __ldcg(&ctr[2]), need_eq = __ldcg(&ctr[3]);
  const uint16_t* bins = p.bins + static_cast<int64_t>(bh) * p.bstride;
  int* out = p.idx + static_cast<int64_t>(bh) * p.kmax;
  const int t0 = p.lo + blockIdx.x * p.chunk;
  const int t1 = min(p.hi, t0 + p.chunk);
  const unsigned lt = (1u << lane) - 1;
  for (int base = t0 & ~7; base < t1; base += 8 * blockDim.x) {  // warp-uniform trip count for the ballots
    const int t = base + 8 * threadIdx.x;
    uint4 raw = make_uint4(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu);  // all kExcluded
    if (t < t1) raw = *reinterpret_cast<const uint4*>(bins + t);
    const uint16_t* v = reinterpret_cast<const uint16_t*>(&raw);
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int tt = t + u;
      const int bin = (tt >= t0 && tt < t1) ? static_cast<int>(v[u]) : kExcluded;
      const bool gt = bin != kExcluded && bin > thr;
      const bool eq = bin == thr;
      const unsigned mgt = __ballot_sync(kFull, gt), meq = __ballot_sync(kFull, eq);
      if (!(mgt | meq)) continue;
      int base_gt = 0, base_eq = 0;
      if (lane == 0) {
        if (mgt) base_gt = atomicAdd(&ctr[4], __popc(mgt));
        if (meq) base_eq = atomicAdd(&ctr[5], __popc(meq));
      }
      base_gt = __shfl_sync(kFull, base_gt, 0);
      base_eq = __shfl_sync(kFull, base_eq, 0);
      if (gt) out[base_gt + __popc(mgt & lt)] = tt;
      if (eq) {
        const int e = base_eq + __popc(meq & lt);
        if (e < need_eq) out[n_gt + e] = tt;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// sparse decode attention: 4 warps. Tiles of 32 tokens are staged in shared memory as float: warp w stages channels
// [w D/4, (w+1) D/4) of every token (lane = token: conflict-free rows), dequantizing 2+1 tokens on the way, while the
// next tile's raw bytes are already in flight in registers. Then warp w scores the tile for query heads w, w+4, ...
// (lane = token) and accumulates P.V (lane = channels lane + 32 i) with an online softmax.

constexpr int kAttWarps = 4;
constexpr int kTile = 32;
constexpr int kMaxHeadsPerWarp = 4;  // GQA groups up to 16 query heads per KV head

// What one thread stages for one token: a quarter of its key and value, raw.
template <int D>
struct Raw {
  static constexpr int Q4 = D / 4;
  uint4 k[Q4 / 8], v[Q4 / 8];  // full-precision rows (8 fp16/bf16 each)
  uint32_t sg;                 // Q4 sign bits
  uint2 km, vq;                // Q4 2-bit codes each (Q4 / 4 bytes)
  __half2 ksz, vsz;            // (scale, zero) of the 32-channel group
  int flag;                    // 0 masked, 1 plain key, 2 centred 2+1 key
};

template <typename T, int D, bool QUANT>
__device__ __forceinline__ void fetch(Raw<D>& r, const AttendParams& p, int bh, int j, int j_end, int c_lo) {
  constexpr int Q4 = D / 4;
  r.flag = 0;
  if (j >= j_end) return;
  const uint4* ks;
  const uint4* vs;
  if (j < p.F) {
    const int64_t slot = static_cast<int64_t>(bh) * p.F + j;
    if (p.fpos[slot] < 0) return;
    ks = reinterpret_cast<const uint4*>(static_cast<const T*>(p.fk) + slot * D + c_lo);
    vs = reinterpret_cast<const uint4*>(static_cast<const T*>(p.fv) + slot * D + c_lo);
  } else {
    const int64_t tok = static_cast<int64_t>(bh) * p.cap + p.idx[static_cast<int64_t>(bh) * p.kmax + (j - p.F)];
    if (QUANT) {
      r.flag = 2;
      const int grp = c_lo / 32;
      r.ksz = static_cast<const __half2*>(p.kscale)[tok * (D / 32) + grp];
      r.vsz = static_cast<const __half2*>(p.vscale)[tok * (D / 32) + grp];
      const uint8_t* sg = p.signs + tok * (D / 8) + c_lo / 8;
      const uint8_t* km = p.kmag + tok * (D / 4) + c_lo / 4;
      const uint8_t* vq = p.vq + tok * (D / 4) + c_lo / 4;
      if (Q4 == 32) {
        r.sg = *reinterpret_cast<const uint32_t*>(sg);
        r.km = *reinterpret_cast<const uint2*>(km);
        r.vq = *reinterpret_cast<const uint2*>(vq);
      } else {
        r.sg = *reinterpret_cast<const uint16_t*>(sg);
        r.km = make_uint2(*reinterpret_cast<const uint32_t*>(km), 0u);
        r.vq = make_uint2(*reinterpret_cast<const uint32_t*>(vq), 0u);
      }
      return;
    }
    ks = reinterpret_cast<const uint4*>(static_cast<const T*>(p.kfull) + tok * D + c_lo);
    vs = reinterpret_cast<const uint4*>(static_cast<const T*>(p.vfull) + tok * D + c_lo);
  }
  r.flag = 1;
#pragma unroll
  for (int i = 0; i < Q4 / 8; ++i) {
    r.k[i] = ks[i];
    r.v[i] = vs[i];
  }
}

template <typename T, int D>
__device__ __forceinline__ void stage(const Raw<D>& r, float* kr, float* vr, const float* chm) {
  constexpr int Q4 = D / 4;
  if (r.flag == 1) {
#pragma unroll
    for (int i = 0; i < Q4 / 8; ++i) {
      const T* ke = reinterpret_cast<const T*>(&r.k[i]);
      const T* ve = reinterpret_cast<const T*>(&r.v[i]);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        kr[8 * i + e] = Vec<T>::to(ke[e]);
        vr[8 * i + e] = Vec<T>::to(ve[e]);
      }
    }
  } else if (r.flag == 2) {
    const float ks = __low2float(r.ksz), kz = __high2float(r.ksz);
    const float vs = __low2float(r.vsz), vz = __high2float(r.vsz);
    const uint32_t km[2] = {r.km.x, r.km.y}, vq[2] = {r.vq.x, r.vq.y};
#pragma unroll
    for (int c = 0; c < Q4; ++c) {
      const float code_k = static_cast<float>((km[c / 16] >> (2 * (c % 16))) & 3);
      const float code_v = static_cast<float>((vq[c / 16] >> (2 * (c % 16))) & 3);
      const float mag = (kz + ks * code_k) * chm[c];
      kr[c] = ((r.sg >> c) & 1) ? mag : -mag;
      vr[c] = vz + vs * code_v;
    }
  } else {  // a masked row still enters P.V with weight 0: it must not hold NaN garbage
#pragma unroll
    for (int c = 0; c < Q4; ++c) {
      kr[c] = 0.f;
      vr[c] = 0.f;
    }
  }
}

template <typename T, int D, bool QUANT>
__global__ void __launch_bounds__(kAttWarps * 32) attend_kernel(AttendParams p) {
  constexpr int C = D / 32;  // channels per lane in P.V
  constexpr int Q4 = D / 4;  // channels a warp stages
  extern __shared__ float smem[];
  float* s_q = smem;                              // [group][D], pre-scaled
  float* s_k = s_q + p.group * D;                 // [kTile][D + 1]
  float* s_v = s_k + kTile * (D + 1);             // [kTile][D]
  float* s_chm = s_v + kTile * D;                 // [D]
  float* s_bias = s_chm + D;                      // [16]
  int* s_flag = reinterpret_cast<int*>(s_bias + 16);  // [kTile]
  __shared__ int s_last;
  const int b = blockIdx.z, h = blockIdx.y, split = blockIdx.x, bh = b * p.H + h;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_total = p.F + p.k;
  const int j_begin = split * p.split;
  const int j_end = min(n_total, j_begin + p.split);
  const int c_lo = warp * Q4;  // staging: this warp's channels; lane = token of the tile

  Raw<D> next;
  fetch<T, D, QUANT>(next, p, bh, j_begin + lane, j_end, c_lo);  // first tile's bytes in flight during the setup
  for (int i = tid; i < p.group * D; i += blockDim.x) {
    const int hh = i / D, d = i % D;
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb + static_cast<int64_t>(h * p.group + hh) * p.q_sh + d;
    s_q[i] = Vec<T>::to(*q) * p.scale;
  }
  if (QUANT)
    for (int d = tid; d < D; d += blockDim.x) s_chm[d] = p.chmax[bh * D + d];
  __syncthreads();
  if (QUANT) {  // q . mu per head: the centred 2+1 keys lack it
    for (int hh = warp; hh < p.group; hh += kAttWarps) {
      float a = 0.f;
      for (int d = lane; d < D; d += 32) a += s_q[hh * D + d] * p.mu[bh * D + d];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(kFull, a, o);
      if (lane == 0) s_bias[hh] = a;
    }
  }

  float m[kMaxHeadsPerWarp], l[kMaxHeadsPerWarp], acc[kMaxHeadsPerWarp][C];
#pragma unroll
  for (int r = 0; r < kMaxHeadsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = 0.f;
  }

  for (int tile = j_begin; tile < j_end; tile += kTile) {
    stage<T, D>(next, s_k + lane * (D + 1) + c_lo, s_v + lane * D + c_lo, s_chm + c_lo);
    if (warp == 0) s_flag[lane] = next.flag;
    if (tile + kTile < j_end) fetch<T, D, QUANT>(next, p, bh, tile + kTile + lane, j_end, c_lo);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kMaxHeadsPerWarp; ++r) {
      const int hh = warp + r * kAttWarps;
      if (hh >= p.group) break;
      const int flag = s_flag[lane];
      float s = -INFINITY;
      if (flag) {
        const float* qr = s_q + hh * D;
        const float* kr = s_k + lane * (D + 1);
        float a = 0.f;
#pragma unroll 16
        for (int d = 0; d < D; ++d) a += qr[d] * kr[d];
        s = flag == 2 ? a + s_bias[hh] : a;
      }
      float tmax = s;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(kFull, tmax, o));
      const float m_new = fmaxf(m[r], tmax);
      if (m_new == -INFINITY) continue;  // nothing attended yet
      const float corr = __expf(m[r] - m_new);
      const float pr = __expf(s - m_new);
      float psum = pr;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) psum += __shfl_xor_sync(kFull, psum, o);
      l[r] = l[r] * corr + psum;
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < C; ++c) acc[r][c] *= corr;
#pragma unroll 8
      for (int t = 0; t < kTile; ++t) {
        const float pt = __shfl_sync(kFull, pr, t);
        const float* vr = s_v + t * D + lane;
#pragma unroll
        for (int c = 0; c < C; ++c) acc[r][c] += pt * vr[32 * c];
      }
    }
    __syncthreads();
  }

  // ---- one split: write the output; several: write partials, the last block of this (b, h) combines them
  const int hq0 = h * p.group;
  if (p.nsplit == 1) {
#pragma unroll
    for (int r = 0; r < kMaxHeadsPerWarp; ++r) {
      const int hh = warp + r * kAttWarps;
      if (hh >= p.group) break;
      T* o = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.H * p.group + hq0 + hh) * D;
#pragma unroll
      for (int c = 0; c < C; ++c) o[lane + 32 * c] = Vec<T>::from(acc[r][c] / l[r]);
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < kMaxHeadsPerWarp; ++r) {
    const int hh = warp + r * kAttWarps;
    if (hh >= p.group) break;
    const int64_t row = (static_cast<int64_t>(b) * p.H * p.group + hq0 + hh) * p.nsplit + split;
#pragma unroll
    for (int c = 0; c < C; ++c) p.part_o[row * D + lane + 32 * c] = acc[r][c];
    if (lane == 0) {
      p.part_ml[row * 2] = m[r];
      p.part_ml[row * 2 + 1] = l[r];
    }
  }
  __threadfence();
  __syncthreads();
  int* ctr = p.ctr + bh * kCounters + 6;
  if (tid == 0) s_last = atomicAdd(ctr, 1) == p.nsplit - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int hh = warp; hh < p.group; hh += kAttWarps) {
    const int64_t row0 = (static_cast<int64_t>(b) * p.H * p.group + hq0 + hh) * p.nsplit;
    float M = -INFINITY;
    for (int s = 0; s < p.nsplit; ++s) M = fmaxf(M, __ldcg(&p.part_ml[(row0 + s) * 2]));
    float L = 0.f, o[C];
#pragma unroll
    for (int c = 0; c < C; ++c) o[c] = 0.f;
    for (int s = 0; s < p.nsplit; ++s) {
      const float ms = __ldcg(&p.part_ml[(row0 + s) * 2]);
      if (ms == -INFINITY) continue;
      const float w = __expf(ms - M);
      L += __ldcg(&p.part_ml[(row0 + s) * 2 + 1]) * w;
#pragma unroll
      for (int c = 0; c < C; ++c) o[c] += __ldcg(&p.part_o[(row0 + s) * D + lane + 32 * c]) * w;
    }
    T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.H * p.group + hq0 + hh) * D;
#pragma unroll
    for (int c = 0; c < C; ++c) out[lane + 32 * c] = Vec<T>::from(o[c] / L);
  }
  if (tid == 0) *ctr = 0;
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

template <typename T, int D> struct SelectLaunch {
  static cudaError_t run(SelectParams p, int nblocks, cudaStream_t s) {
    if (p.k <= 0 || p.hi <= p.lo) return cudaSuccess;
    if (nblocks <= 0) {  // one full wave: a partial second wave would cost up to a whole block's time
      static int resident = 0, sms = 0;
      if (!resident) {
        int dev = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, score_kernel<T, D>, kSelThreads, 0);
        resident = resident > 0 ? resident : 1;
      }
      const int n = p.hi - p.lo, bh = p.B * p.H;
      nblocks = max(1, min((resident * sms) / bh, (n + 1023) / 1024));
    }
    p.chunk = (p.hi - p.lo + nblocks - 1) / nblocks;
    p.chunk = (p.chunk + 7) & ~7;  // select reads bins 8 at a time
    nblocks = (p.hi - p.lo + p.chunk - 1) / p.chunk;
    const dim3 grid(nblocks, p.H, p.B);
    score_kernel<T, D><<<grid, kSelThreads, 0, s>>>(p);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || (p.ablate & 8)) return e;
    select_kernel<<<grid, kSelThreads, 0, s>>>(p);
    return cudaGetLastError();
  }
};

template <typename T, int D> struct AttendLaunch {
  static cudaError_t run(const AttendParams& p, bool quantized, cudaStream_t s) {
    const size_t smem = sizeof(float) * (p.group * D + kTile * (D + 1) + kTile * D + D + 16) + sizeof(int) * kTile;
    const dim3 grid(p.nsplit, p.H, p.B);
    auto kern = quantized ? attend_kernel<T, D, true> : attend_kernel<T, D, false>;
    if (smem > 48 * 1024) {
      cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    kern<<<grid, kAttWarps * 32, smem, s>>>(p);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t pack(const PackParams& p, DType dt, int head_dim, cudaStream_t stream) {
  return dispatch<PackLaunch>(dt, head_dim, p, stream);
}
cudaError_t append(const AppendParams& p, DType dt, int head_dim, cudaStream_t stream) {
  return dispatch<AppendLaunch>(dt, head_dim, p, stream);
}
cudaError_t score_select(const SelectParams& p, DType dt, int head_dim, int nblocks, cudaStream_t stream) {
  return dispatch<SelectLaunch>(dt, head_dim, p, nblocks, stream);
}
cudaError_t attend(const AttendParams& p, DType dt, int head_dim, bool quantized, cudaStream_t stream) {
  if (p.group > 4 * kMaxHeadsPerWarp) return cudaErrorInvalidValue;
  return dispatch<AttendLaunch>(dt, head_dim, p, quantized, stream);
}

}  // namespace si
