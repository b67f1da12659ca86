// Host emulation of what csrc/kivi_attend.cu uses from CUDA, on top of tests/selfindex_emu.h (threads, barriers,
// shuffles, fp16): the full m16n8k16 mma (all 16 rows of A), movmatrix.trans, __any_sync and __hmul2, so that
// tests/test_kivi_emulated.py runs the kernel's own source on the CPU.
#pragma once
#include "selfindex_emu.h"
#define __host__

inline __half2 __hmul2(__half2 a, __half2 b) {
  return {__half{(_Float16)((float)a.x.v * (float)b.x.v)}, __half{(_Float16)((float)a.y.v * (float)b.y.v)}};
}

inline bool __any_sync(unsigned, bool v) {
  const int l = lane_id();
  t_wb->u[l][0] = v;
  t_warp_bar->arrive_and_wait();
  bool any = false;
  for (int t = 0; t < 32; ++t) any = any || t_wb->u[t][0];
  t_warp_bar->arrive_and_wait();
  return any;
}

// mma.sync.m16n8k16 row.col f32.f16.f16.f32 (PTX ISA fragment layouts): lane (g, q) holds A[g][2q..], A[g + 8][2q..],
// A[g][2q + 8..], A[g + 8][2q + 8..]; B[2q..][g], B[2q + 8..][g]; C[g][2q..], C[g + 8][2q..]
inline void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const int l = lane_id();
  uint32_t* mine = t_wb->u[l];
  mine[0] = a0; mine[1] = a1; mine[2] = a2; mine[3] = a3; mine[4] = b0; mine[5] = b1;
  t_warp_bar->arrive_and_wait();
  float A[16][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t >> 2, q = t & 3;
    const uint32_t* r = t_wb->u[t];
    for (int e = 0; e < 2; ++e) {
      const auto h = [&](uint32_t u) { return e ? h_hi(u) : h_lo(u); };
      A[g][2 * q + e] = h(r[0]); A[g + 8][2 * q + e] = h(r[1]);
      A[g][2 * q + 8 + e] = h(r[2]); A[g + 8][2 * q + 8 + e] = h(r[3]);
      B[2 * q + e][g] = h(r[4]); B[2 * q + 8 + e][g] = h(r[5]);
    }
  }
  t_warp_bar->arrive_and_wait();
  const int g = l >> 2, q = l & 3;
  for (int row = 0; row < 2; ++row)
    for (int e = 0; e < 2; ++e) {
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += A[g + 8 * row][k] * B[k][2 * q + e];
      d[2 * row + e] += s;
    }
}

// movmatrix.sync.aligned.m8n8.trans.b16: lane (g, q) holds row g, columns 2q, 2q + 1 of an 8x8 matrix of 16-bit
// values; it gets the same entries of the transpose, i.e. M[2q][g] and M[2q + 1][g]
inline uint32_t transpose8x8(uint32_t x) {
  const int l = lane_id();
  t_wb->u[l][0] = x;
  t_warp_bar->arrive_and_wait();
  const int g = l >> 2, q = l & 3;
  uint32_t out = 0;
  for (int e = 0; e < 2; ++e) {
    const int r = 2 * q + e;  // M[r][g] sits in lane 4r + g/2, half g % 2
    out |= ((t_wb->u[4 * r + g / 2][0] >> (16 * (g & 1))) & 0xffffu) << (16 * e);
  }
  t_warp_bar->arrive_and_wait();
  return out;
}
