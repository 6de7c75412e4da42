// The Python module tonno_fast._C: loading it registers the C++ kernels of the torch.ops.tonno_fast operators
// (csrc/ops/cpu/<op>.cpp for the CPU, csrc/ops/cuda/<op>.cu for CUDA: each registers itself for its dispatch
// key), build_info() reports what the extension was built with, and cpu_pool_* open and close scopes of the
// CPU memory pool (csrc/memory/cpu_pool.cpp).
//
// The operators' schemas, fake kernels and autograd are defined once, for these kernels and the Triton ones, in
// tonno_fast/ops/contract.py (tonno_fast/ops/native.py calls it when this module loads); the dispatcher checks
// each kernel's C++ signature against its schema then. docs/adding-an-op.md lists every file of an op.
#include <torch/extension.h>
#include <torch/version.h>

#include "tonno_fast/cpu_pool.h"

#include <sstream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// TONNO_FAST_CUDA_ARCH is set by setup.py / CMake to the architectures the CUDA kernels were compiled for,
// joined with '_' (e.g. 8.0_9.0) because ';' cannot travel through a -D flag portably.
#define TF_STRINGIFY2(x) #x
#define TF_STRINGIFY(x) TF_STRINGIFY2(x)

std::vector<std::string> cuda_archs() {
  std::vector<std::string> out;
#if defined(TONNO_FAST_WITH_CUDA) && defined(TONNO_FAST_CUDA_ARCH)
  std::stringstream ss(TF_STRINGIFY(TONNO_FAST_CUDA_ARCH));
  std::string item;
  while (std::getline(ss, item, '_')) {
    if (!item.empty()) out.push_back(item);
  }
#endif
  return out;
}

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef TONNO_FAST_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["cuda_arch"] = cuda_archs();
#ifdef _OPENMP
  d["openmp"] = true;
  d["omp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["omp_max_threads"] = 1;
#endif
  d["torch_version"] = std::string(TORCH_VERSION);
  return d;
}

pybind11::dict cpu_pool_stats() {
  const tonno_fast::memory::CpuPoolStats s = tonno_fast::memory::cpu_pool_stats();
  pybind11::dict d;
  d["installed"] = s.installed;
  d["depth"] = s.depth;
  d["limit"] = s.limit;
  d["cached_bytes"] = s.cached_bytes;
  d["pooled_bytes"] = s.pooled_bytes;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tonno_fast compiled kernels: importing this module registers the torch.ops.tonno_fast kernels "
            "(their schemas are defined by tonno_fast.ops.contract)";
  m.def("build_info", &build_info,
        "What the extension was built with: {'cuda': bool, 'cuda_arch': [str], 'openmp': bool, "
        "'omp_max_threads': int, 'torch_version': str}");
  // The scoped CPU memory pool (csrc/memory/cpu_pool.cpp); tonno_fast.allocator.reuse_cpu_memory wraps these.
  m.def("cpu_pool_enter", &tonno_fast::memory::cpu_pool_enter, pybind11::arg("limit"),
        "Open a scope of the CPU memory pool keeping up to `limit` bytes of freed memory; returns whether the pool "
        "is PyTorch's CPU allocator");
  m.def("cpu_pool_exit", &tonno_fast::memory::cpu_pool_exit,
        "Close a scope; the last one returns the kept memory to the system");
  m.def("cpu_pool_stats", &cpu_pool_stats,
        "{'installed', 'depth', 'limit', 'cached_bytes', 'pooled_bytes', 'hits', 'misses'} of the CPU memory pool");
}
