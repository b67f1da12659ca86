// Host emulation of what csrc/topk_select.cu uses from CUDA, on top of tests/selfindex_emu.h (threads, barriers,
// shuffles, shared atomics): __match_any_sync, __ffs and __float_as_uint, so that tests/test_topk_emulated.py runs the
// kernel's own source on the CPU.
#pragma once
#include "selfindex_emu.h"

inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// the lanes of the warp whose v equals this lane's
inline unsigned __match_any_sync(unsigned, int v) {
  const int l = lane_id();
  std::memcpy(&t_wb->u[l][0], &v, 4);
  t_warp_bar->arrive_and_wait();
  unsigned mask = 0;
  for (int t = 0; t < 32; ++t) mask |= (int)t_wb->u[t][0] == v ? 1u << t : 0u;
  t_warp_bar->arrive_and_wait();
  return mask;
}
