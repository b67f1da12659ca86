// Exact top-k of fp32 rows (kernels/topk_select.py's topk_ref): the indices of the k largest scores of each row in
// ascending order, ties to the lower index, columns k .. kmax-1 zeroed; k from the host or from a device int (a
// captured step's budget). -0 and +0 are equal. One block per row:
// - a radix select over the scores' 32-bit keys (order-preserving: sign flipped, or all bits for negatives) in three
//   rounds of 11, 11 and 10 bits, each a 2048-bin histogram in shared memory of the keys that match the digits found
//   so far (read from global memory each round, kUnroll loads in flight a thread: a 32K-token row is 128 KB, in L2
//   after the score kernel wrote it);
//   lanes of a warp that fall in the same bin add once (__match_any_sync), since the first round's hot bins are few;
// - the threshold digit from a block scan of the bins' counts (each thread owns 2048 / NT consecutive bins);
// - one ordered pass in tiles of NT elements: a warp scan and a block scan of (above the threshold, equal to it)
//   pairs give each taken index its output column directly (the keys above it before it, plus its ties before it
//   capped at the ties needed), so the list comes out in index order with no sort.
// Opt-in (KVBENCH_TOPK=cuda) until timed on a GPU. Why not the Triton split path: six launches of 4096-element
// pieces with 256-bin tl.histogram rounds took 90 us for 64 rows of 32K on an H100 (doublesparse's select stage at
// 32K x 8, 1.9x its attend); one block per row needs one launch and reads a row four times, from L2.
// Raw pointers only (no torch headers); kernels/topk_select.py loads it with ctypes. tests/test_topk_emulated.py runs
// this source on the CPU (KVBENCH_EMU, tests/topk_emu.h).
#ifdef KVBENCH_EMU
#include "topk_emu.h"
#else
#include <cuda_runtime.h>
#endif
#include <stdint.h>

namespace topk {

struct Params {
  const float* scores;   // [R, N] rows at s_row elements, last dim contiguous
  int* out;              // int32 [R, kmax] rows at o_row elements
  const void* k_dev;     // a device int32 or int64 (k_is_64) holding k, or null: k_host
  int64_t s_row, o_row;
  int R, N, kmax, k_host, k_is_64;
};

constexpr int kBins = 2048;                   // 11-bit digits
// keys loaded per thread before any is used: with one load in flight a 1024-thread block keeps 4 KB in flight, so a
// pass over a row from L2 (~600 cycles away) would run at ~12 GB/s per SM; eight make it ~100 GB/s
constexpr int kUnroll = 8;
constexpr unsigned kFull = 0xffffffffu;

namespace {

__device__ __forceinline__ uint32_t key_of(float x) {
  const uint32_t b = x == 0.f ? 0u : __float_as_uint(x);  // -0 ties +0, as in the reference's sort
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// inclusive scan of v over the warp
__device__ __forceinline__ int warp_scan(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += u;
  }
  return v;
}

// Exclusive prefix of v over the block's threads in thread order, and the block total. s_warp [NT / 32] scratch.
// Barriers inside: every thread must call it.
template <int NT>
__device__ __forceinline__ int block_exclusive(int v, int* s_warp, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int inc = warp_scan(v);
  if (lane == 31) s_warp[warp] = inc;
  __syncthreads();
  int before = 0, all = 0;
#pragma unroll 4
  for (int w = 0; w < NT / 32; ++w) {
    const int t = s_warp[w];
    before += w < warp ? t : 0;
    all += t;
  }
  __syncthreads();  // s_warp may be written again by the next call
  total = all;
  return before + inc - v;
}

struct Shared {
  int hist[kBins];
  int warp[32];
  int tile[2][32];
  int found[2];  // the threshold digit, the keys equal to it (on the digits so far) still needed
};

}  // namespace

template <int NT>
__global__ void __launch_bounds__(NT) topk_kernel(Params p) {
#ifdef KVBENCH_EMU
  Shared& s = block_shared<Shared>();
#else
  __shared__ Shared s;
#endif
  const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* x = p.scores + row * p.s_row;
  int* out = p.out + row * p.o_row;
  int k = p.k_host;
  if (p.k_dev) k = p.k_is_64 ? (int)*static_cast<const long long*>(p.k_dev) : *static_cast<const int*>(p.k_dev);
  k = k < 0 ? 0 : (k > p.N ? p.N : k);
  for (int c = k + tid; c < p.kmax; c += NT) out[c] = 0;
  if (k == 0) return;

  uint32_t prefix = 0;  // the digits of the k-th largest key found so far
  int need = k;         // keys matching prefix still to be taken
  for (int r = 0; r < 3; ++r) {
    for (int b = tid; b < kBins; b += NT) s.hist[b] = 0;
    __syncthreads();
    const int shift = r == 0 ? 21 : r == 1 ? 10 : 0, width = r == 2 ? 10 : 11;  // digit r: bits [shift, shift + width)
    const int hi = shift + width;  // keys must match prefix on bits >= hi
    for (int base = 0; base < p.N; base += NT * kUnroll) {
      uint32_t u[kUnroll];
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const int i = base + j * NT + tid;
        u[j] = i < p.N ? key_of(__ldg(x + i)) : 0u;
      }
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        bool live = base + j * NT + tid < p.N;
        if (hi < 32) live = live && ((u[j] ^ prefix) >> hi) == 0;
        const int bin = live ? (int)((u[j] >> shift) & ((1u << width) - 1)) : -1;
        // one add per distinct bin of the warp (base + j * NT is warp-uniform: every lane takes part)
        const unsigned peers = __match_any_sync(kFull, bin);
        if (live && lane == __ffs(peers) - 1) atomicAdd(&s.hist[bin], __popc(peers));
      }
    }
    __syncthreads();
    // the highest digit d with count(digits >= d) >= need: thread t owns bins [t * per, (t + 1) * per)
    constexpr int per = kBins / NT;
    int mine = 0;
#pragma unroll
    for (int j = 0; j < per; ++j) mine += s.hist[tid * per + j];
    int total;
    const int before = block_exclusive<NT>(mine, s.warp, total);
    int above = total - before - mine;  // keys in bins past this thread's
    for (int j = per - 1; j >= 0; --j) {
      const int c = s.hist[tid * per + j];
      if (above < need && above + c >= need) {
        s.found[0] = tid * per + j;
        s.found[1] = need - above;
      }
      above += c;
    }
    __syncthreads();
    prefix |= (uint32_t)s.found[0] << shift;
    need = s.found[1];
    __syncthreads();  // s.found and s.hist are rewritten next round
  }

  // the ordered pass: (keys above prefix, keys equal) packed as 16-bit halves of one int (a tile has < 65536)
  int run_gt = 0, run_eq = 0;
  for (int base = 0, t = 0; base < p.N; base += NT * kUnroll) {
    uint32_t u[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int i = base + j * NT + tid;
      u[j] = i < p.N ? key_of(__ldg(x + i)) : 0u;
    }
    for (int j = 0; j < kUnroll && base + j * NT < p.N; ++j, t ^= 1) {  // tiles of NT, in index order
      const int i = base + j * NT + tid;
      const bool gt = i < p.N && u[j] > prefix, eq = i < p.N && u[j] == prefix;
      const int v = (int)gt | ((int)eq << 16);
      const int inc = warp_scan(v);
      if (lane == 31) s.tile[t][warp] = inc;
      __syncthreads();  // one barrier a tile: tile t's buffer is rewritten two tiles later, after the next barrier
      int before = 0, all = 0;
#pragma unroll 4
      for (int w = 0; w < NT / 32; ++w) {
        const int c = s.tile[t][w];
        before += w < warp ? c : 0;
        all += c;
      }
      const int ex = before + inc - v;
      const int gt_before = run_gt + (ex & 0xffff), eq_before = run_eq + (ex >> 16);
      if (gt || (eq && eq_before < need)) out[gt_before + (eq_before < need ? eq_before : need)] = i;
      run_gt += all & 0xffff;
      run_eq += all >> 16;
    }
  }
}

}  // namespace topk

#ifndef KVBENCH_EMU
namespace {
constexpr int kThreads = 1024;
}

extern "C" int topk_select(const topk::Params* p, void* stream) {
  if (p->R <= 0) return 0;
  topk::topk_kernel<kThreads><<<p->R, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(*p);
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* topk_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
#endif
