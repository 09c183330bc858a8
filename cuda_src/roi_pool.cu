// RoIPool (max) and position-sensitive RoIPool (mean), torchvision.ops semantics.
#include "roi_common.cuh"

namespace cupy_roi {

// Integer bin [h0, h1) x [w0, w1) of torchvision's roi_pool / ps_roi_pool.
// RoIPool counts the rounded end corner as inside the box (+1); PSRoIPool
// does not, and its forward clips bins to H-1 / W-1 (torchvision does so).
// Bins are computed in floating point and clamped before any conversion to
// int, so huge coordinates cannot overflow.
template <typename A, bool PS>
struct PoolBin {
  int h0, h1, w0, w1;

  __device__ __forceinline__ void set(A x1, A y1, A x2, A y2, A scale, int i, int j, int ph, int pw,
                                      int height, int width) {
    const A rx1 = corner(x1, scale), ry1 = corner(y1, scale);
    const A rx2 = corner(x2, scale), ry2 = corner(y2, scale);
    const A extra = PS ? A(0) : A(1);
    const A roi_w = max(rx2 - rx1 + extra, A(1));
    const A roi_h = max(ry2 - ry1 + extra, A(1));
    const A bin_h = roi_h / ph, bin_w = roi_w / pw;
    const A max_h = PS ? A(height - 1) : A(height);
    const A max_w = PS ? A(width - 1) : A(width);
    h0 = (int)min(max(floor(i * bin_h) + ry1, A(0)), max_h);
    h1 = (int)min(max(ceil((i + 1) * bin_h) + ry1, A(0)), max_h);
    w0 = (int)min(max(floor(j * bin_w) + rx1, A(0)), max_w);
    w1 = (int)min(max(ceil((j + 1) * bin_w) + rx1, A(0)), max_w);
  }
  // torchvision's ps_roi_pool rounds a scaled corner with roundf, so in
  // float even for double input: a product within float rounding of a
  // half-integer lands where torchvision's does. roi_pool rounds in A.
  static __device__ __forceinline__ A corner(A v, A scale) {
    return PS ? A(roundf(float(v * scale))) : round(v * scale);
  }
  __device__ __forceinline__ bool empty() const { return h1 <= h0 || w1 <= w0; }

  // Calls visit(at, h, w) for every cell, row by row, at its offset in a
  // plane. Rows are reached by stepping and a unit column stride (NCHW) is a
  // compile-time constant: the 64-bit index products per cell otherwise cost
  // about as much as the max itself.
  template <typename Visit>
  __device__ __forceinline__ void for_each_cell(index_t s2, index_t s3, Visit visit) const {
    index_t row = (index_t)h0 * s2;
    if (s3 == 1) {
      for (int h = h0; h < h1; ++h, row += s2)
        for (int w = w0; w < w1; ++w) visit(row + w, h, w);
    } else {
      for (int h = h0; h < h1; ++h, row += s2)
        for (int w = w0; w < w1; ++w) visit(row + (index_t)w * s3, h, w);
    }
  }
};

}  // namespace cupy_roi

using namespace cupy_roi;

// argmax (RoIPool only) receives h * W + w of the maximum, -1 for an empty bin.
// CPT: output channels per thread (decompose_group); 1 but for RoIPool in
// float types, where the host picks it.
template <typename T, bool PS, int CPT = 1>
__global__ void roi_pool_forward(
    const T* __restrict__ input, int batch, int height, int width,
    index_t in_s0, index_t in_s1, index_t in_s2, index_t in_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw, typename acc_type<T>::type spatial_scale,
    int channel_block,
    T* __restrict__ output, index_t out_s0, index_t out_s1, index_t out_s2, index_t out_s3,
    int* __restrict__ argmax) {
  typedef typename acc_type<T>::type A;
  const OutputIndex out_at(out_s0, out_s1, out_s2, out_s3, channels_out, ph, pw, channel_block);
  const index_t total = num_rois * (channels_out / CPT) * ph * pw;
  const index_t arg_step = (index_t)ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    const BinPos p = decompose_group<CPT>(idx, num_rois, channels_out, ph, pw, channel_block);
    T* out = output + out_at.at<CPT>(idx, p);
    // argmax is always contiguous NCHW, whatever the output layout: in NCHW
    // (RoI-major) order, one channel a thread, that is the flat index itself.
    const index_t arg_at =
        CPT == 1 && channel_block == channels_out ? idx : ((p.k * channels_out + p.c) * ph + p.i) * pw + p.j;
    int b; A x1, y1, x2, y2;
    if (!load_roi(rois, p.k, batch, b, x1, y1, x2, y2)) {
#pragma unroll
      for (int t = 0; t < CPT; ++t) {
        store(out + t * out_s1, quiet_nan<A>());
        if (!PS) argmax[arg_at + t * arg_step] = -1;
      }
      continue;
    }
    PoolBin<A, PS> bin;
    bin.set(x1, y1, x2, y2, spatial_scale, p.i, p.j, ph, pw, height, width);
    const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
    const T* plane = input + (index_t)b * in_s0 + (index_t)c_in * in_s1;
    const index_t step = group_plane_step<PS>(in_s1, ph, pw);
    if (PS) {
      A sum[CPT];
#pragma unroll
      for (int t = 0; t < CPT; ++t) sum[t] = A(0);
      bin.for_each_cell(in_s2, in_s3, [&](index_t at, int, int) {
#pragma unroll
        for (int t = 0; t < CPT; ++t) sum[t] += to_acc(plane[t * step + at]);
      });
      const A area = A((bin.h1 - bin.h0) * (bin.w1 - bin.w0));
#pragma unroll
      for (int t = 0; t < CPT; ++t) store(out + t * out_s1, bin.empty() ? A(0) : sum[t] / area);
    } else {
      A best[CPT];
      int best_at[CPT];
#pragma unroll
      for (int t = 0; t < CPT; ++t) { best[t] = bin.empty() ? A(0) : negative_infinity<A>(); best_at[t] = -1; }
      bin.for_each_cell(in_s2, in_s3, [&](index_t at, int h, int w) {
#pragma unroll
        for (int t = 0; t < CPT; ++t) {
          const A v = to_acc(plane[t * step + at]);
          if (v > best[t]) { best[t] = v; best_at[t] = h * width + w; }
        }
      });
#pragma unroll
      for (int t = 0; t < CPT; ++t) {
        store(out + t * out_s1, best[t]);
        argmax[arg_at + t * arg_step] = best_at[t];
      }
    }
  }
}

template <typename T, bool PS>
__global__ void roi_pool_backward(
    const T* __restrict__ grad_output, index_t go_s0, index_t go_s1, index_t go_s2, index_t go_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw, typename acc_type<T>::type spatial_scale,
    int channel_block, const int* __restrict__ argmax,
    void* __restrict__ grad_input, int batch, int height, int width,
    index_t gi_s0, index_t gi_s1, index_t gi_s2, index_t gi_s3, const T* __restrict__ max_grad) {
  typedef typename acc_type<T>::type A;
  const Strides4 go_st = make_strides(go_s0, go_s1, go_s2, go_s3);
  const GradSink<A> sink(grad_input, max_grad, gradient_contributions(num_rois, ph, pw, PS));
  const index_t total = num_rois * channels_out * ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    const BinPos p = decompose(idx, num_rois, channels_out, ph, pw, channel_block);
    int b; A x1, y1, x2, y2;
    if (!load_roi(rois, p.k, batch, b, x1, y1, x2, y2)) continue;
    const A grad = to_acc(grad_output[go_st.at(p.k, p.c, p.i, p.j)]);
    const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
    const index_t plane = (index_t)b * gi_s0 + (index_t)c_in * gi_s1;
    if (PS) {
      PoolBin<A, PS> bin;
      bin.set(x1, y1, x2, y2, spatial_scale, p.i, p.j, ph, pw, height, width);
      if (bin.empty()) continue;
      const A g = grad / A((bin.h1 - bin.h0) * (bin.w1 - bin.w0));
      for (int h = bin.h0; h < bin.h1; ++h) {
        // the bin's cells of a row share one value: adjacent in NCHW (vector atomics), not in channels-last
        if (gi_s3 == 1) sink.add_run(plane + h * gi_s2 + bin.w0, bin.w1 - bin.w0, g);
        else for (int w = bin.w0; w < bin.w1; ++w) sink.add(plane + h * gi_s2 + w * gi_s3, g);
      }
    } else {
      const int at = argmax[channel_block == channels_out ? idx : ((p.k * channels_out + p.c) * ph + p.i) * pw + p.j];
      if (at < 0 || at >= height * width) continue;
      sink.add(plane + (at / width) * gi_s2 + (at % width) * gi_s3, grad);
    }
  }
}
