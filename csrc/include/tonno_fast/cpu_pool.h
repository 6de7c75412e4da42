// A scoped pool for PyTorch's CPU tensors: while a scope is open, memory freed by CPU tensors is kept for the
// next allocation instead of being returned to the system (csrc/memory/cpu_pool.cpp).
//
// PyTorch's CPU allocator takes every tensor from malloc, and glibc serves a large request with a fresh mmap
// that is unmapped again on free: an encoder called on batch after batch of slices page-faults its
// activations in afresh each time (the kernel zeroes every page). The pipelines open a scope for the length
// of a call, so that cost is paid once per call; outside a scope every allocation goes to the allocator that
// was installed before (PyTorch's default), unchanged.
#pragma once

#include <cstdint>

namespace tonno_fast {
namespace memory {

struct CpuPoolStats {
  bool installed;        // the pool is PyTorch's CPU allocator (false: another allocator took precedence)
  int64_t depth;         // scopes open
  int64_t limit;         // bytes of freed memory the pool may keep while a scope is open
  int64_t cached_bytes;  // freed memory kept now
  int64_t pooled_bytes;  // memory allocated by the pool and not returned to the system (in use + kept)
  int64_t hits;          // allocations served from kept memory (since the process started)
  int64_t misses;        // allocations the pool made afresh, in a scope
};

// Open a scope that keeps up to `limit` bytes of freed memory (the largest limit of the open scopes holds).
// Installs the pool as PyTorch's CPU allocator the first time. Returns whether the pool is installed.
bool cpu_pool_enter(int64_t limit);
// Close a scope; when the last one closes, the kept memory is returned to the system. Tensors still alive
// return their memory to the system when they are freed.
void cpu_pool_exit();
CpuPoolStats cpu_pool_stats();

}  // namespace memory
}  // namespace tonno_fast
