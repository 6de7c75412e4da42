// Page-level advice for the large outputs of the CPU kernels.
//
// A fresh output (at::empty) of hundreds of MiB is mapped but not yet backed by memory: the kernel's first
// write to each 4 KiB page faults, and the kernel zeroes the page. For slice_volume's 512 MiB output
// (128^3 -> 64 x 128 x 128^2) that was ~210 ms per call, ~28% of the kernel's time, measured here. With
// transparent huge pages, one fault maps and zeroes 2 MiB: 256 faults instead of 131072, ~55 ms instead of
// ~300 ms for `torch.empty(128 << 20).fill_(1)` on this machine (THP mode "madvise", median of 6).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tonno_fast {
namespace cpu {

// Ask the kernel to back [p, p + bytes) with transparent huge pages where they fit (the 2 MiB-aligned
// pages inside the range; the partial pages at its ends are shared with other allocations and left alone).
// Call it before the first write. Advice only: where THP is disabled, unavailable or not Linux, nothing
// changes; the result is the same either way. Small buffers (under 4 MiB) are skipped: the system call
// would cost more than the faults it saves.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t first = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace tonno_fast
