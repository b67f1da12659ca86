// Host emulation of what csrc/selfindex.cu's attend and select kernels use from CUDA, so that
// tests/test_selfindex_emulated.py runs those kernels' own source on the CPU: one std::thread per CUDA thread, one
// block at a time (emu_launch) or a whole grid at once (emu_grid: select_kernel's blocks wait on each other),
// __shared__ as function statics (block_shared<S>() as one S per block), shuffles, warp reductions and
// mma.sync.m16n8k16 (A rows 8-15 zero, the fragment layouts of the PTX ISA) through per-warp exchange buffers and
// barriers, fp16 as _Float16.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
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
inline Dim3 blockDim{128, 1, 1}, gridDim{1, 1, 1};
using std::min; using std::max;
// this thread's block and warp: their barriers and the warp's exchange buffer
struct WarpBuf { uint32_t u[32][6]; };
inline thread_local std::barrier<>* t_block_bar = nullptr;
inline thread_local std::barrier<>* t_warp_bar = nullptr;
inline thread_local WarpBuf* t_wb = nullptr;
inline thread_local int t_block = 0;  // linear block index within the grid
inline void __syncthreads() { t_block_bar->arrive_and_wait(); }
inline void __syncwarp() { t_warp_bar->arrive_and_wait(); }
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
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v) {
  return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
// csrc/selfindex.cu's load_volatile (a spin loop's read): an atomic load, and a yield so that the spinning thread
// leaves the cores to the blocks it waits on
inline unsigned long long load_volatile(const unsigned long long* p) {
  std::this_thread::yield(); return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
constexpr int kEmuMaxBlocks = 64;
template <typename S> inline S& block_shared() { static S s[kEmuMaxBlocks]; return s[t_block]; }
inline void prefetch_l2(const void*) {}
inline void allow_dependents() {}
inline void wait_for_predecessor() {}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float rintf(float x) { return std::nearbyint(x); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float fabsf(float x) { return std::fabs(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline float exp2f(float x) { return std::exp2(x); }
inline float log2f(float x) { return std::log2(x); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }

struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
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
inline int lane_id() { return threadIdx.x & 31; }
inline int warp_id() { return threadIdx.x >> 5; }
// every lane posts v, then reads lane src(l)'s (its own where src is out of the warp)
template <typename T, typename Src> inline T warp_exchange(T v, Src src) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  const int l = lane_id();
  std::memcpy(&t_wb->u[l][0], &v, 4);
  t_warp_bar->arrive_and_wait();
  const int from = src(l);
  T r; std::memcpy(&r, &t_wb->u[from >= 0 && from < 32 ? from : l][0], 4);
  t_warp_bar->arrive_and_wait();
  return r;
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int o) { return warp_exchange(v, [o](int l) { return l ^ o; }); }
template <typename T> inline T __shfl_up_sync(unsigned, T v, int o) { return warp_exchange(v, [o](int l) { return l - o; }); }
inline int __reduce_add_sync(unsigned, int v) {
  for (int o = 1; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
inline float h_lo(uint32_t u) { __half2 h; std::memcpy(&h, &u, 4); return (float)h.x.v; }
inline float h_hi(uint32_t u) { __half2 h; std::memcpy(&h, &u, 4); return (float)h.y.v; }
// mma.sync.m16n8k16 row.col f32.f16.f16.f32 with A rows 8-15 zero (PTX ISA fragment layouts)
inline void mma_rows8(float& d0, float& d1, uint32_t a_lo, uint32_t a_hi, uint32_t b0, uint32_t b1) {
  const int l = lane_id();
  uint32_t* mine = t_wb->u[l];
  mine[0] = a_lo; mine[1] = a_hi; mine[2] = b0; mine[3] = b1;
  t_warp_bar->arrive_and_wait();
  float A[8][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t >> 2, q = t & 3; const uint32_t* r = t_wb->u[t];
    A[g][2 * q] = h_lo(r[0]); A[g][2 * q + 1] = h_hi(r[0]); A[g][2 * q + 8] = h_lo(r[1]); A[g][2 * q + 9] = h_hi(r[1]);
    B[2 * q][g] = h_lo(r[2]); B[2 * q + 1][g] = h_hi(r[2]); B[2 * q + 8][g] = h_lo(r[3]); B[2 * q + 9][g] = h_hi(r[3]);
  }
  t_warp_bar->arrive_and_wait();
  const int g = l >> 2, q = l & 3;
  float s0 = 0.f, s1 = 0.f;
  for (int k = 0; k < 16; ++k) { s0 += A[g][k] * B[k][2 * q]; s1 += A[g][k] * B[k][2 * q + 1]; }
  d0 += s0; d1 += s1;
}

// One block of `threads` threads at blockIdx (x, y, z), each thread running kernel(p); its barriers and warp buffers
// live as long as the returned threads (join them).
struct EmuBlock {
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<WarpBuf> bufs;
  std::vector<std::thread> threads;
  template <typename P, typename K>
  EmuBlock(const P& p, K kernel, int n, Dim3 at, int linear) : bar(n), bufs(n / 32) {
    for (int w = 0; w < n / 32; ++w) warp_bars.push_back(std::make_unique<std::barrier<>>(32));
    for (int t = 0; t < n; ++t)
      threads.emplace_back([=, this, &p] {
        threadIdx.x = t; blockIdx = at; t_block = linear;
        t_block_bar = &bar; t_warp_bar = warp_bars[t / 32].get(); t_wb = &bufs[t / 32];
        kernel(p);
      });
  }
  void join() { for (auto& t : threads) t.join(); }
};

// a grid of (gx, gy, gz) blocks of n threads, one block at a time, or all at once
template <typename P, typename K>
void emu_grid(const P& p, K kernel, int gx, int gy, int gz, int n, bool concurrent) {
  blockDim = Dim3{n, 1, 1};
  gridDim = Dim3{gx, gy, gz};
  std::vector<std::unique_ptr<EmuBlock>> live;
  int linear = 0;
  for (int z = 0; z < gz; ++z)
    for (int y = 0; y < gy; ++y)
      for (int x = 0; x < gx; ++x, ++linear) {
        live.push_back(std::make_unique<EmuBlock>(p, kernel, n, Dim3{x, y, z}, linear % kEmuMaxBlocks));
        if (!concurrent) { live.back()->join(); live.clear(); }
      }
  for (auto& b : live) b->join();
}

// the attend kernel's block loop: every (b, h) and part in turn, 128 threads each
template <typename T, int D, typename P, typename K>
void emu_launch(const P& p, int n_parts, int bh, K kernel) {
  emu_grid(p, kernel, n_parts, bh, 1, 128, false);
}
