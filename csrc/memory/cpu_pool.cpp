// The scoped pool of tonno_fast/cpu_pool.h: a c10::Allocator installed as PyTorch's CPU allocator, which
// forwards every request to the allocator it replaced unless a scope is open.
//
// In a scope, requests of at least kMinBytes are served from blocks the pool owns: a freed block is kept (up to
// the scope's limit) and handed to the next request of about its size (at most 1.25x larger), and the kept
// blocks are returned to the system when the last scope closes. Blocks of 2 MiB and more are 2 MiB-aligned
// multiples of 2 MiB, advised to transparent huge pages, so a fresh one is faulted in 2 MiB at a time.
//
// Measured (benchmarks/RESULTS.md, item 25; 2 threads): ToNNO with a small CNN on a 128^3 volume, 64 directions,
// 128^2 slices, took 1.6-2.4 M page faults and 5.8-6.8 s per call with glibc's defaults, 970-1,500 faults and
// 2.6-3.1 s in a scope (2.4 s with tonno_fast.retain_freed_memory(), which changes malloc for the whole process
// and keeps the memory across calls).
//
// The pool is never destroyed (a tensor freed during interpreter shutdown still finds it), and it is installed
// at most once: whatever allocator was there before stays its fallback.
#include "tonno_fast/cpu_pool.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "../ops/cpu/memory.h"

namespace tonno_fast {
namespace memory {
namespace {

// Smaller requests come from glibc's heap without page faults anyway (its mmap threshold starts at 128 KiB).
constexpr size_t kMinBytes = size_t(64) << 10;
constexpr size_t kHuge = size_t(2) << 20;

size_t block_size(size_t n) {
  const size_t unit = n >= kHuge ? kHuge : kMinBytes;
  return (n + unit - 1) / unit * unit;
}

class CpuPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n >= kMinBytes && depth_.load(std::memory_order_acquire) > 0) {
      if (void* p = take(n)) return {p, p, &raw_delete, c10::Device(c10::DeviceType::CPU)};
    }
    return base_->allocate(n);
  }

  // For raw_allocate / raw_deallocate: the pointer is the pool's or the fallback allocator's.
  c10::DeleterFnPtr raw_deleter() const override { return &raw_delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool enter(int64_t limit) {
    {
      std::lock_guard<std::mutex> g(mutex_);
      if (base_ == nullptr) {  // the first scope: install the pool, once
        base_ = c10::GetCPUAllocator();
        c10::SetCPUAllocator(this, /*priority=*/0);  // replaces PyTorch's default (priority 0), not a higher one
      }
      installed_ = c10::GetCPUAllocator() == this;
      limit_ = depth_.load() == 0 ? static_cast<size_t>(limit) : std::max(limit_, static_cast<size_t>(limit));
      depth_.fetch_add(1, std::memory_order_release);
    }
    return installed_;
  }

  void exit() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mutex_);
      TORCH_CHECK(depth_.load() > 0, "tonno_fast: cpu_pool_exit without a matching cpu_pool_enter");
      if (depth_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        for (const auto& [size, p] : free_) {
          blocks_.erase(p);
          pooled_ -= size;
          drop.push_back(p);
        }
        free_.clear();
        cached_ = 0;
      }
    }
    for (void* p : drop) std::free(p);
  }

  CpuPoolStats stats() {
    std::lock_guard<std::mutex> g(mutex_);
    return {installed_, depth_.load(), static_cast<int64_t>(limit_), static_cast<int64_t>(cached_),
            static_cast<int64_t>(pooled_), hits_, misses_};
  }

  static CpuPool& instance() {
    static CpuPool* pool = [] {
      auto* p = new CpuPool();  // never destroyed, see the top of the file
#if defined(__unix__) || defined(__APPLE__)
      // A process forked while another thread holds the lock (a DataLoader worker, say) would find it held
      // forever: hold it across fork, as malloc does with its own locks.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
#endif
      return p;
    }();
    return *pool;
  }

 private:
  static void raw_delete(void* p) { instance().release(p); }

  // A kept block of about n bytes, or a fresh one; nullptr if the scope closed meanwhile or the system has no
  // memory left (the fallback allocator then raises PyTorch's usual out-of-memory error).
  void* take(size_t n) {
    const size_t size = block_size(n);
    {
      std::lock_guard<std::mutex> g(mutex_);
      if (depth_.load() == 0) return nullptr;
      const auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 4) {
        void* p = it->second;
        cached_ -= it->first;
        free_.erase(it);
        ++hits_;
        return p;
      }
      ++misses_;
    }
    void* p = nullptr;
    if (posix_memalign(&p, size >= kHuge ? kHuge : 64, size) != 0) return nullptr;
    cpu::advise_huge_pages(p, size);
    std::lock_guard<std::mutex> g(mutex_);
    blocks_.emplace(p, size);
    pooled_ += size;
    return p;
  }

  void release(void* p) {
    if (p == nullptr) return;
    c10::DeleterFnPtr foreign = nullptr;
    {
      std::lock_guard<std::mutex> g(mutex_);
      const auto it = blocks_.find(p);
      if (it == blocks_.end()) {
        // Not the pool's: allocated by the fallback allocator and freed through raw_deallocate.
        foreign = base_->raw_deleter();
        TORCH_INTERNAL_ASSERT(foreign != nullptr, "tonno_fast: CPU pool cannot free a pointer it does not own");
      } else {
        const size_t size = it->second;
        if (depth_.load() > 0 && cached_ + size <= limit_) {
          free_.emplace(size, p);
          cached_ += size;
          return;
        }
        blocks_.erase(it);
        pooled_ -= size;
      }
    }
    if (foreign != nullptr) {
      foreign(p);
    } else {
      std::free(p);
    }
  }

  std::mutex mutex_;
  std::atomic<int64_t> depth_{0};
  bool installed_ = false;
  c10::Allocator* base_ = nullptr;
  size_t limit_ = 0, cached_ = 0, pooled_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  std::multimap<size_t, void*> free_;          // kept blocks by size
  std::unordered_map<void*, size_t> blocks_;   // every block of the pool not returned to the system, by address
};

}  // namespace

bool cpu_pool_enter(int64_t limit) {
  TORCH_CHECK(limit >= 0, "tonno_fast: the CPU pool's limit must be a number of bytes >= 0, got ", limit);
  return CpuPool::instance().enter(limit);
}

void cpu_pool_exit() { CpuPool::instance().exit(); }

CpuPoolStats cpu_pool_stats() { return CpuPool::instance().stats(); }

}  // namespace memory
}  // namespace tonno_fast
