// CPU kernels of tonno_fast::slice_volume and its adjoint tonno_fast::slice_volume_backward.
//
//   slice_volume: volume (B,C,D,H,W), maps (N,3,4) -> slices (B,N,S,C,h,w),
//     out[b,n,k,c,i,j] = trilinear(volume[b,c], maps[n] @ (k,i,j,1)), corners outside read `fill`.
//   slice_volume_backward: grad (B,N,S,C,h,w) -> (B,C,D,H,W), the exact adjoint (fill is a constant and
//     has no gradient).
#include "common.h"
#include "memory.h"

namespace tonno_fast {
namespace cpu {
namespace {

template <typename T, typename O>
void slice_volume_kernel(const T* vol, const T* maps, int64_t B, int64_t C, int64_t D, int64_t H, int64_t W,
                         int64_t N, int64_t S, int64_t h, int64_t w, T fill, O* out) {
  const int64_t hw = h * w, DHW = D * H * W;
  // One task per band of kRowBand rows of one direction n, walked through all S slices (k outer, rows inner):
  // row i of slice k + 1 lies one slice spacing from row i of slice k and reads mostly the same cache lines,
  // so a band's few KiB of voxels stay in L1/L2 from one slice to the next, where a whole slice (~1 MiB of
  // voxels at 128^2 pixels) does not fit L2 (benchmarks/RESULTS.md, item 16). Taps are computed once per
  // pixel and shared by all B*C arrays (volumes of one batch are read together, so they stay in cache). Every
  // sample is computed as before, whatever the order: same results, bitwise.
  constexpr int64_t kRowBand = 4;
  const int64_t bands = (h + kRowBand - 1) / kRowBand;
  parallel_for_dynamic(N * bands, [&](int64_t nb) {
    const int64_t n = nb / bands, i0 = (nb % bands) * kRowBand, i1 = std::min(h, i0 + kRowBand);
    const T* M = maps + 12 * n;
    for (int64_t k = 0; k < S; ++k) {
      O* o = out + (n * S + k) * C * hw;  // out[0, n, k, 0, 0, 0]
      for (int64_t i = i0; i < i1; ++i) {
        T x[3], step[3];
        map_row(M, T(k), T(i), x, step);
        sample_row<T, O>(vol, D, H, W, B, C * DHW, N * S * C * hw, C, DHW, hw, x, step, w, fill, o + i * w);
      }
    }
  });
}

at::Tensor slice_volume_cpu(const at::Tensor& volume, const at::Tensor& maps, int64_t n_slices, int64_t height,
                            int64_t width, double fill, std::optional<at::ScalarType> out_dtype) {
  const int64_t N = checks::check_slice_volume(at::kCPU, volume, maps, n_slices, height, width, out_dtype);
  const at::ScalarType odt = out_dtype.value_or(volume.scalar_type());
  const at::Tensor vol = volume.contiguous(), m = maps.contiguous();
  const int64_t B = vol.size(0), C = vol.size(1), D = vol.size(2), H = vol.size(3), W = vol.size(4);
  at::Tensor out = at::empty({B, N, n_slices, C, height, width}, vol.options().dtype(odt));
  advise_huge_pages(out.mutable_data_ptr(), out.nbytes());  // before the first write (memory.h)
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "tonno_fast::slice_volume", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, odt, "tonno_fast::slice_volume_out", [&] {
      // Computed in the volume's dtype, written in out_dtype.
      slice_volume_kernel<T, scalar_t>(vol.const_data_ptr<T>(), m.const_data_ptr<T>(), B, C, D, H, W, N,
                                       n_slices, height, width, static_cast<T>(fill),
                                       out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

at::Tensor slice_volume_backward_cpu(const at::Tensor& grad, const at::Tensor& maps, at::IntArrayRef volume_shape) {
  checks::check_slice_volume_backward(at::kCPU, grad, maps, volume_shape);
  const at::Tensor g = grad.contiguous(), m = maps.contiguous();
  const int64_t B = g.size(0), N = g.size(1), S = g.size(2), C = g.size(3), h = g.size(4), w = g.size(5);
  const int64_t D = volume_shape[0], H = volume_shape[1], W = volume_shape[2];
  at::Tensor out = at::zeros({B, C, D, H, W}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "tonno_fast::slice_volume_backward", [&] {
    using T = scalar_t;
    const T* gp = g.const_data_ptr<T>();
    const int64_t hw = h * w;
    // Job n scatters slice stack n into all B*C output arrays (q = b*C + c).
    scatter_slices<T>(
        out.mutable_data_ptr<T>(), D, H, W, m.const_data_ptr<T>(), N, S, h, w, B * C,
        [&](int64_t n, int64_t q, int64_t k, int64_t i, int64_t j) {
          const int64_t b = q / C, c = q % C;
          return gp[(((b * N + n) * S + k) * C + c) * hw + i * w + j];
        });
  });
  return out;
}

}  // namespace

TONNO_FAST_KERNELS(CPU, slice_volume, slice_volume_cpu, slice_volume_backward_cpu)

}  // namespace cpu
}  // namespace tonno_fast
