// Schemas of the tonno_fast custom operators (one place for CPU and CUDA) and the Python module
// tonno_fast._C, which reports what the extension was built with.
//
// Kernels register themselves for their dispatch key in csrc/ops/cpu/*.cpp (CPU) and csrc/ops/cuda/*.cu
// (CUDA). Fake (meta) kernels and autograd are registered from Python in tonno_fast/backend/native.py,
// as in pytorch/extension-cpp. Shapes: see DESIGN.md section 4 and tonno_fast/backend/reference.py.
#include <torch/extension.h>
#include <torch/version.h>

#include <sstream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(tonno_fast, m) {
  // volume (B,C,D,H,W), maps (N,3,4) -> slices (B,N,S,C,h,w)
  m.def("slice_volume(Tensor volume, Tensor maps, int n_slices, int height, int width, float fill, "
        "ScalarType? out_dtype) -> Tensor");
  // grad (B,N,S,C,h,w) -> (B,C,D,H,W)
  m.def("slice_volume_backward(Tensor grad, Tensor maps, int[] volume_shape) -> Tensor");
  // volume (B,C,D,H,W) -> sinogram (B,C,N,S)
  m.def("radon(Tensor volume, Tensor maps, int n_slices, int height, int width, float scale) -> Tensor");
  // grad (B,C,N,S) -> (B,C,D,H,W)
  m.def("radon_backward(Tensor grad, Tensor maps, int height, int width, float scale, int[] volume_shape) "
        "-> Tensor");
  // sinogram (B,K,N,S), maps (N,3,4), weights (N,) -> (B,K,D,H,W)
  m.def("backproject(Tensor sinogram, Tensor maps, Tensor weights, int[] volume_shape) -> Tensor");
  // grad (B,K,D,H,W) -> (B,K,N,S)
  m.def("backproject_backward(Tensor grad, Tensor maps, Tensor weights, int n_slices) -> Tensor");
  // stacks (B,K,N,S,h,w) -> (B,K,D,H,W)
  m.def("backproject_slices(Tensor stacks, Tensor maps, Tensor weights, int[] volume_shape) -> Tensor");
  // grad (B,K,D,H,W) -> (B,K,N,S,h,w); stack_shape = [S,h,w]
  m.def("backproject_slices_backward(Tensor grad, Tensor maps, Tensor weights, int[] stack_shape) -> Tensor");
  // volume (N,C,D,H,W), theta (N,3,4), size [N,C,Do,Ho,Wo] -> (N,C,Do,Ho,Wo)
  m.def("affine_grid_sample(Tensor volume, Tensor theta, int[] size, bool align_corners) -> Tensor");
  // -> (grad_volume, grad_theta); a gradient not asked for is returned as an empty tensor
  m.def("affine_grid_sample_backward(Tensor grad, Tensor volume, Tensor theta, bool align_corners, "
        "bool volume_grad, bool theta_grad) -> (Tensor, Tensor)");
}

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tonno_fast compiled kernels: importing this module registers the torch.ops.tonno_fast kernels";
  m.def("build_info", &build_info,
        "What the extension was built with: {'cuda': bool, 'cuda_arch': [str], 'openmp': bool, "
        "'omp_max_threads': int, 'torch_version': str}");
}
