// Host emulation of what csrc/selfindex.cu's attend_kernel uses from CUDA, so that tests/test_selfindex_emulated.py
// runs that kernel's own source on the CPU: one block at a time, one std::thread per CUDA thread, __shared__ as
// function statics, shuffles and mma.sync.m16n8k16 (A rows 8-15 zero, the fragment layouts of the PTX ISA) through
// per-warp exchange buffers and barriers, fp16 as _Float16.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <thread>
#include <type_traits>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#ifndef INFINITY
#define INFINITY (__builtin_inff())
#endif
struct Dim3 { int x = 0, y = 0, z = 0; };
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim{128, 1, 1};
using std::min; using std::max;
inline std::barrier<>* g_block_bar = nullptr;
inline std::barrier<>* g_warp_bar[4] = {nullptr, nullptr, nullptr, nullptr};
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline void __syncwarp() { g_warp_bar[threadIdx.x >> 5]->arrive_and_wait(); }
// cp.async: copies wait in per-thread groups and land only when a wait_group lets their group complete, so a tile
// read before its wait (a wrong group count) reads stale shared memory
struct EmuCopy { void* dst; const void* src; int n; };
inline thread_local std::vector<std::vector<EmuCopy>> t_groups;
inline thread_local std::vector<EmuCopy> t_open;
template <int D> inline void cp_async_chunk(void* smem, const void* gmem) { t_open.push_back({smem, gmem, D / 8}); }
inline void cp_async_commit() { t_groups.push_back(std::move(t_open)); t_open.clear(); }
template <int N> inline void cp_async_wait() {
  while (t_groups.size() > static_cast<size_t>(N)) {
    for (const EmuCopy& c : t_groups.front()) std::memcpy(c.dst, c.src, c.n);
    t_groups.erase(t_groups.begin());
  }
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline float exp2f(float x) { return std::exp2(x); }
inline float log2f(float x) { return std::log2(x); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }

struct float2 { float x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
// fp16 / bf16
struct __half { _Float16 v; };
struct __half2 { __half x, y; };
struct __nv_bfloat16 { uint16_t v; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = (uint32_t)b.v << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return __nv_bfloat16{(uint16_t)(u >> 16)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return {__bfloat162float(b.x), __bfloat162float(b.y)}; }
inline __half2 __float22half2_rn(float2 f) { return {__float2half_rn(f.x), __float2half_rn(f.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __low2half2(__half2 h) { return {h.x, h.x}; }
inline __half2 __high2half2(__half2 h) { return {h.y, h.y}; }
inline __half2 __hsub2(__half2 a, __half2 b) {
  return {__half{(_Float16)((float)a.x.v - (float)b.x.v)}, __half{(_Float16)((float)a.y.v - (float)b.y.v)}}; }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return {__half{(_Float16)std::fma((float)a.x.v, (float)b.x.v, (float)c.x.v)},
          __half{(_Float16)std::fma((float)a.y.v, (float)b.y.v, (float)c.y.v)}}; }
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  uint8_t b[8]; std::memcpy(b, &x, 4); std::memcpy(b + 4, &y, 4);
  uint32_t r = 0; for (int i = 0; i < 4; ++i) r |= (uint32_t)b[(s >> (4 * i)) & 7] << (8 * i); return r; }
// warp exchange
struct WarpBuf { uint32_t u[32][6]; };
inline WarpBuf g_wb[4];
inline int lane_id() { return threadIdx.x & 31; }
inline int warp_id() { return threadIdx.x >> 5; }
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int o) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  const int w = warp_id(), l = lane_id();
  std::memcpy(&g_wb[w].u[l][0], &v, 4);
  g_warp_bar[w]->arrive_and_wait();
  T r; std::memcpy(&r, &g_wb[w].u[l ^ o][0], 4);
  g_warp_bar[w]->arrive_and_wait();
  return r;
}
inline float h_lo(uint32_t u) { __half2 h; std::memcpy(&h, &u, 4); return (float)h.x.v; }
inline float h_hi(uint32_t u) { __half2 h; std::memcpy(&h, &u, 4); return (float)h.y.v; }
// mma.sync.m16n8k16 row.col f32.f16.f16.f32 with A rows 8-15 zero (PTX ISA fragment layouts)
inline void mma_rows8(float& d0, float& d1, uint32_t a_lo, uint32_t a_hi, uint32_t b0, uint32_t b1) {
  const int w = warp_id(), l = lane_id();
  uint32_t* mine = g_wb[w].u[l];
  mine[0] = a_lo; mine[1] = a_hi; mine[2] = b0; mine[3] = b1;
  g_warp_bar[w]->arrive_and_wait();
  float A[8][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t >> 2, q = t & 3; const uint32_t* r = g_wb[w].u[t];
    A[g][2 * q] = h_lo(r[0]); A[g][2 * q + 1] = h_hi(r[0]); A[g][2 * q + 8] = h_lo(r[1]); A[g][2 * q + 9] = h_hi(r[1]);
    B[2 * q][g] = h_lo(r[2]); B[2 * q + 1][g] = h_hi(r[2]); B[2 * q + 8][g] = h_lo(r[3]); B[2 * q + 9][g] = h_hi(r[3]);
  }
  g_warp_bar[w]->arrive_and_wait();
  const int g = l >> 2, q = l & 3;
  float s0 = 0.f, s1 = 0.f;
  for (int k = 0; k < 16; ++k) { s0 += A[g][k] * B[k][2 * q]; s1 += A[g][k] * B[k][2 * q + 1]; }
  d0 += s0; d1 += s1;
}

// the block loop: every (b, h) and part in turn, 128 threads each
template <typename T, int D, typename P, typename K>
void emu_launch(const P& p, int n_parts, int bh, K kernel) {
  std::barrier<> bb(128), wb0(32), wb1(32), wb2(32), wb3(32);
  g_block_bar = &bb; g_warp_bar[0] = &wb0; g_warp_bar[1] = &wb1; g_warp_bar[2] = &wb2; g_warp_bar[3] = &wb3;
  for (int y = 0; y < bh; ++y)
    for (int x = 0; x < n_parts; ++x) {
      std::vector<std::thread> th;
      for (int t = 0; t < 128; ++t)
        th.emplace_back([&, t] { threadIdx.x = t; blockIdx.x = x; blockIdx.y = y; kernel(p); });
      for (auto& t : th) t.join();
    }
}
