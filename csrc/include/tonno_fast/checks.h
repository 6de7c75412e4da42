// Argument checks of the tonno_fast operators, shared by the CPU (csrc/ops/cpu) and CUDA (csrc/ops/cuda)
// kernels: one function per op (check_<op>) built from the generic checks below. Every message names the
// argument, what was given and what was expected, with the same wording as the Python side of each op's
// contract (tonno_fast/ops/contract.py), which checks the Triton kernels' arguments and the fake kernels'.
//
// Host code only (TORCH_CHECK); no kernel runs before its op's check has passed.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>

namespace tonno_fast {
namespace checks {

// ---------------------------------------------------------------------------------------------------------
// Generic checks.

// The op's main tensor argument: a float32/float64 tensor on a `device` device (the kernel's), with `dim`
// dimensions (`layout`, e.g. "(B, C, D, H, W)") and no empty dimension.
inline void check_input(const at::Tensor& t, c10::DeviceType device, int64_t dim, const char* name,
                        const char* layout) {
  TORCH_CHECK(t.defined(), "tonno_fast: ", name, " must be a defined tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "tonno_fast: ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device().type() == device, "tonno_fast: ", name, " must be a ", c10::DeviceTypeName(device, true),
              " tensor for these kernels, got a tensor on ", t.device());
  TORCH_CHECK(t.dim() == dim, "tonno_fast: ", name, " must have ", dim, " dimensions ", layout, ", got shape ",
              t.sizes());
  for (const auto s : t.sizes()) {
    TORCH_CHECK(s > 0, "tonno_fast: ", name, " must have positive sizes, got shape ", t.sizes());
  }
}

// `t` has the dtype and device of `like` (the op's main tensor argument, named `like_name`).
inline void check_like(const at::Tensor& t, const at::Tensor& like, const char* name, const char* like_name) {
  TORCH_CHECK(t.defined(), "tonno_fast: ", name, " must be a defined tensor");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "tonno_fast: ", name, " must have the dtype of ", like_name,
              " (", like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "tonno_fast: ", name, " must be on the device of ", like_name, " (",
              like.device(), "), got ", t.device());
}

// Index-space maps (N, 3, 4), N > 0, with the dtype and device of `like`; returns N.
inline int64_t check_maps(const at::Tensor& maps, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(maps.defined() && maps.dim() == 3 && maps.size(0) > 0 && maps.size(1) == 3 && maps.size(2) == 4,
              "tonno_fast: maps must have shape (N, 3, 4) with N > 0, got ",
              maps.defined() ? maps.sizes() : at::IntArrayRef{});
  check_like(maps, like, "maps", like_name);
  return maps.size(0);
}

// Dimension `dim` of `t` (shape `layout`) counts the N directions of maps.
inline void check_directions(const at::Tensor& t, int64_t dim, int64_t n, const char* name, const char* layout) {
  TORCH_CHECK(t.size(dim) == n, "tonno_fast: ", name, " must have N = maps.size(0) = ", n, " directions (dim ", dim,
              " of ", layout, "), got shape ", t.sizes());
}

// Weights (N,), one per direction of maps, with the dtype and device of `like`.
inline void check_weights(const at::Tensor& weights, int64_t n, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(weights.defined() && weights.dim() == 1 && weights.size(0) == n,
              "tonno_fast: weights must have shape (N,) = (", n, ",) (one per direction of maps), got ",
              weights.defined() ? weights.sizes() : at::IntArrayRef{});
  check_like(weights, like, "weights", like_name);
}

// A list of three positive sizes, e.g. volume_shape = [D, H, W].
inline std::array<int64_t, 3> check_shape3(at::IntArrayRef s, const char* name, const char* layout) {
  TORCH_CHECK(s.size() == 3, "tonno_fast: ", name, " must have 3 entries ", layout, ", got ", s);
  for (const auto v : s) TORCH_CHECK(v > 0, "tonno_fast: ", name, " must be positive ", layout, ", got ", s);
  return {s[0], s[1], s[2]};
}

inline void check_positive(int64_t v, const char* name) {
  TORCH_CHECK(v > 0, "tonno_fast: ", name, " must be positive, got ", v);
}

// Kernels that index one slice with 32-bit integers need that extent below 2^31.
inline void check_int32(int64_t v, const char* what) {
  TORCH_CHECK(v < std::numeric_limits<int32_t>::max(), "tonno_fast: ", what, " = ", v,
              " is too large for these kernels (must be below 2^31)");
}

// ---------------------------------------------------------------------------------------------------------
// One check per op: the kernel's device type, then the op's arguments in schema order. Each returns N, the
// number of directions (of batch items for affine_sample).

inline int64_t check_slice_volume(c10::DeviceType dev, const at::Tensor& volume, const at::Tensor& maps,
                                  int64_t n_slices, int64_t height, int64_t width,
                                  std::optional<at::ScalarType> out_dtype) {
  check_input(volume, dev, 5, "volume", "(B, C, D, H, W)");
  const int64_t n = check_maps(maps, volume, "volume");
  check_positive(n_slices, "n_slices");
  check_positive(height, "height");
  check_positive(width, "width");
  if (out_dtype.has_value()) {
    const at::ScalarType o = *out_dtype;
    TORCH_CHECK(o == at::kFloat || o == at::kDouble || o == at::kHalf || o == at::kBFloat16,
                "tonno_fast: out_dtype must be None, float32, float64, float16 or bfloat16, got ", o);
  }
  return n;
}

inline int64_t check_slice_volume_backward(c10::DeviceType dev, const at::Tensor& grad, const at::Tensor& maps,
                                           at::IntArrayRef volume_shape) {
  check_input(grad, dev, 6, "grad", "(B, N, S, C, h, w)");
  const int64_t n = check_maps(maps, grad, "grad");
  check_directions(grad, 1, n, "grad", "(B, N, S, C, h, w)");
  check_shape3(volume_shape, "volume_shape", "(D, H, W)");
  return n;
}

inline int64_t check_radon(c10::DeviceType dev, const at::Tensor& volume, const at::Tensor& maps, int64_t n_slices,
                           int64_t height, int64_t width) {
  return check_slice_volume(dev, volume, maps, n_slices, height, width, std::nullopt);
}

inline int64_t check_radon_backward(c10::DeviceType dev, const at::Tensor& grad, const at::Tensor& maps,
                                    int64_t height, int64_t width, at::IntArrayRef volume_shape) {
  check_input(grad, dev, 4, "grad", "(B, C, N, S)");
  const int64_t n = check_maps(maps, grad, "grad");
  check_directions(grad, 2, n, "grad", "(B, C, N, S)");
  check_positive(height, "height");
  check_positive(width, "width");
  check_shape3(volume_shape, "volume_shape", "(D, H, W)");
  return n;
}

// backproject (x = sinogram, (B, K, N, S)) and backproject_slices (x = stacks, (B, K, N, S, h, w)).
inline int64_t check_backproject(c10::DeviceType dev, const at::Tensor& x, const char* name, int64_t dim,
                                 const char* layout, const at::Tensor& maps, const at::Tensor& weights,
                                 at::IntArrayRef volume_shape) {
  check_input(x, dev, dim, name, layout);
  const int64_t n = check_maps(maps, x, name);
  check_directions(x, 2, n, name, layout);
  check_weights(weights, n, x, name);
  check_shape3(volume_shape, "volume_shape", "(D, H, W)");
  return n;
}

// backproject_backward and backproject_slices_backward: grad (B, K, D, H, W).
inline int64_t check_backproject_backward(c10::DeviceType dev, const at::Tensor& grad, const at::Tensor& maps,
                                          const at::Tensor& weights) {
  check_input(grad, dev, 5, "grad", "(B, K, D, H, W)");
  const int64_t n = check_maps(maps, grad, "grad");
  check_weights(weights, n, grad, "grad");
  return n;
}

// affine_sample (and its backward): volume (N, C, D, H, W) with one map per batch item.
inline int64_t check_affine_volume(c10::DeviceType dev, const at::Tensor& volume, const at::Tensor& maps) {
  check_input(volume, dev, 5, "volume", "(N, C, D, H, W)");
  const int64_t n = check_maps(maps, volume, "volume");
  TORCH_CHECK(n == volume.size(0), "tonno_fast: maps must have one map per batch item, N = volume.size(0) = ",
              volume.size(0), ", got shape ", maps.sizes());
  return n;
}

// size = [N, C, D_out, H_out, W_out].
inline int64_t check_affine_sample(c10::DeviceType dev, const at::Tensor& volume, const at::Tensor& maps,
                                   at::IntArrayRef size) {
  const int64_t n = check_affine_volume(dev, volume, maps);
  TORCH_CHECK(size.size() == 5 && size[0] == volume.size(0) && size[1] == volume.size(1),
              "tonno_fast: size must be [N, C, D_out, H_out, W_out] with N, C = ", volume.size(0), ", ",
              volume.size(1), " (those of volume), got ", size);
  for (int i = 2; i < 5; ++i) {
    TORCH_CHECK(size[i] > 0, "tonno_fast: size must have positive D_out, H_out, W_out, got ", size);
  }
  return n;
}

// grad (N, C, D_out, H_out, W_out).
inline int64_t check_affine_sample_backward(c10::DeviceType dev, const at::Tensor& grad, const at::Tensor& volume,
                                            const at::Tensor& maps) {
  const int64_t n = check_affine_volume(dev, volume, maps);
  check_input(grad, dev, 5, "grad", "(N, C, D_out, H_out, W_out)");
  check_like(grad, volume, "grad", "volume");
  TORCH_CHECK(grad.size(0) == volume.size(0) && grad.size(1) == volume.size(1),
              "tonno_fast: grad must have the N, C of volume (", volume.size(0), ", ", volume.size(1), "), got ",
              grad.sizes());
  return n;
}

}  // namespace checks
}  // namespace tonno_fast
