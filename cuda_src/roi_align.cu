// RoIAlign and position-sensitive RoIAlign (torchvision.ops semantics).
#include "roi_common.cuh"

namespace cupy_roi {

// Bilinear weights of torchvision's roi_align at (y, x); false when the
// sample lies beyond one pixel outside the map and contributes nothing.
template <typename A>
struct Bilinear {
  int y0, x0, y1, x1;
  A w00, w01, w10, w11;

  __device__ __forceinline__ bool set(A y, A x, int height, int width) {
    if (y < A(-1) || y > A(height) || x < A(-1) || x > A(width)) return false;
    if (y <= A(0)) y = A(0);
    if (x <= A(0)) x = A(0);
    y0 = (int)y; x0 = (int)x;
    if (y0 >= height - 1) { y0 = y1 = height - 1; y = (A)y0; } else { y1 = y0 + 1; }
    if (x0 >= width - 1) { x0 = x1 = width - 1; x = (A)x0; } else { x1 = x0 + 1; }
    const A ly = y - y0, lx = x - x0, hy = A(1) - ly, hx = A(1) - lx;
    w00 = hy * hx; w01 = hy * lx; w10 = ly * hx; w11 = ly * lx;
    return true;
  }
};

// Sampling grid of one RoI: bin sizes, samples per bin, and start corner.
template <typename A>
struct AlignGrid {
  A y_start, x_start, bin_h, bin_w, inv_count;
  int grid_h, grid_w;

  __device__ __forceinline__ void set(A x1, A y1, A x2, A y2, A scale, int ph, int pw,
                                      int sampling_ratio, bool aligned) {
    const A offset = aligned ? A(0.5) : A(0);
    x_start = x1 * scale - offset;
    y_start = y1 * scale - offset;
    A roi_w = x2 * scale - offset - x_start;
    A roi_h = y2 * scale - offset - y_start;
    if (!aligned) { roi_w = max(roi_w, A(1)); roi_h = max(roi_h, A(1)); }
    bin_h = roi_h / ph;
    bin_w = roi_w / pw;
    grid_h = sampling_ratio > 0 ? sampling_ratio : (int)ceil(roi_h / ph);
    grid_w = sampling_ratio > 0 ? sampling_ratio : (int)ceil(roi_w / pw);
    // Degenerate (inverted) boxes give an empty grid; keep the mean finite.
    grid_h = max(grid_h, 0); grid_w = max(grid_w, 0);
    inv_count = A(1) / A(max(grid_h * grid_w, 1));
  }
  __device__ __forceinline__ A sample_y(int i, int iy) const {
    return y_start + i * bin_h + (iy + A(0.5)) * bin_h / grid_h;
  }
  __device__ __forceinline__ A sample_x(int j, int ix) const {
    return x_start + j * bin_w + (ix + A(0.5)) * bin_w / grid_w;
  }
};

}  // namespace cupy_roi

using namespace cupy_roi;

template <typename T, bool PS>
__global__ void roi_align_forward(
    const T* __restrict__ input, int batch, int height, int width,
    index_t in_s0, index_t in_s1, index_t in_s2, index_t in_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw,
    typename acc_type<T>::type spatial_scale, int sampling_ratio, int aligned,
    int channels_fastest,
    T* __restrict__ output, index_t out_s0, index_t out_s1, index_t out_s2, index_t out_s3) {
  typedef typename acc_type<T>::type A;
  const Strides4 in_st = make_strides(in_s0, in_s1, in_s2, in_s3);
  const OutputIndex out_at(out_s0, out_s1, out_s2, out_s3, channels_out, ph, pw, channels_fastest != 0);
  const index_t total = num_rois * channels_out * ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    const BinPos p = decompose(idx, channels_out, ph, pw, channels_fastest != 0);
    T* out = output + out_at.at(idx, p);
    int b; A x1, y1, x2, y2;
    if (!load_roi(rois, p.k, batch, b, x1, y1, x2, y2)) { store(out, quiet_nan<A>()); continue; }
    AlignGrid<A> g;
    g.set(x1, y1, x2, y2, spatial_scale, ph, pw, sampling_ratio, aligned != 0);
    const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
    const T* plane = input + (index_t)b * in_s0 + (index_t)c_in * in_s1;
    A sum = 0;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const A y = g.sample_y(p.i, iy);
      for (int ix = 0; ix < g.grid_w; ++ix) {
        Bilinear<A> w;
        if (!w.set(y, g.sample_x(p.j, ix), height, width)) continue;
        sum += w.w00 * to_acc(plane[w.y0 * in_st.s2 + w.x0 * in_st.s3]) +
               w.w01 * to_acc(plane[w.y0 * in_st.s2 + w.x1 * in_st.s3]) +
               w.w10 * to_acc(plane[w.y1 * in_st.s2 + w.x0 * in_st.s3]) +
               w.w11 * to_acc(plane[w.y1 * in_st.s2 + w.x1 * in_st.s3]);
      }
    }
    store(out, sum * g.inv_count);
  }
}

// grad_input is an accumulation buffer of the accumulation type (float for
// half types), zero-filled by the caller.
template <typename T, bool PS>
__global__ void roi_align_backward(
    const T* __restrict__ grad_output, index_t go_s0, index_t go_s1, index_t go_s2, index_t go_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw,
    typename acc_type<T>::type spatial_scale, int sampling_ratio, int aligned,
    int channels_fastest,
    typename acc_type<T>::type* __restrict__ grad_input, int batch, int height, int width,
    index_t gi_s0, index_t gi_s1, index_t gi_s2, index_t gi_s3) {
  typedef typename acc_type<T>::type A;
  const Strides4 go_st = make_strides(go_s0, go_s1, go_s2, go_s3);
  const index_t total = num_rois * channels_out * ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    const BinPos p = decompose(idx, channels_out, ph, pw, channels_fastest != 0);
    int b; A x1, y1, x2, y2;
    if (!load_roi(rois, p.k, batch, b, x1, y1, x2, y2)) continue;
    AlignGrid<A> g;
    g.set(x1, y1, x2, y2, spatial_scale, ph, pw, sampling_ratio, aligned != 0);
    const A grad = to_acc(grad_output[go_st.at(p.k, p.c, p.i, p.j)]) * g.inv_count;
    const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
    A* plane = grad_input + (index_t)b * gi_s0 + (index_t)c_in * gi_s1;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const A y = g.sample_y(p.i, iy);
      for (int ix = 0; ix < g.grid_w; ++ix) {
        Bilinear<A> w;
        if (!w.set(y, g.sample_x(p.j, ix), height, width)) continue;
        atomicAdd(plane + w.y0 * gi_s2 + w.x0 * gi_s3, grad * w.w00);
        atomicAdd(plane + w.y0 * gi_s2 + w.x1 * gi_s3, grad * w.w01);
        atomicAdd(plane + w.y1 * gi_s2 + w.x0 * gi_s3, grad * w.w10);
        atomicAdd(plane + w.y1 * gi_s2 + w.x1 * gi_s3, grad * w.w11);
      }
    }
  }
}
