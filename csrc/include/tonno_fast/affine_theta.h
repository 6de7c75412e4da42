// Host-side conversion of an affine_grid `theta` into index-space maps, shared by the CPU and CUDA kernels of
// tonno_fast::affine_grid_sample (csrc/ops/cpu/affine_grid_sample.cpp, csrc/ops/cuda/affine_grid_sample.cu).
//
//   F.grid_sample(volume, F.affine_grid(theta, size, align_corners), "bilinear", "zeros", align_corners)
//
// samples volume[n] at input index (d, h, w) = M[n] @ (output index (d, h, w), 1) with
//
//   M = P @ theta @ A + offset                                                  (N, 3, 4)
//
// A (4x4): output index (d, h, w, 1) -> normalised (x, y, z, 1), as F.affine_grid builds its base grid
//   (x along W: linspace(-1, 1, Wo), scaled by (Wo-1)/Wo when align_corners=False; a size-1 axis gives 0);
// P (3x3) and offset (3x4, last column only): normalised (x, y, z) -> input index (d, h, w), as grid_sample
//   unnormalises (align_corners=True: (g+1)/2 * (n-1); False: ((g+1) n - 1)/2).
// The conversion is linear in theta, so dL/dtheta = P^T (dL/dM) A^T.
//
// The matrices are built in float64 on the CPU and moved to theta's device; the products run there (ATen,
// elementwise: no cuBLAS, see conversion_tensor).
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

namespace tonno_fast {
namespace affine {

struct AffineConversion {
  at::Tensor A, P, offset;  // (4,4), (3,3), (3,4) float64, on the device of the tensors they will meet
};

// in_dhw = (D, H, W) of the volume, out_dhw = (D_out, H_out, W_out) of the sampled grid.
inline AffineConversion conversion(at::IntArrayRef in_dhw, at::IntArrayRef out_dhw, bool align_corners,
                                   at::Device device = at::kCPU) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor A = at::zeros({4, 4}, opts), P = at::zeros({3, 3}, opts), offset = at::zeros({3, 4}, opts);
  auto a_ = A.accessor<double, 2>();
  auto p_ = P.accessor<double, 2>();
  auto o_ = offset.accessor<double, 2>();
  for (int ax = 0; ax < 3; ++ax) {  // ax: 0 = D (z), 1 = H (y), 2 = W (x)
    const int norm = 2 - ax;        // row of (x, y, z) for this axis
    const double no = static_cast<double>(out_dhw[ax]), ni = static_cast<double>(in_dhw[ax]);
    double a = 0.0, b = 0.0;  // normalised = a * index + b; a size-1 output axis maps to 0
    if (out_dhw[ax] > 1) {
      if (align_corners) {
        a = 2.0 / (no - 1.0);
        b = -1.0;
      } else {
        a = 2.0 / no;
        b = 1.0 / no - 1.0;
      }
    }
    a_[norm][ax] = a;
    a_[norm][3] = b;
    p_[ax][norm] = align_corners ? (ni - 1.0) / 2.0 : ni / 2.0;
    o_[ax][3] = (ni - 1.0) / 2.0;
  }
  a_[3][3] = 1.0;
  if (device != at::Device(at::kCPU)) {
    A = A.to(device);
    P = P.to(device);
    offset = offset.to(device);
  }
  return {A, P, offset};
}

// The conversion as one (3, 4, 3, 4) tensor K[i, j, r, c] = P[i, r] A[c, j], so that
//   M[n, i, j] = sum_{r, c} K[i, j, r, c] theta[n, r, c] + offset[i, j],
//   dL/dtheta[n, r, c] = sum_{i, j} K[i, j, r, c] dL/dM[n, i, j].
// Written as broadcast products and sums rather than matmul on purpose: on a GPU, matmul goes through
// cuBLAS, which torch.use_deterministic_algorithms(True) refuses without CUBLAS_WORKSPACE_CONFIG, and for
// 3x4 matrices the elementwise form costs nothing.
inline at::Tensor conversion_tensor(const AffineConversion& cv) {
  return cv.P.reshape({3, 1, 3, 1}) * cv.A.t().reshape({1, 4, 1, 4});
}

// theta (N, 3, 4) -> maps (N, 3, 4) in theta's dtype (computed in float64), contiguous.
inline at::Tensor theta_to_maps(const at::Tensor& theta, const AffineConversion& cv) {
  const at::Tensor t = theta.to(at::kDouble).reshape({-1, 1, 1, 3, 4});
  return ((t * conversion_tensor(cv)).sum({3, 4}) + cv.offset).to(theta.scalar_type()).contiguous();
}

// dL/dM (N, 3, 4) -> dL/dtheta (N, 3, 4) in `dtype`.
inline at::Tensor maps_grad_to_theta_grad(const at::Tensor& maps_grad, const AffineConversion& cv,
                                          at::ScalarType dtype) {
  const at::Tensor g = maps_grad.to(at::kDouble).reshape({-1, 3, 4, 1, 1});
  return (g * conversion_tensor(cv)).sum({1, 2}).to(dtype);
}

}  // namespace affine
}  // namespace tonno_fast
