// Self-indexing 1-bit VQ cache: launch parameters and launchers shared by selfindex.cu (the kernels, no torch
// headers) and selfindex_binding.cpp (shape checks and dispatch). Layouts are documented in kernels/selfindex.py.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

namespace si {

constexpr int kNBins = 2048;          // histogram bins of the integer LUT score
constexpr int kExcluded = 0xFFFF;     // bin value of a token excluded from selection
constexpr int kCounters = 8;          // int32 counters per (batch, KV head) in the workspace, see SelectParams
constexpr int kMaxChunks = 1024;      // score/select blocks per (batch, KV head) at most (the counts workspace)

// A step plan: what a CUDA-graph-captured decode step would otherwise pass from the host, in device memory (int32):
// plan[0] the new token's position, [1] its full-precision slot, [2] the position leaving the window (-1: none),
// [3] the end of the selectable range (hi), [4] how many tokens to select (k). kernels/selfindex.py writes one row
// of a table made at reserve() into it before each step, so the launches themselves never change.
constexpr int kPlan = 5;

enum class DType : int { F16 = 0, BF16 = 1 };

// Centre + sign bits (+ 2-bit magnitudes and values for positions in [qlo, qhi)) of n_tok tokens written at
// positions pos0.., and codebook accumulation when cb_sum is set (prefill).
struct PackParams {
  const void* k; const void* v;                 // [B, H, n_tok, D] with element strides below, last dim contiguous
  int64_t k_sb, k_sh, k_st, v_sb, v_sh, v_st;
  const float* mu;                              // [B, H, D]
  const float* inv_chmax;                       // [B, H, D]; null: 16+1, no quantization
  uint8_t* signs;                               // [B, H, cap, D/8]
  uint8_t* kmag; void* kscale;                  // [B, H, cap, D/4], [B, H, cap, D/32] half2 (scale, zero), token
  uint8_t* vq; void* vscale;                    // stride `row` (kernels/selfindex.py interleaves them in one row)
  float* cb_sum; int* cb_cnt; float* cb_abs;    // [B, H, G, 16, 4], [B, H, G, 16], [B, H, G]; null: no codebook
  int B, H, n_tok, cap, pos0, qlo, qhi;
  int64_t row;                                  // bytes from one token to the next in kmag, kscale, vq and vscale
};

// One decode step's append: signs (and fp16 K/V for 16+1) of the new token at `pos`, the token leaving the window
// (at `old_pos`, read from full-precision slot `slot`) quantized, then the new token written into that slot.
struct AppendParams {
  const void* k1; const void* v1;               // [B, H, D] with element strides below
  int64_t k_sb, k_sh, v_sb, v_sh;
  const float* mu; const float* inv_chmax;      // inv_chmax null: 16+1
  uint8_t* signs; uint8_t* kmag; void* kscale; uint8_t* vq; void* vscale;
  void* kfull; void* vfull;                     // [B, H, cap, D] (16+1) or null
  void* fk; void* fv; int64_t* fpos;            // [B, H, F, D], [B, H, F]
  int B, H, F, cap, pos, slot, old_pos;         // old_pos < 0: nothing leaves the window
  const int* plan;                              // device step plan (pos, slot, old_pos from it), or null: the above
  int64_t row;                                  // bytes from one token to the next in kmag, kscale, vq and vscale
};

// Score every selectable token of [lo, hi) with the int8 LUT of the GQA-mean query, histogram the bins, and (last
// block per (b, h)) find the threshold bin; then write the indices of the top k tokens: those above the threshold bin
// in position order, then the lowest positions of the threshold bin (deterministic: the same bins give the same list).
// Counters per (b, h): 0 blocks done, 1 threshold bin, 2 tokens strictly above it, 3 taken from the threshold bin,
// 4-5 the threshold as one flagged 64-bit word and 6 blocks done with it (the one-launch select_kernel), 7 attention
// parts done (selfindex_attend.py). Counters 0, 4-6 and 7 are zero between calls; the workspace is 8-byte aligned.
struct SelectParams {
  const void* q; int64_t q_sb, q_sh;            // [B, Hq, D]
  const float* cb;                              // [B, H, G, 16, 4]
  const uint8_t* signs;                         // [B, H, cap, D/8]
  const uint8_t* excl; int excl_stride;         // [B, H, excl_stride] bitmap of excluded positions, or null
  int B, H, group, cap, lo, hi, k, chunk;       // chunk: tokens per block
  uint16_t* bins; int bstride;                  // workspace [B, H, bstride], bstride >= cap, a multiple of 8
  int* hist;                                    // workspace [B, H, kNBins], zero between calls
  int* ctr;                                     // workspace [B, H, kCounters], zero between calls
  int* idx; int kmax;                           // out [B, H, kmax]: positions of the selected tokens
  int* counts;                                  // workspace [B, H, kMaxChunks, 2]: tokens above / in the threshold bin
                                                // (select_kernel: one 64-bit word per chunk, see there)
  const int* plan;                              // device step plan (hi, k from it; hi, k above are their maxima)
  int launches;                                 // 1: one launch when the grid fits in one wave; 3: score, count, place
};

// Sparse decode attention of 2+1 storage: the full-precision set (part 0) and the selected tokens (parts 1..: `split`
// of the list each), dequantized in registers straight into tensor-core fragments; each part writes its normalized
// output and log2-sum-exp2, the last part of a (b, h) to finish merges them into out. group <= kAttMaxGroup.
constexpr int kAttMaxGroup = 8;
constexpr int kAttMaxParts = 128;
struct AttendParams {
  const void* q; int64_t q_sb, q_sh;            // [B, Hq, D], last dim contiguous
  const void* fk; const void* fv;               // [B, H, F, D]
  const int64_t* fpos;                          // [B, H, F]: position in each slot, < 0 empty
  const int* idx; int kmax;                     // [B, H, kmax] selected positions
  const uint8_t* signs; const uint8_t* kmag; const void* kscale; const uint8_t* vq; const void* vscale;
  const float* chmax; const float* mu;          // [B, H, D]
  float* part_o; float* part_lse;               // workspace [B * Hq * n_parts, D], [B * Hq * n_parts]
  void* out;                                    // [B, Hq, D] contiguous
  int* ctr;                                     // finished parts per (b, h), stride kCounters, zero between calls
  const int* nsel;                              // device selection size (planned steps), or null: n_sel
  int B, H, group, F, cap, n_sel, split, n_parts;
  float qk_scale;                               // D^-0.5 * log2(e): scores in base 2
  int mode;                                     // 1: rows staged through shared memory by cp.async; 0: registers
  int64_t row;                                  // bytes from one token to the next in kmag, kscale, vq and vscale
};

cudaError_t pack(const PackParams& p, DType dt, int head_dim, cudaStream_t stream);
cudaError_t attend(const AttendParams& p, DType dt, int head_dim, cudaStream_t stream);
cudaError_t append(const AppendParams& p, DType dt, int head_dim, cudaStream_t stream);
// nblocks <= 0: one full wave of score blocks, as many as fit on the GPU at once, split over the (b, h) pairs
cudaError_t score_select(const SelectParams& p, DType dt, int head_dim, int nblocks, cudaStream_t stream);

}  // namespace si
