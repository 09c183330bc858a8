// RoIAlign and position-sensitive RoIAlign (torchvision.ops semantics).
#include "roi_common.cuh"

namespace cupy_roi {

// One axis of torchvision's bilinear interpolation at v: the lower and upper
// pixel and their weights (clamped to the map's edge); false when v lies
// beyond one pixel outside the map and the sample contributes nothing.
template <typename A>
__device__ __forceinline__ bool axis_weights(A v, int size, int& lo, int& hi, A& w_lo, A& w_hi) {
  if (v < A(-1) || v > A(size)) return false;
  if (v <= A(0)) v = A(0);
  lo = (int)v;
  if (lo >= size - 1) { lo = hi = size - 1; v = (A)lo; } else { hi = lo + 1; }
  w_hi = v - lo;
  w_lo = A(1) - w_hi;
  return true;
}

// Bilinear weights of torchvision's roi_align at (y, x); false when the
// sample contributes nothing.
template <typename A>
struct Bilinear {
  int y0, x0, y1, x1;
  A w00, w01, w10, w11;

  __device__ __forceinline__ bool set(A y, A x, int height, int width) {
    A hy, ly, hx, lx;
    if (!axis_weights(y, height, y0, y1, hy, ly) || !axis_weights(x, width, x0, x1, hx, lx)) return false;
    w00 = hy * hx; w01 = hy * lx; w10 = ly * hx; w11 = ly * lx;
    return true;
  }
};

// Pixels a bin's gradient reaches along one axis, at most kWindow of them.
// The weights of an axis-aligned sample grid are separable: sample (iy, ix)
// gives pixel (r, c) wy_iy(r) * wx_ix(c), so the bin gives it Wy(r) * Wx(c)
// with Wy(r) = sum_iy wy_iy(r). Where the samples of a small bin (spacing up
// to a pixel or two) share pixels, the bin's gradient is then one atomic per
// pixel reached, at most kWindow^2, instead of four per sample.
constexpr int kWindow = 4;

template <typename A>
struct AxisWindow {
  int start;  // first pixel reached; -1 when no sample lies on the map
  A w[kWindow];

  // Sums the weights of the count samples at(0), at(1), ... (in increasing
  // order); false when they reach past kWindow pixels.
  template <typename At>
  __device__ __forceinline__ bool set(int count, int size, At at) {
    start = -1;
#pragma unroll
    for (int k = 0; k < kWindow; ++k) w[k] = A(0);
    for (int s = 0; s < count; ++s) {
      int lo, hi; A w_lo, w_hi;
      if (!axis_weights(at(s), size, lo, hi, w_lo, w_hi)) continue;
      if (start < 0) start = lo;
      if (lo < start || hi - start >= kWindow) return false;
#pragma unroll
      for (int k = 0; k < kWindow; ++k)
        w[k] += (start + k == lo ? w_lo : A(0)) + (start + k == hi ? w_hi : A(0));
    }
    return true;
  }
};

// Sampling grid of one RoI: bin sizes, samples per bin, and start corner.
template <typename A>
struct AlignGrid {
  A y_start, x_start, bin_h, bin_w, inv_count;
  int grid_h, grid_w;

  // Axis-aligned box given by its corners, in map coordinates.
  __device__ __forceinline__ void set(A x1, A y1, A x2, A y2, A scale, int ph, int pw,
                                      int sampling_ratio, bool aligned) {
    const A offset = aligned ? A(0.5) : A(0);
    x_start = scaled(x1, scale) - offset;
    y_start = scaled(y1, scale) - offset;
    set_extent(scaled(y2, scale) - offset - y_start, scaled(x2, scale) - offset - x_start, ph, pw, sampling_ratio,
               aligned);
  }
  // Box of size (w, h) centred on the origin of its own frame (rotated
  // RoIAlign, mmcv's order: the 1x1 clamp comes before the centring).
  __device__ __forceinline__ void set_centred(A w, A h, A scale, int ph, int pw, int sampling_ratio,
                                              bool aligned) {
    A roi_w = w * scale, roi_h = h * scale;
    if (!aligned) { roi_w = max(roi_w, A(1)); roi_h = max(roi_h, A(1)); }
    y_start = -roi_h / A(2);
    x_start = -roi_w / A(2);
    set_extent(roi_h, roi_w, ph, pw, sampling_ratio, true);
  }
  __device__ __forceinline__ void set_extent(A roi_h, A roi_w, int ph, int pw, int sampling_ratio,
                                             bool aligned) {
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


// Where a grid sample (yy, xx) of the box's own frame lies on the map.
struct AxisFrame {
  template <typename A>
  __device__ __forceinline__ void map(A yy, A xx, A& y, A& x) const { y = yy; x = xx; }
};

// Rotated RoIAlign (mmcv and detectron2): the box frame turned by theta
// (counter-clockwise on the image, y pointing down) about the centre.
template <typename A>
struct RotatedFrame {
  A cos_t, sin_t, cy, cx;
  __device__ __forceinline__ void map(A yy, A xx, A& y, A& x) const {
    y = yy * cos_t - xx * sin_t + cy;
    x = yy * sin_t + xx * cos_t + cx;
  }
};

// Which CPT output channels a grouped thread (decompose_group) computes, how
// it reads them at a bilinear sample and where it writes their means.
// Channels plane_step elements apart (plane_step: the input's channel stride,
// or group_plane_step), first the group's channel c, read one by one.
template <int CPT, typename T, bool kVectors>
struct ChannelGroup {
  int first;
  index_t step;
  __device__ __forceinline__ ChannelGroup(int c, int, index_t plane_step) : first(c), step(plane_step) {}

  // Each channel's sum is a chain of fused multiply-adds in a fixed order, so
  // no result depends on CPT or on the group's kind.
  template <typename A>
  __device__ __forceinline__ void add(const T* plane, const Bilinear<A>& w, index_t a00, index_t a01, index_t a10,
                                      index_t a11, A (&sum)[CPT]) const {
#pragma unroll
    for (int t = 0; t < CPT; ++t) {
      const T* p = plane + t * step;
      A s = fused(w.w00, to_acc(p[a00]), sum[t]);
      s = fused(w.w01, to_acc(p[a01]), s);
      s = fused(w.w10, to_acc(p[a10]), s);
      sum[t] = fused(w.w11, to_acc(p[a11]), s);
    }
  }
  // The means (the NaNs of an invalid row when g is null) to out, out + step, ...
  template <typename A>
  __device__ __forceinline__ void store(T* out, index_t out_step, bool, const A (&sum)[CPT],
                                        const AlignGrid<A>* g) const {
#pragma unroll
    for (int t = 0; t < CPT; ++t) cupy_roi::store(out + t * out_step, g ? sum[t] * g->inv_count : quiet_nan<A>());
  }
};

// Vector groups, for channels-last maps walked channels fastest (channel
// block B <= 0, in blocks of `block` = -B channels, or all C): CPT / V vectors
// of V adjacent channels (V = vector_width<T>), the thread's vectors `span`
// channels apart, so that the lanes of a warp, which hold consecutive groups
// of one bin, read consecutive 16-byte vectors of a corner. Group c (its first
// channel in decompose_group's numbering) of the block starting at channel c0
// holds channels c0 + (c - c0) / CPT * V + q * span + e, q < CPT / V, e < V,
// span = block / CPT * V. The input's channel stride is 1.
// vector_group_first and vector_group_span give that mapping (the backward's
// ChannelScatter takes it too, with float's 4 a vector).
template <int CPT, int V>
__device__ __forceinline__ int vector_group_first(int c, int block) {
  return c / block * block + c % block / CPT * V;
}
template <int CPT, int V>
__device__ __forceinline__ int vector_group_span(int block) {
  return block / CPT * V;
}

template <int CPT, typename T>
struct ChannelGroup<CPT, T, true> {
  static constexpr int V = vector_width<T>::value;
  static_assert(V > 1 && CPT % V == 0, "a vector group holds whole vectors");
  int first;
  index_t step;  // span
  __device__ __forceinline__ ChannelGroup(int c, int block, index_t)
      : first(vector_group_first<CPT, V>(c, block)), step(vector_group_span<CPT, V>(block)) {}

  template <typename A>
  __device__ __forceinline__ void add(const T* plane, const Bilinear<A>& w, index_t a00, index_t a01, index_t a10,
                                      index_t a11, A (&sum)[CPT]) const {
#pragma unroll
    for (int q = 0; q < CPT / V; ++q) {
      const T* p = plane + q * step;
      A v00[V], v01[V], v10[V], v11[V];
      load_vector(p + a00, v00);
      load_vector(p + a01, v01);
      load_vector(p + a10, v10);
      load_vector(p + a11, v11);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        A s = fused(w.w00, v00[e], sum[q * V + e]);
        s = fused(w.w01, v01[e], s);
        s = fused(w.w10, v10[e], s);
        sum[q * V + e] = fused(w.w11, v11[e], s);
      }
    }
  }
  // vectors: out is 16-byte aligned with channel stride 1 (then one vector
  // store per vector), else element by element, out_step between channels.
  template <typename A>
  __device__ __forceinline__ void store(T* out, index_t out_step, bool vectors, const A (&sum)[CPT],
                                        const AlignGrid<A>* g) const {
    A mean[CPT];
#pragma unroll
    for (int t = 0; t < CPT; ++t) mean[t] = g ? sum[t] * g->inv_count : quiet_nan<A>();
#pragma unroll
    for (int q = 0; q < CPT / V; ++q) {
      if (vectors) {
        store_vector(out + q * step, mean + q * V);
        continue;
      }
#pragma unroll
      for (int e = 0; e < V; ++e) cupy_roi::store(out + (q * step + e) * out_step, mean[q * V + e]);
    }
  }
};

// Whether a map (or output) of strides s0..s3 at p takes 16-byte vectors of
// V channels: channel stride 1, every other stride a multiple of V, p
// 16-byte aligned.
template <int V>
__device__ __forceinline__ bool vector_layout(const void* p, index_t s0, index_t s1, index_t s2, index_t s3) {
  return V > 1 && s1 == 1 && s0 % V == 0 && s2 % V == 0 && s3 % V == 0 && aligned16(p);
}

// Sums of the bilinear samples of bin (i, j) over the group's channels from
// plane (its first channel's plane): the sample positions and weights are
// worked out once for all of them.
template <int CPT, typename T, bool kVectors, typename A, typename Frame>
__device__ __forceinline__ void bin_sample_sums(const ChannelGroup<CPT, T, kVectors>& group, const T* plane,
                                                index_t s2, index_t s3, int height, int width,
                                                const AlignGrid<A>& g, const Frame& frame, int i, int j,
                                                A (&sum)[CPT]) {
#pragma unroll
  for (int t = 0; t < CPT; ++t) sum[t] = A(0);
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const A yy = g.sample_y(i, iy);
    for (int ix = 0; ix < g.grid_w; ++ix) {
      A y, x;
      frame.map(yy, g.sample_x(j, ix), y, x);
      Bilinear<A> w;
      if (!w.set(y, x, height, width)) continue;
      group.add(plane, w, w.y0 * s2 + w.x0 * s3, w.y0 * s2 + w.x1 * s3, w.y1 * s2 + w.x0 * s3,
                w.y1 * s2 + w.x1 * s3, sum);
    }
  }
}

// Adjoint of bin_sample_sums (one plane): adds grad times each sample's weights into the
// plane starting at element plane of the sink's buffer.
//
// kVector picks the vector atomics of NCHW rows (sm_90), by what measured faster (H200,
// benchmarks/NOTES.md, session 17): 0, a row's two corners as an 8-byte pair where
// aligned (multi-level and rotated RoIAlign: spare pairs made the FPN backward 3%
// slower); 1, also as a 16-byte atomic adding 0 to their neighbours where the pair
// starts 4 bytes past a 16-byte boundary, one L2 operation instead of two (RoIAlign's
// thread mode; on wide RoIs' bins, before warp_scatter_roi took them, the Mask R-CNN
// backward was 9-13% faster with it); 2, also AxisWindow's four columns of a row in
// 16-byte blocks (position-sensitive RoIAlign: R-FCN and Light-Head backward 17-19%
// faster, where plain RoIAlign's small boxes and the FPN backward lost 4-31%).
//
// sink: a GradSink<A>, or a ChannelScatter (several channels of a bin, grad 1).
template <int kVector, typename Sink, typename A, typename Frame>
__device__ __forceinline__ void bin_sample_scatter(const Sink& sink, index_t plane, index_t s2, index_t s3,
                                                   int height, int width, const AlignGrid<A>& g, const Frame& frame,
                                                   int i, int j, A grad) {
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const A yy = g.sample_y(i, iy);
    for (int ix = 0; ix < g.grid_w; ++ix) {
      A y, x;
      frame.map(yy, g.sample_x(j, ix), y, x);
      Bilinear<A> w;
      if (!w.set(y, x, height, width)) continue;
      if (s3 == 1 && w.x1 == w.x0 + 1) {  // each row's two corners adjacent: one pair
        const bool spare = kVector >= 1 && w.x0 >= 1 && w.x0 + 2 < width;
        sink.add_pair(plane + w.y0 * s2 + w.x0, grad * w.w00, grad * w.w01, spare);
        sink.add_pair(plane + w.y1 * s2 + w.x0, grad * w.w10, grad * w.w11, spare);
        continue;
      }
      sink.add(plane + w.y0 * s2 + w.x0 * s3, grad * w.w00);
      sink.add(plane + w.y0 * s2 + w.x1 * s3, grad * w.w01);
      sink.add(plane + w.y1 * s2 + w.x0 * s3, grad * w.w10);
      sink.add(plane + w.y1 * s2 + w.x1 * s3, grad * w.w11);
    }
  }
}

// bin_sample_scatter for an axis-aligned grid: through AxisWindow where the
// bin's samples reach at most kWindow pixels on each axis. A pixel gets
// grad * (Wy(r) * Wx(c)), so that a ChannelScatter (grad 1, its channels'
// gradients multiplied in last) adds each channel exactly what a GradSink
// adds it bin by bin: the deterministic backward's bits do not depend on the
// channels a thread takes.
template <int kVector, typename Sink, typename A>
__device__ __forceinline__ void bin_scatter_axis_aligned(const Sink& sink, index_t plane, index_t s2,
                                                         index_t s3, int height, int width, const AlignGrid<A>& g,
                                                         int i, int j, A grad) {
  AxisWindow<A> rows, cols;
  if (!rows.set(g.grid_h, height, [&](int s) { return g.sample_y(i, s); }) ||
      !cols.set(g.grid_w, width, [&](int s) { return g.sample_x(j, s); })) {
    bin_sample_scatter<kVector>(sink, plane, s2, s3, height, width, g, AxisFrame(), i, j, grad);
    return;
  }
  if (rows.start < 0 || cols.start < 0) return;
#pragma unroll
  for (int r = 0; r < kWindow; ++r) {
    const A w_row = rows.w[r];
    if (w_row == A(0)) continue;
    const index_t row = plane + (rows.start + r) * s2;
    if (kVector >= 2 && s3 == 1) {
      static_assert(kWindow == 4, "add_quad takes four columns");
      A v[kWindow];
#pragma unroll
      for (int c = 0; c < kWindow; ++c) v[c] = cols.w[c] != A(0) ? grad * (w_row * cols.w[c]) : A(0);
      sink.add_quad(row + cols.start, v, -cols.start, width - 1 - cols.start);
      continue;
    }
#pragma unroll
    for (int c = 0; c < kWindow; ++c)
      if (cols.w[c] != A(0)) sink.add(row + (cols.start + c) * s3, grad * (w_row * cols.w[c]));
  }
}

// The backward's counterpart of the vector groups (ChannelGroup<CPT, T,
// true>, with float's 4 elements a vector): the adds of one bin's gradient
// to a thread's CPT channels, CPT / 4 runs of 4 adjacent channels `span`
// apart, so that the lanes of a warp, on consecutive groups of one bin, add
// to consecutive 16-byte pieces of a pixel of a channels-last buffer.
// add(at, w) adds w * grad[t] to each channel t at pixel offset at: one
// 16-byte atomic per run where `vector` (channel stride 1, the buffer
// 16-byte aligned, float atomics on sm_90), else an add per channel (the
// deterministic backward's fixed point among them). bin_sample_scatter and
// bin_scatter_axis_aligned take it in a GradSink's place, with grad 1: a
// bin's sample weights are then worked out once for CPT channels.
template <int CPT, typename A>
struct ChannelScatter {
  GradSink<A> sink;
  index_t first, span, step;  // first and span in channels; step: the buffer's channel stride
  bool vector;
  A grad[CPT];

  __device__ __forceinline__ ChannelScatter(const GradSink<A>& s, index_t span, index_t step, bool vector)
      : sink(s), first(0), span(span), step(step), vector(vector) {}

  __device__ __forceinline__ void add(index_t at, A w) const {
#pragma unroll
    for (int q = 0; q < CPT / 4; ++q) {
      A v[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = w * grad[q * 4 + e];
      sink.add_vector(at + (first + q * span) * step, step, v, vector);
    }
  }
  __device__ __forceinline__ void add_pair(index_t at, A w0, A w1, bool) const {
    add(at, w0);
    add(at + 1, w1);
  }
  __device__ __forceinline__ void add_quad(index_t at, const A (&w)[4], int, int) const {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (w[k] != A(0)) add(at + k, w[k]);
  }
};

// Warp-mode backward of RoIAlign (see kWarpBins in roi_common.cuh) for RoIs
// whose samples reach at most 32 pixel columns.

// A superset of the pixel columns the x samples of an axis-aligned grid
// reach, [first, last]; false when no sample lies on the map.
template <typename A>
__device__ __forceinline__ bool sample_columns(const AlignGrid<A>& g, int width, int pw, int& first, int& last) {
  if (g.grid_w <= 0) return false;
  A a = g.sample_x(0, 0), b = g.sample_x(pw - 1, g.grid_w - 1);
  if (a > b) { const A t = a; a = b; b = t; }  // inverted box (aligned=True)
  if (b < A(-1) || a > A(width)) return false;
  first = a <= A(0) ? 0 : min((int)a, width - 1);
  last = b >= A(width - 1) ? width - 1 : (int)b + 1;
  return true;
}

// Wx_j(col) for j < pw: the weights bin j's x samples give pixel column col.
// One loop over the samples (the 16 slots taken by selects, not indexing,
// which would move wx to local memory): unrolled per bin, the sample code
// came 16 times and doubled the family's compile time.
template <typename A>
__device__ __forceinline__ void column_weights(const AlignGrid<A>& g, int width, int pw, int col,
                                               A (&wx)[kWarpBins]) {
#pragma unroll
  for (int j = 0; j < kWarpBins; ++j) wx[j] = A(0);
  for (int j = 0; j < pw; ++j)
    for (int s = 0; s < g.grid_w; ++s) {
      int lo, hi; A w_lo, w_hi;
      if (!axis_weights(g.sample_x(j, s), width, lo, hi, w_lo, w_hi)) continue;
      const A w = (lo == col ? w_lo : A(0)) + (hi == col ? w_hi : A(0));
#pragma unroll
      for (int u = 0; u < kWarpBins; ++u)
        if (u == j) wx[u] += w;
    }
}

// T_i of a lane for `channels` channels: sum_j grad_ij * wx[j] * scale over
// bin row i (grad_row; channels grad_step apart, bins go_s3), bins of zero
// weight left out (a NaN gradient reaches only its bin's pixels).
template <typename A, typename T>
__device__ __forceinline__ void column_sums(const T* grad_row, index_t grad_step, index_t go_s3, int pw,
                                            int channels, const A (&wx)[kWarpBins], A scale,
                                            A (&sum)[kWarpChannels]) {
#pragma unroll
  for (int t = 0; t < kWarpChannels; ++t) sum[t] = A(0);
#pragma unroll
  for (int j = 0; j < kWarpBins; ++j) {
    if (j >= pw) break;
    if (wx[j] == A(0)) continue;
#pragma unroll
    for (int t = 0; t < kWarpChannels; ++t)
      if (t < channels) sum[t] = fused(to_acc(grad_row[t * grad_step + j * go_s3]), wx[j], sum[t]);
  }
#pragma unroll
  for (int t = 0; t < kWarpChannels; ++t) sum[t] *= scale;
}

// Most (x sample, corner) slots of a RoI past 32 columns that the warp takes
// as sparse columns (two passes); with more samples (adaptive sampling of
// wide boxes) the columns are dense and go 32 at a time.
constexpr int kSparseSlots = 64;

// A RoI whose x samples reach past 32 pixel columns has sparse columns
// (sampling 2 at Mask R-CNN scale: 28 of ~100), so the warp's lanes take the
// x samples' two pixel columns each instead, (sample, corner) slot `slot` of
// `slots`: the lane's column col and its weight in its sample's bin alone,
// in wx (zero where the slot is past the last or its sample off the map).
// A row's adds then meet in a few sectors, where bin by bin each pair of
// corners is an L2 operation of its own. Two samples' corners on one pixel
// are two lanes' adds.
template <typename A>
__device__ __forceinline__ void sparse_column_weights(const AlignGrid<A>& g, int width, int slot, int slots,
                                                      int& col, A (&wx)[kWarpBins]) {
#pragma unroll
  for (int u = 0; u < kWarpBins; ++u) wx[u] = A(0);
  col = 0;
  if (slot >= slots) return;
  const int sample = slot >> 1, j = sample / g.grid_w;
  int lo, hi; A w_lo, w_hi;
  if (!axis_weights(g.sample_x(j, sample % g.grid_w), width, lo, hi, w_lo, w_hi)) return;
  // the second corner only where it is another column (at the border both are the last)
  const bool second = (slot & 1) != 0;
  col = second ? hi : lo;
  const A w = second ? (hi != lo ? w_hi : A(0)) : w_lo + (hi == lo ? w_hi : A(0));
#pragma unroll
  for (int u = 0; u < kWarpBins; ++u)
    if (u == j) wx[u] = w;
}

// The gradient of RoI grid g over `channels` (at most kWarpChannels) planes
// plane_step apart (grad: the RoI's first channel of grad_output, grad_step
// between channels), by the warp: lanes over columns (the y samples' rows
// and weights worked out once for all channels); past 32 columns, lanes over
// the x samples' columns (sparse_column_weights) or, for more than
// kSparseSlots of them (adaptive sampling: the columns are dense), over 32
// columns at a time. Bin by bin instead, the lanes of a wide RoI made every
// pair of corners an L2 operation of its own.
template <typename A, typename T>
__device__ __forceinline__ void warp_scatter_roi(const GradSink<A>& sink, index_t plane, index_t plane_step,
                                                 index_t s2, index_t s3, int height, int width,
                                                 const AlignGrid<A>& g, int ph, int pw, const T* grad,
                                                 index_t grad_step, index_t go_s2, index_t go_s3, int channels) {
  const int lane = threadIdx.x & 31;
  int first, last;
  if (!sample_columns(g, width, pw, first, last)) return;
  const int slots = 2 * pw * g.grid_w;
  const bool wide = last - first >= kWarpColumns, sparse = wide && slots <= kSparseSlots;
  const auto rows_pass = [&](int col, const A (&wx)[kWarpBins]) {
    const RowSink<A> flush{sink, plane + col * s3, s2, plane_step, channels};
    RowRun<A, 2> rows;
    for (int i = 0; i < ph; ++i) {
      A sum[kWarpChannels];
      column_sums(grad + i * go_s2, grad_step, go_s3, pw, channels, wx, g.inv_count, sum);
      for (int sy = 0; sy < g.grid_h; ++sy) {
        int lo, hi; A w_lo, w_hi;
        if (!axis_weights(g.sample_y(i, sy), height, lo, hi, w_lo, w_hi)) continue;
        rows.add_pair(lo, w_lo, hi != lo ? w_hi : A(0), sum, flush);
      }
    }
    rows.finish(flush);
  };
  if (wide && !sparse) {  // dense: 32 columns a pass
    for (int c0 = first; c0 <= last; c0 += kWarpColumns) {
      A wx[kWarpBins];
      column_weights(g, width, pw, c0 + lane, wx);
      rows_pass(c0 + lane, wx);
    }
    return;
  }
  for (int pass = 0; pass < (sparse ? (slots + 31) / 32 : 1); ++pass) {
    int col = first + lane;
    A wx[kWarpBins];
    if (sparse) sparse_column_weights(g, width, pass * 32 + lane, slots, col, wx);
    else column_weights(g, width, pw, col, wx);
    rows_pass(col, wx);
  }
}

// Rotated row (batch_index, cx, cy, w, h, theta): its grid and frame.
template <typename A>
__device__ __forceinline__ bool load_rotated(const A* rois, index_t k, int batch, A scale, int ph, int pw,
                                             int sampling_ratio, bool aligned, bool clockwise, int& b,
                                             AlignGrid<A>& g, RotatedFrame<A>& f) {
  A v[5];
  if (!load_row<6>(rois, k, batch, b, v)) return false;
  const A offset = aligned ? A(0.5) : A(0);
  const A theta = clockwise ? -v[4] : v[4];
  f.cx = v[0] * scale - offset;
  f.cy = v[1] * scale - offset;
  f.cos_t = cos(theta);
  f.sin_t = sin(theta);
  g.set_centred(v[2], v[3], scale, ph, pw, sampling_ratio, aligned);
  return true;
}

// Feature-pyramid level of a box (x1, y1, x2, y2) in image coordinates:
//   mode 1 (torchvision LevelMapper): floor(lvl0 + log2(sqrt(area) / s0) + 1e-6),
//   mode 2 (mmdetection):             floor(log2(sqrt(area) / s0 + 1e-6)),
// clamped to [lo, hi], minus lo. Mode 0: one level. -1 for a NaN level (an
// area below zero), whose row both libraries leave at zero. The operations
// and their order are those PyTorch's CUDA kernels run for the Python mappers
// (a division by a Python number is a product with its reciprocal there), so
// that a box on a level boundary lands where torchvision puts it.
template <typename A>
__device__ __forceinline__ int pyramid_level(A x1, A y1, A x2, A y2, int mode, A s0, int lvl0, int lo, int hi) {
  if (mode == 0) return 0;
  const A s = sqrt((x2 - x1) * (y2 - y1)) * (A(1) / s0);
  const A t = mode == 1 ? floor((A(lvl0) + log2(s)) + A(1e-6)) : floor(log2(s + A(1e-6)));
  if (t != t) return -1;
  return (int)min(max(t, A(lo)), A(hi)) - lo;
}

// The levels of a multi-level call, passed by value (kernel parameters are
// constant memory: no table to copy to the device, and CUDA graphs keep it).
// data[l] is the level's map (forward) or gradient buffer (backward).
constexpr int kMaxLevels = 8;
struct LevelTable {
  unsigned long long data[kMaxLevels];
  index_t s0[kMaxLevels], s1[kMaxLevels], s2[kMaxLevels], s3[kMaxLevels];
  double scale[kMaxLevels];
  int height[kMaxLevels], width[kMaxLevels];
  int count;
};

}  // namespace cupy_roi

using namespace cupy_roi;

// The grid-stride loop of roi_align_forward, with its kind of channel group.
template <typename T, bool PS, int CPT, bool kVectors, typename A>
__device__ __forceinline__ void roi_align_forward_bins(const T* input, int batch, int height, int width,
                                                       const Strides4& in, const A* rois, index_t num_rois,
                                                       int channels_out, int ph, int pw, A spatial_scale,
                                                       int sampling_ratio, int aligned, int channel_block,
                                                       const int* order, T* output, const OutputIndex& out_at,
                                                       bool out_vectors) {
  const index_t total = num_rois * (channels_out / CPT) * ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    BinPos p = decompose_group<CPT, true>(idx, num_rois, channels_out, ph, pw, channel_block);
    const ChannelGroup<CPT, T, kVectors> group(p.c, channel_block < 0 ? -channel_block : channels_out,
                                               group_plane_step<PS>(in.s1, ph, pw));
    p.c = group.first;
    if (order) p.k = order[p.k];
    T* out = output + (order ? out_at.st.at(p.k, p.c, p.i, p.j) : out_at.at<CPT>(idx, p));
    A sum[CPT];
    int b; A x1, y1, x2, y2;
    if (!load_roi(rois, p.k, batch, b, x1, y1, x2, y2)) {
      group.store(out, out_at.st.s1, out_vectors, sum, (const AlignGrid<A>*)nullptr);
      continue;
    }
    AlignGrid<A> g;
    g.set(x1, y1, x2, y2, spatial_scale, ph, pw, sampling_ratio, aligned != 0);
    const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
    const T* plane = input + (index_t)b * in.s0 + (index_t)c_in * in.s1;
    bin_sample_sums(group, plane, in.s2, in.s3, height, width, g, AxisFrame(), p.i, p.j, sum);
    group.store(out, out_at.st.s1, out_vectors, sum, &g);
  }
}

// CPT: output channels per thread (decompose_group); 1 but for plain
// RoIAlign in float types, where the host picks it. Channels-last maps whose
// groups read whole 16-byte vectors take vector groups. order: null, or the
// order to walk the RoIs in (roi_image_order). At most 64 registers
// (4 blocks an SM, as 56 gave), by measurement: Mask R-CNN 7x7 float32
// 3.14 -> 2.64 ms NCHW, 1.60 -> 1.54 channels-last (H100, session 20; in
// NCHW L1 hits rose and L2 sectors read fell 689 M -> 525 M).
template <typename T, bool PS, int CPT = 1>
__global__ void __launch_bounds__(kBlockThreads, 4) roi_align_forward(
    const T* __restrict__ input, int batch, int height, int width,
    index_t in_s0, index_t in_s1, index_t in_s2, index_t in_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw,
    typename acc_type<T>::type spatial_scale, int sampling_ratio, int aligned,
    int channel_block,
    T* __restrict__ output, index_t out_s0, index_t out_s1, index_t out_s2, index_t out_s3,
    const int* __restrict__ order) {
  constexpr int V = vector_width<T>::value;
  // 8, the channels-fastest order's group (_rules._group_target): the NCHW
  // order's 4 keeps its registers.
  constexpr bool kMayVector = !PS && V > 1 && CPT == 8 && CPT % V == 0;
  const OutputIndex out_at(out_s0, out_s1, out_s2, out_s3, channels_out, ph, pw, channel_block);
  const Strides4 in = make_strides(in_s0, in_s1, in_s2, in_s3);
  if (kMayVector && channel_block <= 0 && vector_layout<V>(input, in_s0, in_s1, in_s2, in_s3))
    roi_align_forward_bins<T, PS, CPT, kMayVector>(input, batch, height, width, in, rois, num_rois, channels_out, ph,
                                                   pw, spatial_scale, sampling_ratio, aligned, channel_block, order,
                                                   output, out_at,
                                                   vector_layout<V>(output, out_s0, out_s1, out_s2, out_s3));
  else
    roi_align_forward_bins<T, PS, CPT, false>(input, batch, height, width, in, rois, num_rois, channels_out, ph, pw,
                                              spatial_scale, sampling_ratio, aligned, channel_block, order, output,
                                              out_at, false);
}

// Exclusive prefix sums of in[0 .. count) into out[0 .. count], out[count]
// the total, by all the block's threads (whole warps, at most 1024); out may
// be in (each thread rewrites only the run it read). scratch: 32 ints of
// shared memory. Every thread reads out after it returns.
__device__ __forceinline__ void block_exclusive_scan(const int* in, int count, int* out, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int per = (count + (int)blockDim.x - 1) / (int)blockDim.x;
  const int lo = min(count, (int)threadIdx.x * per), hi = min(count, lo + per);
  int own = 0;
  for (int i = lo; i < hi; ++i) own += in[i];
  int below = own;  // the warp's inclusive sums
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, below, m);
    if (lane >= m) below += v;
  }
  if (lane == 31) scratch[warp] = below;
  __syncthreads();
  if (warp == 0) {
    int w = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0;
#pragma unroll
    for (int m = 1; m < 32; m <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, w, m);
      if (lane >= m) w += v;
    }
    scratch[lane] = w;
  }
  __syncthreads();
  int run = below - own + (warp > 0 ? scratch[warp - 1] : 0);
  for (int i = lo; i < hi; ++i) {
    const int c = in[i];
    out[i] = run;
    run += c;
  }
  if (threadIdx.x == blockDim.x - 1) out[count] = run;
  __syncthreads();
}

// The order roi_align_forward walks the RoIs in, where their rows come in
// any order of images: order[0 .. num_rois) lists RoI indices image by image
// (rows of an invalid batch index last), so that the RoIs running together
// read one image's map, which L2 holds, instead of every image's
// (benchmarks/NOTES.md, session 20). Where starts is given, image b's RoIs
// take places starts[b] .. starts[b + 1] (b = batch: the invalid rows). Which
// thread computes a RoI never changes its result. One block of kOrderThreads
// threads; batch at most kMaxOrderImages, num_rois below 2^31 (the host
// checks both). A thread reads kOrderLoads batch indices before it claims
// places for them, and the lanes of a warp on one image claim theirs
// together. Up to kOrderWarpImages images, each warp counts and places in
// its own counters, without atomics; beyond, all warps share one counter an
// image. With one counter an image and a load's latency per claim, 256
// threads took 93 us for 8192 RoIs of 16 images (H100, session 24).
constexpr int kMaxOrderImages = 4096;
constexpr int kOrderThreads = 1024, kOrderWarps = kOrderThreads / 32, kOrderLoads = 4, kOrderWarpImages = 128;

template <typename T, bool PS>
__global__ void __launch_bounds__(kOrderThreads) roi_image_order(
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois, int batch, int* __restrict__ order,
    int* __restrict__ starts) {
  typedef typename acc_type<T>::type A;
  __shared__ int next[kMaxOrderImages + 2];  // per image: its count, then its next free place; the total
  __shared__ int scratch[32];
  __shared__ int warp_next[kOrderWarps][kOrderWarpImages];  // the same per warp, where batch allows
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool per_warp = batch < kOrderWarpImages;
  const auto image = [&](index_t k) {
    const A bf = rois[k * 5];
    return bf >= A(0) && bf < A(batch) && bf == floor(bf) ? (int)bf : batch;
  };
  // this lane's place for a RoI of image b (b < 0: none): the warp's lanes on one image take
  // theirs together. All the warp's lanes call it at once, and the first place reaches a
  // group's lanes through shared memory between warp syncs: a shuffle among each group's
  // lanes ran one group at a time.
  const auto claim = [&](int b) {
    const unsigned peers = __match_any_sync(0xffffffffu, b);
    const bool leader = b >= 0 && lane == __ffs(peers) - 1;
    const int rank = __popc(peers & ((1u << lane) - 1));
    int first;
    if (per_warp) {  // the warp's own counters
      first = b >= 0 ? warp_next[warp][b] : 0;
      __syncwarp();
      if (leader) warp_next[warp][b] = first + __popc(peers);
    } else {  // the shared ones; the leader hands the first place on through warp_next[warp][its lane]
      if (leader) warp_next[warp][lane] = atomicAdd(&next[b], __popc(peers));
      __syncwarp();
      first = b >= 0 ? warp_next[warp][__ffs(peers) - 1] : 0;
    }
    __syncwarp();
    return first + rank;
  };
  // the images of this lane's RoIs from the warp's k0: k0 + lane, then blockDim.x on
  // (kOrderLoads of them; -1 past the last)
  const auto load = [&](index_t k0, int (&b)[kOrderLoads]) {
#pragma unroll
    for (int u = 0; u < kOrderLoads; ++u) {
      const index_t k = k0 + lane + u * blockDim.x;
      b[u] = k < num_rois ? image(k) : -1;
    }
  };
  // the warp's k0: the same on all its lanes, so that they can sync between claims (a warp's
  // own counters are read by the next claim's leader)
  const index_t step = kOrderLoads * blockDim.x, warp_k0 = threadIdx.x - lane;
  for (int b = threadIdx.x; b <= batch; b += blockDim.x) next[b] = 0;
  if (per_warp)
    for (int b = lane; b <= batch; b += 32) warp_next[warp][b] = 0;
  __syncthreads();
  for (index_t k0 = warp_k0; k0 < num_rois; k0 += step) {
    int b[kOrderLoads];
    load(k0, b);
#pragma unroll
    for (int u = 0; u < kOrderLoads; ++u) claim(b[u]);
  }
  __syncthreads();
  if (per_warp) {  // each image's count, and each warp's first place in it relative to the image's
    for (int b = threadIdx.x; b <= batch; b += blockDim.x) {
      int count = 0;
      for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
        const int c = warp_next[w][b];
        warp_next[w][b] = count;
        count += c;
      }
      next[b] = count;
    }
    __syncthreads();
  }
  block_exclusive_scan(next, batch + 1, next, scratch);  // each image's first place, then the total
  if (starts)
    for (int b = threadIdx.x; b <= batch + 1; b += blockDim.x) starts[b] = next[b];
  __syncthreads();  // the starts read before the shared counters' claims move them
  if (per_warp)
    for (int b = lane; b <= batch; b += 32) warp_next[warp][b] += next[b];
  __syncwarp();
  for (index_t k0 = warp_k0; k0 < num_rois; k0 += step) {
    int b[kOrderLoads];
    load(k0, b);
#pragma unroll
    for (int u = 0; u < kOrderLoads; ++u) {
      const int place = claim(b[u]);
      if (b[u] >= 0) order[place] = (int)(k0 + lane + u * blockDim.x);
    }
  }
}

// p[0 .. count) = 0: roi_align_plane_geometry's counts, before it adds to them
template <typename T, bool PS>
__global__ void zero_ints(int* __restrict__ p, index_t count) {
  for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (index_t)blockDim.x * gridDim.x)
    p[i] = 0;
}

// The plane forward's order (order[0 .. num_rois), then starts[0 .. parts])
// from roi_align_plane_geometry's slots and counts: RoI k is number
// slots[k].y of bucket slots[k].x (part * kWidthClasses + width class); counts
// holds each bucket's RoIs, then each part's. Parts in turn, each by width
// class: which two RoIs share a warp of the plane forward sets how many of its
// reads fall in one bank, and RoIs of about the same width conflict less
// (benchmarks/plane_banks.py). A warp a RoI, its lanes sum the classes below
// its own, four each. Within a bucket the places follow the geometry's
// atomics: which thread computes a RoI never changes its result. parts at
// most kMaxOrderImages + 1 (the host checks).
constexpr int kWidthClasses = 128, kPlaceThreads = 256;

template <typename T, bool PS>
__global__ void __launch_bounds__(kPlaceThreads) roi_plane_order(const int2* __restrict__ slots, index_t num_rois,
                                                                 int parts, const int* __restrict__ counts,
                                                                 int* __restrict__ order) {
  __shared__ int part_start[kMaxOrderImages + 2];
  __shared__ int scratch[32];
  // every block scans the part counts for itself (at most 4097 ints, from L2) rather than read
  // them from a kernel before it: one launch fewer on the forward's path, and no grid-wide wait
  block_exclusive_scan(counts + parts * kWidthClasses, parts, part_start, scratch);
  int* starts = order + num_rois;
  if (blockIdx.x == 0)
    for (int p = threadIdx.x; p <= parts; p += blockDim.x) starts[p] = part_start[p];
  const int lane = threadIdx.x & 31;
  for (index_t k = ((index_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; k < num_rois;
       k += ((index_t)blockDim.x * gridDim.x) >> 5) {
    const int2 slot = slots[k];
    const int part = slot.x / kWidthClasses, width_class = slot.x - part * kWidthClasses;
    const int4 c = reinterpret_cast<const int4*>(counts + part * kWidthClasses)[lane];
    const int first = 4 * lane;
    int below = (first < width_class ? c.x : 0) + (first + 1 < width_class ? c.y : 0) +
                (first + 2 < width_class ? c.z : 0) + (first + 3 < width_class ? c.w : 0);
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) below += __shfl_xor_sync(0xffffffffu, below, m);
    if (lane == 0) order[part_start[part] + below + slot.y] = (int)k;
  }
}

// Plane mode of the RoIAlign forward, for NCHW-like maps past L2: a block
// per (image, channel) copies the channel's plane into shared memory once and
// pools every RoI of the image from it. The flat grid reads each sample's
// corners through L2 (two 32-byte sectors for 8 useful bytes), and on Mask
// R-CNN's map, whose RoIs cover each cell ~40 times, that traffic bound it
// (L2 throughput 97%, benchmarks/NOTES.md sessions 19-20); here L2 serves
// each plane once. A RoI's sampling geometry is the same for every channel,
// so roi_align_plane_geometry works it out once per call into a table
// (PlaneRoi) that every channel's block reads. A warp takes as many RoIs as
// fit in 32 lanes of one x sample each (2 at 7x7 with 2 x 2 samples a bin)
// and walks their bin rows: a lane reads its sample's four corners (lanes of
// one RoI read one row, so their reads fall in different banks unless their
// columns are 32 apart) and the lanes of a bin add up by shuffles. The
// host's rule (_rules.forward_plane) keeps to a fixed sampling grid of 1, 2
// or 4 and at most kPlaneSamples samples an axis.
constexpr int kPlaneThreads = 1024;
constexpr int kPlaneWarps = kPlaneThreads / 32;
constexpr int kPlaneSamples = 32;

// One sample's axis_weights: lo/hi are byte offsets in the plane (rows times
// the plane's row stride). A column off the map has lo < 0; a row off the map
// points at the zero row below the plane with zero weights, so that the lanes
// read and add zeros instead of branching. A RoI with a NaN or infinite
// coordinate has all its samples off the map.
template <typename A>
struct __align__(16) PlaneAxis { int lo, hi; A w_lo, w_hi; };

template <typename A>
struct PlaneRoi {
  A inv_count;
  int valid;  // 0: a NaN or infinite coordinate (NaN outputs)
  A y_start, bin_h;  // AlignGrid's, for the forward only: it works its rows out from them
  PlaneAxis<A> rows[kPlaneSamples];  // the tile backward's only
  PlaneAxis<A> cols[kPlaneSamples];
};
static_assert(sizeof(PlaneRoi<float>) == 1040, "_rules.PLANE_ROI_BYTES");

// A sample's axis_weights (on: it lies on the map) as a table entry, lo/hi
// times scale; off the map, off_map and zero weights.
template <typename A>
__device__ __forceinline__ PlaneAxis<A> plane_axis(bool on, int lo, int hi, A w_lo, A w_hi, int scale,
                                                   int off_map) {
  return on ? PlaneAxis<A>{lo * scale, hi * scale, w_lo, w_hi} : PlaneAxis<A>{off_map, off_map, A(0), A(0)};
}

// The lowest lo and highest hi over a warp's lanes (on: the lane's sample
// lies on the map), as shorts: the range is empty (first > last) when none
// does. Shuffles rather than __reduce_*_sync, which needs sm_80.
__device__ __forceinline__ void warp_reach(bool on, int lo, int hi, short& first, short& last) {
  lo = on ? lo : 0x7fff;
  hi = on ? hi : -1;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, m));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, m));
  }
  first = (short)min(lo, 0x7fff);
  last = (short)min(hi, 0x7fff);
}

// A warp a RoI: table[k] for every RoI k (rows of an invalid batch index too,
// though the plane kernels read none of theirs), the fields its kernel reads:
// y_start and bin_h where slots is given (the plane forward), rows where it is
// not (the tile backward). Where slots is given, RoI k goes into a bucket for
// roi_plane_order: its part (2 b for the RoIs of image b that read no row from
// split_row - 1 on, which the forward pools while the rest of the plane
// arrives; 2 b + 1 for the others; 2 batch for rows the forward writes NaN for)
// times kWidthClasses plus its width class, and slots[k] = (bucket, its rank
// among the bucket's RoIs, from an atomic on counts[bucket]);
// counts[(2 batch + 1) * kWidthClasses + part] counts the part's RoIs. counts
// comes zero-filled (zero_ints). Rows lo/hi are in units of row_bytes,
// columns of item bytes: the forward's byte offsets in its plane, or pixel
// indices (1, 1) for the tile backward. Where reach is given (the tile
// backward), reach[r] (4 shorts) is the first and last pixel row, first and
// last column that the samples of RoI order[r] reach (first > last: none), in
// the order's places: the tile kernel's test of which RoIs reach a tile reads
// them 32 places at a time.
template <typename T, bool PS>
__global__ void roi_align_plane_geometry(
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois, int batch, int height, int width,
    int row_bytes, int item, int ph, int pw, typename acc_type<T>::type spatial_scale, int sampling_ratio,
    int aligned, void* __restrict__ table, const int* __restrict__ order, void* __restrict__ reach, int split_row,
    int2* __restrict__ slots, int* __restrict__ counts) {
  typedef typename acc_type<T>::type A;
  PlaneRoi<A>* geo = reinterpret_cast<PlaneRoi<A>*>(table);
  const int lane = threadIdx.x & 31;
  for (index_t r = ((index_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < num_rois;
       r += ((index_t)blockDim.x * gridDim.x) >> 5) {
    const index_t k = order ? order[r] : r;
    PlaneRoi<A>& t = geo[k];
    int b; A x1, y1, x2, y2;
    const bool ok = load_roi(rois, k, batch, b, x1, y1, x2, y2);
    AlignGrid<A> g;
    g.set(x1, y1, x2, y2, spatial_scale, ph, pw, sampling_ratio, aligned != 0);
    const int n = sampling_ratio;
    const A off_map = A(-2);  // any position axis_weights drops
    int lo, hi;
    A w_lo, w_hi;
    short reach_of[4];
    const bool row_on = lane < ph * n && axis_weights(ok ? g.sample_y(lane / n, lane % n) : off_map, height, lo,
                                                      hi, w_lo, w_hi);
    warp_reach(row_on, lo, hi, reach_of[0], reach_of[1]);
    // the rows' table for the tile backward; the forward works them out from y_start and bin_h
    if (!slots && lane < ph * n) t.rows[lane] = plane_axis(row_on, lo, hi, w_lo, w_hi, row_bytes, height * row_bytes);
    const bool col_on = lane < pw * n && axis_weights(ok ? g.sample_x(lane / n, lane % n) : off_map, width, lo,
                                                      hi, w_lo, w_hi);
    warp_reach(col_on, lo, hi, reach_of[2], reach_of[3]);
    if (lane < pw * n) t.cols[lane] = plane_axis(col_on, lo, hi, w_lo, w_hi, item, -1);
    if (lane == 0) {
      t.inv_count = g.inv_count;
      t.valid = ok;
      if (reach) reinterpret_cast<short4*>(reach)[r] = make_short4(reach_of[0], reach_of[1], reach_of[2], reach_of[3]);
      if (slots) {
        t.y_start = g.y_start;
        t.bin_h = g.bin_h;
        // part: the RoI's image, twice, +1 where it reaches row split_row - 1 or further (a row's
        // margin for the forward's own sums); 2 batch for rows the forward writes NaN for
        const int part = ok ? 2 * b + (reach_of[0] <= reach_of[1] && reach_of[1] >= split_row - 1) : 2 * batch;
        const A width = fabs(g.bin_w) * pw;
        const int width_class = !ok ? 0 : width < A(kWidthClasses - 1) ? (int)width : kWidthClasses - 1;
        const int bucket = part * kWidthClasses + width_class;
        const int rank = atomicAdd(counts + bucket, 1);
        atomicAdd(counts + (2 * batch + 1) * kWidthClasses + part, 1);
        slots[k] = make_int2(bucket, rank);
      }
    }
  }
}

// dst[0 .. 16 bytes) = src[0 .. 16 bytes), asynchronously where the device
// can (plane_copy_wait waits for all of this thread's).
__device__ __forceinline__ void plane_copy16(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
  const unsigned at = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(at), "l"(src));
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

__device__ __forceinline__ void plane_copy_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

#if __CUDA_ARCH__ >= 900
// The plane's rows through the copy engine (cp.async.bulk), which one thread
// starts and an mbarrier counts in bytes, instead of 13 thread copies
// (cp.async) a thread: Mask R-CNN 7x7 float32 1350 -> 1263 us (H100,
// session 25). Not for bandwidth: copying alone, both take about as long
// (benchmarks/plane_copy.py). Rows go as one run of bytes where the plane is
// contiguous in both places. Every thread waits on the barrier's first phase
// (plane_bulk_wait), after a __syncthreads that shows it the initialization
// (plane_bulk_init); plane_bulk_copy starts a copy that a barrier counts.
__device__ __forceinline__ void plane_bulk_init(unsigned bar) {
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
}

__device__ __forceinline__ void plane_bulk_copy(unsigned dst, const char* src, int rows, unsigned row_bytes,
                                                unsigned dst_step, size_t src_step, unsigned bar) {
  constexpr unsigned kMaxBulk = 1u << 16;  // bytes a copy instruction, well below the barrier's tx limit
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(rows * row_bytes)
                 : "memory");
    const bool contiguous = dst_step == row_bytes && src_step == row_bytes;
    const int runs = contiguous ? 1 : rows;
    const unsigned run_bytes = contiguous ? rows * row_bytes : row_bytes;
    for (int r = 0; r < runs; ++r)
      for (unsigned o = 0; o < run_bytes; o += kMaxBulk)
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                dst + r * dst_step + o),
            "l"(src + r * src_step + o), "r"(min(kMaxBulk, run_bytes - o)), "r"(bar)
            : "memory");
  }
}

// Rows from .. to of the (.. x width) plane at src (row stride s2, unit
// column stride) through the copy engine into shared memory, rows
// plane_stride elements apart, counted by the barrier at bar.
template <typename T>
__device__ __forceinline__ void plane_bulk_rows(T* plane, int plane_stride, const T* src, index_t s2, int width,
                                                int from, int to, unsigned long long* bar) {
  plane_bulk_copy((unsigned)__cvta_generic_to_shared(plane + from * plane_stride),
                  reinterpret_cast<const char*>(src + from * s2), to - from, width * sizeof(T),
                  plane_stride * sizeof(T), s2 * sizeof(T), (unsigned)__cvta_generic_to_shared(bar));
}

__device__ __forceinline__ void plane_bulk_wait(unsigned bar) {
  asm volatile(
      "{\n"
      " .reg .pred done;\n"
      "wait:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n"
      " @!done bra wait;\n"
      "}" ::"r"(bar)
      : "memory");
}
#endif

// Starts copying the (height x width) plane at src (row stride s2, column
// stride s3) into shared memory, rows plane_stride elements apart, and zeros
// the row below it: whole rows through the copy engine, or 16 bytes a
// thread-copy, where rows allow. Returns true where the copy engine copies:
// it has started on rows 0 .. split_row, which bar[0] counts (every thread
// waits for them, plane_bulk_wait, after a __syncthreads); the caller copies
// the rest on bar[1] (plane_bulk_rows). Other copies are done when it
// returns, each thread's visible to the others after a __syncthreads. bar:
// two 8-byte words of shared memory for the copy engine's barriers.
template <typename T>
__device__ __forceinline__ bool plane_copy_start(T* plane, int plane_stride, const T* src, int height, int width,
                                                 index_t s2, index_t s3, int split_row, unsigned long long* bar) {
  constexpr int kVec = 16 / sizeof(T);
  for (int e = threadIdx.x; e < plane_stride; e += kPlaneThreads) plane[height * plane_stride + e] = T();
  if (s3 == 1 && width % kVec == 0 && s2 % kVec == 0 && plane_stride % kVec == 0 && aligned16(src)) {
#if __CUDA_ARCH__ >= 900
    plane_bulk_init((unsigned)__cvta_generic_to_shared(bar));
    plane_bulk_init((unsigned)__cvta_generic_to_shared(bar + 1));
    plane_bulk_rows(plane, plane_stride, src, s2, width, 0, min(split_row, height), bar);
    return true;
#else
    const int per_row = width / kVec, total = height * per_row;
    for (int e = threadIdx.x; e < total; e += kPlaneThreads) {
      const int r = e / per_row, q = (e - r * per_row) * kVec;
      plane_copy16(plane + r * plane_stride + q, src + r * s2 + q);
    }
    plane_copy_wait();
    return false;
#endif
  }
  const int total = height * width;
  for (int e = threadIdx.x; e < total; e += 4 * kPlaneThreads) {
    T v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int at = e + u * kPlaneThreads, r = at / width;
      if (at < total) v[u] = src[r * s2 + (at - r * width) * s3];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int at = e + u * kPlaneThreads, r = at / width;
      if (at < total) plane[r * plane_stride + (at - r * width)] = v[u];
    }
  }
  return false;
}

// Brings the lines of a RoI's table entry t that a lane of its slot reads
// (the first, and where column: its x sample's) into L1: prefetches, which
// hold no registers while the lines come.
template <typename A>
__device__ __forceinline__ void plane_table_prefetch(const PlaneRoi<A>* t, int l, bool column) {
  asm volatile("prefetch.global.L1 [%0];" ::"l"(t));
  if (column) asm volatile("prefetch.global.L1 [%0];" ::"l"(t->cols + l));
}

// plane_pool's lanes: slots of a power of two lanes, at least a RoI's pw * n
// x samples, a RoI a slot, per_warp slots a warp; this lane is lane l of
// slot q. The warp's first RoIs are first + warp * per_warp on.
struct PlaneSlots {
  int per_warp, q, l;
  __device__ __forceinline__ PlaneSlots(int pw, int n) {
    const int lane = threadIdx.x & 31, bits = 32 - __clz(pw * n - 1);
    per_warp = 32 >> bits;
    q = lane >> bits;
    l = lane & ((1 << bits) - 1);
  }
  __device__ __forceinline__ int warp_first(int first) const { return first + (int)(threadIdx.x >> 5) * per_warp; }
};

__device__ __forceinline__ float shared_value(const float*, unsigned at) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(at));
  return v;
}
__device__ __forceinline__ float shared_value(const __half*, unsigned at) {
  unsigned short v;
  asm volatile("ld.shared.b16 %0, [%1];" : "=h"(v) : "r"(at));
  return __half2float(__ushort_as_half(v));
}
__device__ __forceinline__ float shared_value(const __nv_bfloat16*, unsigned at) {
  unsigned short v;
  asm volatile("ld.shared.b16 %0, [%1];" : "=h"(v) : "r"(at));
  return __bfloat162float(__ushort_as_bfloat16(v));
}

// The RoIs order[first .. last) of the block's plane, N x N samples a bin.
// The warp's lanes make slots of a power of two lanes, at least the RoI's x
// samples, a RoI a slot; lane l of a slot takes x sample l (its columns from
// the table, in one round trip to L2 a RoI) and works out each row as the
// rows are walked.
template <int N, typename T, typename A>
__device__ __forceinline__ void plane_pool(const T* plane, const int* order, int first, int last,
                                           const PlaneRoi<A>* geo, int height, unsigned row_bytes, int ph, int pw,
                                           T* output, index_t out_s0, index_t out_s2, index_t out_s3, int split,
                                           unsigned rest_bar) {
  static_assert(sizeof(A) == 4, "float positions: the plane modes take no float64");
  const PlaneSlots slots(pw, N);
  const int per_warp = slots.per_warp, q = slots.q, l = slots.l;
  const int j = l / N;
  const bool writer = j < pw && (l & (N - 1)) == 0;
  const unsigned base = (unsigned)__cvta_generic_to_shared(plane);
  constexpr float kTwo23 = 8388608.0f;
  // a row's byte offset from the bits of 2^23 + its index (mod 2^32)
  const unsigned col_base = 0u - __float_as_uint(kTwo23) * row_bytes;
  const unsigned last_row_bits = __float_as_uint(kTwo23) + height - 1;
  for (int r0 = slots.warp_first(first); r0 < last; r0 += kPlaneWarps * per_warp) {
#if __CUDA_ARCH__ >= 900
    if (rest_bar && r0 + per_warp > split) {  // a RoI of part 2 b + 1: the plane's other rows
      plane_bulk_wait(rest_bar);
      rest_bar = 0;
    }
#endif
    const int r = r0 + q;
    const bool live = r < last;
    const index_t k = order[live ? r : first];  // a slot past the last reads the first RoI, writes nothing
    const PlaneRoi<A>* t = geo + k;
    const bool valid = t->valid;
    const A inv_count = t->inv_count;
    // an invalid RoI's rows: off the map (NaN outputs)
    const A y_start = valid ? t->y_start : A(-2), bin_h = valid ? t->bin_h : A(0);
    PlaneAxis<A> x;
    x.lo = -1;
    if (j < pw) x = t->cols[l];
    const bool on_map = x.lo >= 0;  // a column off the map adds nothing: its lanes read column 0, sum 0
    const unsigned col_lo = base + (on_map ? x.lo : 0), col_hi = base + (on_map ? x.hi : 0);
    const A hx = x.w_lo, lx = x.w_hi;
    T* o = output + k * out_s0 + j * out_s3;
    const int next = r + kPlaneWarps * per_warp;  // this slot's next RoI
    const int next_k = next < last ? order[next] : -1;
    for (int i = 0; i < ph; ++i, o += out_s2) {
      // the next RoI's table lines into L1 while this one pools: the round
      // trips to L2 at the top of each RoI pair took ~10% of the stall samples
      if (i == (ph > 1) && next_k >= 0) plane_table_prefetch(geo + next_k, l, j < pw);
      const A y_bin = y_start + i * bin_h;
      A sum = A(0);
#pragma unroll
      for (int iy = 0; iy < N; ++iy) {
        // The row's position, clamped as axis_weights clamps it (height off
        // the map: the zero row), worked out in the lane: the shuffles of the
        // table's rows (three a row) ran in the shared-memory pipe that the
        // plane's reads fill (Mask R-CNN 7x7 float32, H100, session 26: 1.27
        // -> 1.07 ms). Its floor comes from its sum with 2^23 rounded down,
        // whose bits are 2^23's plus the floor.
        const A y = y_bin + (iy + A(0.5)) * bin_h / N;
        const A at = y < A(-1) || y > A(height) ? A(height) : min(max(y, A(0)), A(height - 1));
        const A floored = __fadd_rd(at, kTwo23);
        const unsigned bits = __float_as_uint(floored);
        const unsigned lo = col_base + bits * row_bytes;
        const unsigned hi = lo + (bits < last_row_bits ? row_bytes : 0u);
        const A w_hi = at - (floored - kTwo23), w_lo = A(1) - w_hi;
        const A top = fused(lx, shared_value(plane, col_hi + lo), hx * shared_value(plane, col_lo + lo));
        const A bottom = fused(lx, shared_value(plane, col_hi + hi), hx * shared_value(plane, col_lo + hi));
        sum = fused(w_hi, bottom, fused(w_lo, top, sum));
      }
      if (!on_map) sum = A(0);
#pragma unroll
      for (int m = 1; m < N; m <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
      if (writer && live) store(o, valid ? sum * inv_count : quiet_nan<A>());
    }
  }
}

// order: roi_plane_order's list and starts, two parts an image (num_rois +
// 2 batch + 2 ints; from roi_align_plane_geometry with split_row);
// table: roi_align_plane_geometry's. Blocks: batch * channels, images
// fastest, so that the blocks running together read the table's RoIs of
// every image. Shared memory: (height + 1) x plane_stride elements. Through
// the copy engine the plane comes in two copies, rows 0 .. split_row first:
// the image's RoIs of part 2 b pool from them while the rest comes (one copy
// left 0.17 ms of the Mask R-CNN 7x7 forward's 1.06 exposed; two: 1.06 ->
// 1.02 ms, H100, session 27), the others wait for the second copy.
template <typename T, bool PS>
__global__ void __launch_bounds__(kPlaneThreads, 1) roi_align_forward_plane(
    const T* __restrict__ input, int batch, int height, int width,
    index_t in_s0, index_t in_s1, index_t in_s2, index_t in_s3,
    index_t num_rois, int ph, int pw, int sampling_ratio, int plane_stride, int split_row,
    const int* __restrict__ order, const void* __restrict__ table,
    T* __restrict__ output, index_t out_s0, index_t out_s1, index_t out_s2, index_t out_s3) {
  typedef typename acc_type<T>::type A;
  const PlaneRoi<A>* geo = reinterpret_cast<const PlaneRoi<A>*>(table);
  const int* starts = order + num_rois;
  extern __shared__ __align__(16) unsigned char plane_shared[];
  __shared__ __align__(8) unsigned long long copy_barrier[2];
  T* plane = reinterpret_cast<T*>(plane_shared);
  const int b = (int)(blockIdx.x % (unsigned)batch), c = (int)(blockIdx.x / (unsigned)batch);
  output += (index_t)c * out_s1;
  input += (index_t)b * in_s0 + (index_t)c * in_s1;
  // the copy first: it is what the block waits on (an image with no RoIs waits for it too, and leaves)
  const bool bulk = plane_copy_start(plane, plane_stride, input, height, width, in_s2, in_s3, split_row, copy_barrier);
  if (b == 0)  // rows of an invalid batch index
    for (int r = starts[2 * batch] + (threadIdx.x >> 5); r < num_rois; r += kPlaneWarps)
      for (int bin = threadIdx.x & 31; bin < ph * pw; bin += 32) {
        const int i = bin / pw, j = bin - i * pw;
        store(output + order[r] * out_s0 + i * out_s2 + j * out_s3, quiet_nan<A>());
      }
  const int first = starts[2 * b], split = starts[2 * b + 1], last = starts[2 * b + 2];
  {  // the table lines of the slot's first RoI, while the plane comes
    const PlaneSlots slots(pw, sampling_ratio);
    const int r = slots.warp_first(first) + slots.q;
    if (r < last) plane_table_prefetch(geo + order[r], slots.l, slots.l < pw * sampling_ratio);
  }
  __syncthreads();  // the copy engine's barrier initialized; the other copies' elements
  unsigned rest_bar = 0;
#if __CUDA_ARCH__ >= 900
  if (bulk) {
    plane_bulk_wait((unsigned)__cvta_generic_to_shared(copy_barrier));
    rest_bar = (unsigned)__cvta_generic_to_shared(copy_barrier + 1);
    plane_bulk_rows(plane, plane_stride, input, in_s2, width, min(split_row, height), height, copy_barrier + 1);
  }
#endif
  const unsigned row_bytes = plane_stride * sizeof(T);
  if (sampling_ratio == 1)
    plane_pool<1>(plane, order, first, last, geo, height, row_bytes, ph, pw, output, out_s0, out_s2, out_s3, split,
                  rest_bar);
  else if (sampling_ratio == 2)
    plane_pool<2>(plane, order, first, last, geo, height, row_bytes, ph, pw, output, out_s0, out_s2, out_s3, split,
                  rest_bar);
  else
    plane_pool<4>(plane, order, first, last, geo, height, row_bytes, ph, pw, output, out_s0, out_s2, out_s3, split,
                  rest_bar);
#if __CUDA_ARCH__ >= 900
  if (rest_bar) plane_bulk_wait(rest_bar);  // the copy's last bytes before the block leaves
#endif
}

// Where a RoI's gradient goes: the buffer, its strides and size, the
// RoI's image plane (its channel 0) and sampling grid.
template <typename A>
struct GradTarget {
  void* buffer;
  Strides4 st;
  int height, width;
  index_t plane;
  AlignGrid<A> g;
};

// The thread mode of the RoIAlign backwards on buffers walked channels
// fastest (channel_block <= 0: in blocks of -channel_block channels, or
// all), CPT channels a thread through a ChannelScatter; RoIs in the order
// `order` lists them where it is given. target(k, t) sets t for RoI k, or
// returns false where it adds nothing.
template <int CPT, typename T, typename A, typename Target>
__device__ __forceinline__ void backward_groups(const T* grad_output, const Strides4& go, index_t num_rois,
                                                int channels_out, int ph, int pw, int channel_block,
                                                const int* order, const GradSink<A>& sink, Target target) {
  const int block = channel_block < 0 ? -channel_block : channels_out;
  const index_t total = num_rois * (channels_out / CPT) * ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    BinPos p = decompose_group<CPT, true>(idx, num_rois, channels_out, ph, pw, channel_block);
    if (order) p.k = order[p.k];
    GradTarget<A> t;
    if (!target(p.k, t)) continue;
    const Strides4& gi = t.st;
    ChannelScatter<CPT, A> scatter(sink.rebased(t.buffer), vector_group_span<CPT, 4>(block), gi.s1,
                                   vector_layout<4>(t.buffer, gi.s0, gi.s1, gi.s2, gi.s3));
    scatter.first = vector_group_first<CPT, 4>(p.c, block);
#pragma unroll
    for (int c = 0; c < CPT; ++c)
      scatter.grad[c] = to_acc(grad_output[go.at(p.k, scatter.first + c / 4 * scatter.span + c % 4, p.i, p.j)]) *
                        t.g.inv_count;
    bin_scatter_axis_aligned<0>(scatter, t.plane, gi.s2, gi.s3, t.height, t.width, t.g, p.i, p.j, A(1));
  }
}

// grad_input is a zero-filled accumulation buffer: of the accumulation type
// (float for half types), or of long long when max_grad is given (the
// deterministic backward, see GradSink). Three modes: a warp per RoI and
// channels_per_warp channels (warp_scatter_roi), CPT > 1 channels a thread
// (backward_groups: plain RoIAlign on a buffer walked channels fastest),
// else a thread per bin. order: null, or the order to walk the RoIs in
// (roi_image_order).
// At most 64 registers (4 blocks an SM; 76 left free): the warp mode's
// backwards measured 5-12% faster so (FPN, small maps; H200, session 15),
// Mask R-CNN's thread per bin within 1.5%. Likewise the multi-level backward.
template <typename T, bool PS, int CPT = 1>
__global__ void __launch_bounds__(kBlockThreads, 4) roi_align_backward(
    const T* __restrict__ grad_output, index_t go_s0, index_t go_s1, index_t go_s2, index_t go_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw,
    typename acc_type<T>::type spatial_scale, int sampling_ratio, int aligned,
    int channel_block, int channels_per_warp,
    void* __restrict__ grad_input, int batch, int height, int width,
    index_t gi_s0, index_t gi_s1, index_t gi_s2, index_t gi_s3, const T* __restrict__ max_grad,
    const int* __restrict__ order) {
  typedef typename acc_type<T>::type A;
  const Strides4 go_st = make_strides(go_s0, go_s1, go_s2, go_s3);
  const GradSink<A> sink(grad_input, max_grad, gradient_contributions(num_rois, ph, pw, PS));
  if (CPT > 1) {
    backward_groups<CPT>(grad_output, go_st, num_rois, channels_out, ph, pw, channel_block, order, sink,
                         [&](index_t k, GradTarget<A>& t) {
      int b; A x1, y1, x2, y2;
      if (!load_roi(rois, k, batch, b, x1, y1, x2, y2)) return false;
      t = GradTarget<A>{grad_input, make_strides(gi_s0, gi_s1, gi_s2, gi_s3), height, width, (index_t)b * gi_s0, {}};
      t.g.set(x1, y1, x2, y2, spatial_scale, ph, pw, sampling_ratio, aligned != 0);
      return true;
    });
    return;
  }
  if (!PS && channels_per_warp > 0) {
    for_each_warp_roi(rois, num_rois, batch, channels_out, channel_block, channels_per_warp, order,
                      [&](const BinPos& p, int b, A x1, A y1, A x2, A y2) {
      AlignGrid<A> g;
      g.set(x1, y1, x2, y2, spatial_scale, ph, pw, sampling_ratio, aligned != 0);
      warp_scatter_roi(sink, (index_t)b * gi_s0 + (index_t)p.c * gi_s1, gi_s1, gi_s2, gi_s3, height, width, g, ph,
                       pw, grad_output + go_st.at(p.k, p.c, 0, 0), go_s1, go_s2, go_s3, channels_per_warp);
    });
    return;
  }
  const index_t total = num_rois * channels_out * ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    BinPos p = decompose(idx, num_rois, channels_out, ph, pw, channel_block);
    if (order) p.k = order[p.k];
    int b; A x1, y1, x2, y2;
    if (!load_roi(rois, p.k, batch, b, x1, y1, x2, y2)) continue;
    AlignGrid<A> g;
    g.set(x1, y1, x2, y2, spatial_scale, ph, pw, sampling_ratio, aligned != 0);
    const A grad = to_acc(grad_output[go_st.at(p.k, p.c, p.i, p.j)]) * g.inv_count;
    const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
    const index_t plane = (index_t)b * gi_s0 + (index_t)c_in * gi_s1;
    bin_scatter_axis_aligned<PS ? 2 : 1>(sink, plane, gi_s2, gi_s3, height, width, g, p.i, p.j, grad);
  }
}

// The channels-last accumulation buffer src ((batch, pixels, channels),
// contiguous) as the NCHW array dst of T ((batch, channels, pixels),
// contiguous), each element rounded as store() rounds it: 32 x 32 tiles
// through shared memory, so that the reads (along channels) and the writes
// (along pixels) both coalesce. PyTorch's copy between the two layouts took
// 1.8 ms for Mask R-CNN's float32 map (H100, session 21), three times the
// DRAM floor.
template <typename I, typename A, typename T>
__device__ __forceinline__ void transpose_tiles(const A* src, I batch, I channels, I pixels, T* dst) {
  __shared__ A tile[32][33];  // [pixel][channel], a word of padding against bank conflicts
  const I pixel_tiles = (pixels + 31) / 32, channel_tiles = (channels + 31) / 32;
  const int lane = threadIdx.x & 31;
  for (I t = blockIdx.x; t < batch * channel_tiles * pixel_tiles; t += gridDim.x) {
    const I p0 = t % pixel_tiles * 32, c0 = t / pixel_tiles % channel_tiles * 32;
    const I b = t / pixel_tiles / channel_tiles;
    for (int r = threadIdx.x >> 5; r < 32; r += blockDim.x >> 5)
      if (p0 + r < pixels && c0 + lane < channels)
        tile[r][lane] = src[(b * pixels + p0 + r) * channels + c0 + lane];
    __syncthreads();
    for (int r = threadIdx.x >> 5; r < 32; r += blockDim.x >> 5)
      if (c0 + r < channels && p0 + lane < pixels)
        store(dst + (b * channels + c0 + r) * pixels + p0 + lane, tile[lane][r]);
    __syncthreads();
  }
}

// 64-bit division is a long software routine: 32-bit indices wherever the array allows.
template <typename T, bool PS>
__global__ void channels_last_to_nchw(const typename acc_type<T>::type* __restrict__ src, int batch, int channels,
                                      index_t pixels, T* __restrict__ dst) {
  if ((index_t)batch * channels * pixels <= (index_t)0xffffffffu)
    transpose_tiles<unsigned>(src, (unsigned)batch, (unsigned)channels, (unsigned)pixels, dst);
  else
    transpose_tiles<unsigned long long>(src, (unsigned long long)batch, (unsigned long long)channels,
                                        (unsigned long long)pixels, dst);
}

// Tile backward of plain RoIAlign: the gradient gathered, not scattered. A
// block owns a tile of kTileRows x kTileCols pixels of one image and
// kTileChannels channels (8 a lane: two runs of 4, kTileChannels / 2
// apart), a warp a row of it; it sums in shared memory every sample of every
// RoI of the image that reaches the tile, and writes each element of
// grad_input once: no atomics, no zero fill. The atomic backward on Mask
// R-CNN's map was bound by L2's atomic operations (four corners of 4 KB a
// sample over 256 channels, session 21), which no work order removes. The
// RoIs come from roi_image_order's list; which of them reach the tile, from
// roi_align_plane_geometry's reach (4 shorts a place of the order); their
// samples, from its table in pixel units. The block first lists the RoIs
// that reach the tile, then, kTileHits at a time, each warp lists one RoI's
// samples on the tile in shared memory (its y samples sorted by the row they
// reach, its x samples with their columns' codes in a row of sums) and
// which rows it reaches; every warp then adds, for the listed RoIs on its
// row, those samples' corners: the lanes own their channels and the warps
// their rows, so nothing adds to the same sum at once. Session 23's first
// version (a warp a tile, each working out every RoI's samples) ran 6 warps
// an SM at 0.90 G instructions: 3.55 ms against the atomic backward's 2.25.
// Its v7 (128 channels a block, 4 a lane) spent half its instructions on
// listing and on each (row, RoI) visit, which a RoI's few samples on a tile
// do not amortize (session 24's source-level profile): 256 channels a block
// share them. grad_output is read 4 channels a load: the host hands it over
// channels fastest (tile_gradient_channels_last).
constexpr int kTileRows = 8, kTileCols = 8, kTilePixels = kTileRows * kTileCols;
constexpr int kTileChannels = 256;            // 8 a lane
constexpr int kTileThreads = 32 * kTileRows;  // a warp a row
constexpr int kTileHits = kTileRows;          // RoIs whose samples are listed at once, a warp each
constexpr int kTileRowSamples = 2 * kPlaneSamples;  // a sample's y reaches at most two rows

// A RoI's y sample on a row of the tile: its weight there (times the RoI's
// 1 / count) and the byte offset of its bin row in grad_output.
struct __align__(8) TileRowSample { float w; int offset; };
// A RoI's x sample on the tile: its columns lo and hi as tile_column codes
// (-1: off the tile, or hi clamped onto lo at the map's edge, where its
// weight is 0, see axis_weights), their weights, and the byte offset of its
// bin column in grad_output.
struct __align__(16) TileColumnSample { short lo, hi; float w_lo, w_hi; int offset; };
// Dynamic shared memory: the sums of the first 4 channels of each lane (a
// float4 a lane and pixel), those of its second 4, then each listed RoI's y
// samples sorted by row, then its x samples. 72 KB: three blocks an SM.
constexpr int kTileHalfBytes = kTilePixels * 32 * 16;
constexpr int kTileRowBytes = kTileHits * kTileRowSamples * sizeof(TileRowSample);
constexpr int kTileColumnBytes = kTileHits * kPlaneSamples * sizeof(TileColumnSample);
static_assert(2 * kTileHalfBytes + kTileRowBytes + kTileColumnBytes == 73728, "_rules.TILE_SHARED_BYTES");

// Four consecutive channels at p, element by element unless vectors (8 or 16
// bytes, aligned).
template <typename T>
__device__ __forceinline__ float4 load_quad(const T* p, bool vectors) {
  if (vectors) {
    if (sizeof(T) == 4) return *reinterpret_cast<const float4*>(p);
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = widen(*reinterpret_cast<const typename half_pair<T>::type*>(&u.x));
    const float2 b = widen(*reinterpret_cast<const typename half_pair<T>::type*>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
  }
  return make_float4(to_acc(p[0]), to_acc(p[1]), to_acc(p[2]), to_acc(p[3]));
}
template <>
__device__ __forceinline__ float4 load_quad<float>(const float* p, bool vectors) {
  if (vectors) return *reinterpret_cast<const float4*>(p);
  return make_float4(p[0], p[1], p[2], p[3]);
}

template <typename T>
__device__ __forceinline__ void store_quad(T* p, index_t step, bool vectors, float4 v) {
  if (vectors) {
    typename half_pair<T>::type a, b;
    narrow(v.x, v.y, a);
    narrow(v.z, v.w, b);
    *reinterpret_cast<uint2*>(p) = make_uint2(*reinterpret_cast<const unsigned*>(&a),
                                              *reinterpret_cast<const unsigned*>(&b));
    return;
  }
  store(p, v.x); store(p + step, v.y); store(p + 2 * step, v.z); store(p + 3 * step, v.w);
}
template <>
__device__ __forceinline__ void store_quad<float>(float* p, index_t step, bool vectors, float4 v) {
  if (vectors) { *reinterpret_cast<float4*>(p) = v; return; }
  p[0] = v.x; p[step] = v.y; p[2 * step] = v.z; p[3 * step] = v.w;
}

// Whether 4 channels at p of strides s0..s3 load and store as one vector.
template <typename T>
__device__ __forceinline__ bool quad_layout(const T* p, index_t s0, index_t s1, index_t s2, index_t s3) {
  return s1 == 1 && s0 % 4 == 0 && s2 % 4 == 0 && s3 % 4 == 0 &&
         (reinterpret_cast<unsigned long long>(p) & (4 * sizeof(T) - 1)) == 0;
}

// A tile's sums, each half: a row's 8 pixels of 32 lanes of 16 bytes, lane
// l's at slot l ^ column, so that both a warp over one pixel's channels (the
// sums, channels-last writes) and eight lanes over a row's eight pixels
// (NCHW writes) hit every bank once. tile_column(x) ^ (16 * lane) is lane's
// byte offset in its row for column x (the two codes' bits do not overlap).
__device__ __forceinline__ int tile_column(int x) { return (x << 9) | (x << 4); }
__device__ __forceinline__ unsigned tile_slot(unsigned row_base, int column, int lane) {
  return row_base + (unsigned)(tile_column(column) ^ (lane << 4));
}
__device__ __forceinline__ float4 tile_sum(unsigned at) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(at));
  return v;
}
__device__ __forceinline__ void set_tile_sum(unsigned at, float4 v) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(at), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
}

__device__ __forceinline__ void fma4(float w, float4 g, float4& s) {
  s.x = fused(w, g.x, s.x); s.y = fused(w, g.y, s.y); s.z = fused(w, g.z, s.z); s.w = fused(w, g.w, s.w);
}

// Both halves' sums at byte `at` of the first half: s += w * g.
__device__ __forceinline__ void add_to_sums(unsigned at, float w, float4 ga, float4 gb) {
  float4 sa = tile_sum(at), sb = tile_sum(at + kTileHalfBytes);
  fma4(w, ga, sa);
  fma4(w, gb, sb);
  set_tile_sum(at, sa);
  set_tile_sum(at + kTileHalfBytes, sb);
}

// A lane's 8 channels of one bin: at g (4 of them) and g + half (the other
// 4), zero where not live.
template <bool kVectors, typename T>
__device__ __forceinline__ void load_octet(const char* g, int half, bool live_a, bool live_b, float4& ga,
                                           float4& gb) {
  ga = live_a ? load_quad(reinterpret_cast<const T*>(g), kVectors) : make_float4(0.f, 0.f, 0.f, 0.f);
  gb = live_b ? load_quad(reinterpret_cast<const T*>(g + half), kVectors) : make_float4(0.f, 0.f, 0.f, 0.f);
}

// One listed RoI's samples on a warp's row of the tile: for each of its
// y samples on the row, each x sample's gradient (8 channels a lane) times
// the weights, added at the sample's columns. The next x sample's gradient
// is read before this one's sums are, so that its latency overlaps them.
template <bool kVectors, typename T>
__device__ __forceinline__ void add_tile_row(const char* g, int half, const TileRowSample* ys, int ny,
                                             const TileColumnSample* xs, int nx, unsigned row_base, int lane16,
                                             bool live_a, bool live_b) {
  if (nx == 0) return;
  for (int iy = 0; iy < ny; ++iy) {
    const TileRowSample ey = ys[iy];
    const char* gy = g + ey.offset;
    TileColumnSample ex = xs[0];
    float4 ga, gb;
    load_octet<kVectors, T>(gy + ex.offset, half, live_a, live_b, ga, gb);
    for (int ix = 0; ix < nx; ++ix) {
      TileColumnSample next = ex;
      float4 na = ga, nb = gb;
      if (ix + 1 < nx) {
        next = xs[ix + 1];
        load_octet<kVectors, T>(gy + next.offset, half, live_a, live_b, na, nb);
      }
      if (ex.lo >= 0) add_to_sums(row_base + (unsigned)(ex.lo ^ lane16), ey.w * ex.w_lo, ga, gb);
      if (ex.hi >= 0) add_to_sums(row_base + (unsigned)(ex.hi ^ lane16), ey.w * ex.w_hi, ga, gb);
      ex = next; ga = na; gb = nb;
    }
  }
}

// order: roi_image_order's list and starts (num_rois + batch + 2 ints);
// table and reach_by_order: roi_align_plane_geometry's in pixel units.
// Blocks: batch x tiles x channel blocks of kTileChannels, channel blocks
// fastest, then tiles along rows, images slowest (the blocks running
// together read one image's RoIs and gradients). grad_input: every element
// written, or added to where accumulate is set.
template <typename T, bool PS>
__global__ void __launch_bounds__(kTileThreads, 3) roi_align_backward_tiles(
    const T* __restrict__ grad_output, index_t go_s0, index_t go_s1, index_t go_s2, index_t go_s3,
    index_t num_rois, int channels, int ph, int pw, int sampling_ratio,
    const int* __restrict__ order, const void* __restrict__ table, const void* __restrict__ reach_by_order,
    T* __restrict__ grad_input, int batch, int height, int width,
    index_t gi_s0, index_t gi_s1, index_t gi_s2, index_t gi_s3, int accumulate) {
  typedef typename acc_type<T>::type A;
  extern __shared__ __align__(16) unsigned char tile_shared[];
  TileRowSample (*ys)[kTileRowSamples] =
      reinterpret_cast<TileRowSample (*)[kTileRowSamples]>(tile_shared + 2 * kTileHalfBytes);
  TileColumnSample (*xs)[kPlaneSamples] =
      reinterpret_cast<TileColumnSample (*)[kPlaneSamples]>(tile_shared + 2 * kTileHalfBytes + kTileRowBytes);
  __shared__ int hits[kTileThreads];
  __shared__ int hit_count, hit_nx[kTileHits], hit_ny[kTileHits][kTileRows], hit_y0[kTileHits][kTileRows];
  __shared__ const char* hit_grad[kTileHits];  // the listed RoI's grad_output
  __shared__ int row_hits[kTileRows][kTileHits], row_hit_count[kTileRows];  // the listed RoIs on each row
  const PlaneRoi<A>* geo = reinterpret_cast<const PlaneRoi<A>*>(table);
  const short4* reach = reinterpret_cast<const short4*>(reach_by_order);
  const int* starts = order + num_rois;
  const int lane = threadIdx.x & 31, row = threadIdx.x >> 5, lane16 = lane << 4;
  const unsigned base = (unsigned)__cvta_generic_to_shared(tile_shared);
  const int blocks = (channels + kTileChannels - 1) / kTileChannels;
  const int tiles_x = (width + kTileCols - 1) / kTileCols, tiles_y = (height + kTileRows - 1) / kTileRows;
  // 32-bit divisions: the grid is at most 2^31 blocks
  const unsigned cb = blockIdx.x % (unsigned)blocks, t = blockIdx.x / (unsigned)blocks;
  const unsigned tx = t % (unsigned)tiles_x, ty = t / (unsigned)tiles_x % (unsigned)tiles_y;
  const int b = (int)(t / (unsigned)tiles_x / (unsigned)tiles_y);
  const int y0 = (int)ty * kTileRows, x0 = (int)tx * kTileCols;
  constexpr int kHalf = kTileChannels / 2;
  const int c = (int)cb * kTileChannels + 4 * lane;  // and c + kHalf
  const bool live_a = c < channels, live_b = c + kHalf < channels;  // the host's rule: channels a multiple of 4
  const int n = sampling_ratio;
  const bool go_vectors = quad_layout(grad_output, go_s0, go_s1, go_s2, go_s3);
  // this lane's sample's bin row and column in grad_output, in bytes (the host's rule keeps them in 32 bits)
  const int bin_of_lane = lane / n;
  const int row_offset = bin_of_lane * (int)go_s2 * (int)sizeof(T), column_offset = bin_of_lane * (int)go_s3 * (int)sizeof(T);
  // the lane's channels' offset in a RoI's gradient, and the second run's from the first's, in bytes
  const index_t lane_bytes = (index_t)(live_a ? c : 0) * go_s1 * (index_t)sizeof(T);
  const int half = (int)(kHalf * go_s1 * (index_t)sizeof(T));
  const unsigned row_base = base + (unsigned)(row * kTileCols * 512);

#pragma unroll
  for (int p = 0; p < kTileCols; ++p) {
    set_tile_sum(tile_slot(row_base, p, lane), make_float4(0.f, 0.f, 0.f, 0.f));
    set_tile_sum(tile_slot(row_base, p, lane) + kTileHalfBytes, make_float4(0.f, 0.f, 0.f, 0.f));
  }
  if (threadIdx.x < kTileRows) row_hit_count[threadIdx.x] = 0;

  const int first = starts[b], last = starts[b + 1];
  for (int s0 = first; s0 < last; s0 += kTileThreads) {
    // the RoIs of places s0 .. s0 + kTileThreads that reach the tile
    if (threadIdx.x == 0) hit_count = 0;
    __syncthreads();
    const int r = s0 + threadIdx.x;
    bool hit = false;
    if (r < last) {
      const short4 e = reach[r];
      hit = e.x < y0 + kTileRows && e.y >= y0 && e.z < x0 + kTileCols && e.w >= x0;
    }
    const unsigned m = __ballot_sync(0xffffffffu, hit);
    int at = 0;
    if (lane == 0 && m) at = atomicAdd(&hit_count, __popc(m));
    at = __shfl_sync(0xffffffffu, at, 0);
    if (hit) hits[at + __popc(m & ((1u << lane) - 1))] = order[r];
    __syncthreads();
    const int count = hit_count;
    for (int h0 = 0; h0 < count; h0 += kTileHits) {
      if (h0 + row < count) {  // warp `row` lists RoI h0 + row's samples on the tile
        const int h = row, roi = hits[h0 + h];
        const PlaneRoi<A>* g = geo + roi;
        PlaneAxis<A> ya, xa;
        ya.lo = ya.hi = xa.lo = xa.hi = -1 << 20;
        ya.w_lo = ya.w_hi = xa.w_lo = xa.w_hi = A(0);
        if (lane < ph * n) ya = g->rows[lane];
        if (lane < pw * n) xa = g->cols[lane];
        const A inv_count = g->inv_count;
        if (lane < kTileRows) hit_ny[h][lane] = 0;
        __syncwarp();
        // y samples sorted by row: each one's rank on its rows (lo, and hi unless clamped onto lo) ...
        ya.lo -= y0; ya.hi -= y0; xa.lo -= x0; xa.hi -= x0;
        const bool y_lo = (unsigned)ya.lo < (unsigned)kTileRows;
        const bool y_hi = ya.hi != ya.lo && (unsigned)ya.hi < (unsigned)kTileRows;
        int rank_lo = 0, rank_hi = 0;
        if (y_lo) rank_lo = atomicAdd(&hit_ny[h][ya.lo], 1);
        if (y_hi) rank_hi = atomicAdd(&hit_ny[h][ya.hi], 1);
        __syncwarp();
        // ... then each row's first place: the counts' exclusive prefix sum over lanes 0 .. kTileRows - 1
        const int rows_count = lane < kTileRows ? hit_ny[h][lane] : 0;
        int rows_before = rows_count;
#pragma unroll
        for (int d = 1; d < kTileRows; d <<= 1) {
          const int v = __shfl_up_sync(0xffffffffu, rows_before, d);
          if (lane >= d) rows_before += v;
        }
        rows_before -= rows_count;
        const int place_lo = __shfl_sync(0xffffffffu, rows_before, ya.lo & (kTileRows - 1)) + rank_lo;
        const int place_hi = __shfl_sync(0xffffffffu, rows_before, ya.hi & (kTileRows - 1)) + rank_hi;
        if (y_lo) ys[h][place_lo] = TileRowSample{ya.w_lo * inv_count, row_offset};
        if (y_hi) ys[h][place_hi] = TileRowSample{ya.w_hi * inv_count, row_offset};
        if (lane < kTileRows) hit_y0[h][lane] = rows_before;
        const bool x_lo = (unsigned)xa.lo < (unsigned)kTileCols;
        const bool x_hi = xa.hi != xa.lo && (unsigned)xa.hi < (unsigned)kTileCols;
        const unsigned xm = __ballot_sync(0xffffffffu, x_lo || x_hi);
        if (x_lo || x_hi)
          xs[h][__popc(xm & ((1u << lane) - 1))] = TileColumnSample{
              (short)(x_lo ? tile_column(xa.lo) : -1), (short)(x_hi ? tile_column(xa.hi) : -1), xa.w_lo, xa.w_hi,
              column_offset};
        if (lane < kTileRows && rows_count && xm) row_hits[lane][atomicAdd(&row_hit_count[lane], 1)] = h;
        if (lane == 0) {
          hit_nx[h] = __popc(xm);
          hit_grad[h] = reinterpret_cast<const char*>(grad_output + (index_t)roi * go_s0);
        }
      }
      __syncthreads();
      // warp `row` adds the listed samples' corners on its row
      const int mine = row_hit_count[row];
      for (int i = 0; i < mine; ++i) {
        const int h = row_hits[row][i];
        const char* gk = hit_grad[h] + lane_bytes;
        const TileRowSample* ye = ys[h] + hit_y0[h][row];
        if (go_vectors)
          add_tile_row<true, T>(gk, half, ye, hit_ny[h][row], xs[h], hit_nx[h], row_base, lane16, live_a, live_b);
        else
          add_tile_row<false, T>(gk, half, ye, hit_ny[h][row], xs[h], hit_nx[h], row_base, lane16, live_a, live_b);
      }
      __syncwarp();
      if (lane == 0) row_hit_count[row] = 0;  // this warp read its row's list; the next lists come after the barrier
      __syncthreads();  // before the next RoIs' lists
    }
  }

  // the NCHW write-out's lanes read other lanes' sums: where the image has no RoIs, no barrier of
  // the loop above separates them from the zero fill (racecheck, an image of none)
  __syncwarp();
  const int y = y0 + row;
  if (y >= height) return;
  T* out = grad_input + (index_t)b * gi_s0 + y * gi_s2;
  if (gi_s1 == 1) {  // channels-last: a pixel's channels a store
    const bool vectors = quad_layout(grad_input, gi_s0, gi_s1, gi_s2, gi_s3);
    for (int p = 0; p < kTileCols && x0 + p < width; ++p) {
      const unsigned at = tile_slot(row_base, p, lane);
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        if (!(part ? live_b : live_a)) continue;
        T* o = out + (x0 + p) * gi_s3 + c + part * kHalf;
        float4 v = tile_sum(at + part * kTileHalfBytes);
        if (accumulate) {
          const float4 was = load_quad(o, vectors);
          v.x += was.x; v.y += was.y; v.z += was.z; v.w += was.w;
        }
        store_quad(o, 1, vectors, v);
      }
    }
    return;
  }
  // NCHW-like: lanes over (pixel, 4 channels), the row's 8 pixels of a channel a run
  const int p = lane & 7;
  if (x0 + p >= width) return;
  T* o = out + (x0 + p) * gi_s3;
  for (int q = lane >> 3; q < 2 * 32; q += 4) {
    const int cq = (int)cb * kTileChannels + 4 * q;
    if (cq >= channels) break;
    float4 v = tile_sum(tile_slot(row_base, p, q & 31) + (q >> 5) * kTileHalfBytes);
    T* oc = o + cq * gi_s1;
    if (accumulate) {
      v.x += to_acc(oc[0]); v.y += to_acc(oc[gi_s1]); v.z += to_acc(oc[2 * gi_s1]); v.w += to_acc(oc[3 * gi_s1]);
    }
    store_quad(oc, gi_s1, false, v);
  }
}

// Words of 2, 4 or 8 bytes, and 16 bytes of them packed as a vector.
template <int kBytes> struct Word;
template <> struct Word<2> { typedef unsigned short type; };
template <> struct Word<4> { typedef unsigned type; };
template <> struct Word<8> { typedef unsigned long long type; };

__device__ __forceinline__ uint4 pack16(const unsigned short* w) {
  return make_uint4(w[0] | (unsigned)w[1] << 16, w[2] | (unsigned)w[3] << 16, w[4] | (unsigned)w[5] << 16,
                    w[6] | (unsigned)w[7] << 16);
}
__device__ __forceinline__ uint4 pack16(const unsigned* w) { return make_uint4(w[0], w[1], w[2], w[3]); }
__device__ __forceinline__ uint4 pack16(const unsigned long long* w) {
  return make_uint4((unsigned)w[0], (unsigned)(w[0] >> 32), (unsigned)w[1], (unsigned)(w[1] >> 32));
}

// The words of a 16-byte vector, in memory order.
__device__ __forceinline__ void unpack16(uint4 v, unsigned short* w) {
  const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[2 * i] = (unsigned short)(u[i] & 0xffffu);
    w[2 * i + 1] = (unsigned short)(u[i] >> 16);
  }
}
__device__ __forceinline__ void unpack16(uint4 v, unsigned* w) {
  w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
}
__device__ __forceinline__ void unpack16(uint4 v, unsigned long long* w) {
  w[0] = v.x | (unsigned long long)v.y << 32;
  w[1] = v.z | (unsigned long long)v.w << 32;
}

// The RoI of pair t of `pairs` (RoI, part) pairs, `per` parts a RoI: a
// 32-bit division where the pairs allow (64-bit division is a long
// software routine).
__device__ __forceinline__ index_t roi_of_pair(index_t t, index_t pairs, int per) {
  return pairs <= 0xffffffffLL ? (index_t)((unsigned)t / (unsigned)per) : t / per;
}

// Shared memory of tile_gradient_channels_last: a run of channels of one
// RoI's gradient (at most 4 vectors a thread, 16 KB, and the padding of its
// odd rows), or a 32 x 32 tile of the accumulation type.
constexpr int kGradStageBytes = 17408;

// grad_output (num_rois, channels, ph, pw) of any strides into dst, the same
// laid out channels fastest ((num_rois, ph, pw, channels), contiguous), for
// roi_align_backward_tiles' 4-channel reads. Where each RoI's gradient is
// one contiguous run (the contiguous grad_output a box head's flatten hands
// back) and a block's threads read a run of 64 channels (or 32, whole lines
// of dst either way) with at most 4 16-byte vectors each, the vectors go
// into shared memory as they lie and each bin's channels out as 16-byte
// vectors: Mask R-CNN 7x7 370 -> 317 us (H100, session 25). Where a run
// takes more vectors (14x14: 32 channels, 6 a thread, took 427 us: two
// round trips to DRAM a run) or the gradient is not one run: 32 x 32 tiles
// of (channels, bins), reads along bins, writes along channels, a thread's
// reads of a tile issued before its stores, divisions once a block, in 32
// bits where they fit (session 24: 14x14 415 -> 377 us; tiles of 64 bins
// took 440).
template <typename T, bool PS>
__global__ void __launch_bounds__(kBlockThreads) tile_gradient_channels_last(
    const T* __restrict__ src, index_t s0, index_t s1, index_t s2, index_t s3, index_t num_rois, int channels,
    int ph, int pw, T* __restrict__ dst) {
  typedef typename acc_type<T>::type A;  // exact for the half types, and a plain shared array
  typedef typename Word<sizeof(T)>::type W;
  constexpr int kVec = 16 / sizeof(T), kLoads = 4;  // vectors a thread reads, all before it stores
  __shared__ __align__(16) unsigned char stage_bytes[kGradStageBytes];
  const int bins = ph * pw;
  // channels a block copies: whole 128-byte lines of each bin's run in dst
  // (runs of 20 channels at 14x14, 80 bytes a bin, took 423 us), a
  // channel's bins an odd number of words apart in the stage, so that a
  // warp's reads of 4 bins' 8 vectors (a line) fall in 32 different banks
  constexpr int kLine = 128 / sizeof(T);
  const int row = bins | 1, run = min(64, kGradStageBytes / (int)sizeof(T) / row) / kLine * kLine;
  if (s3 == 1 && s2 == pw && s1 == bins && s0 == (index_t)channels * bins && channels % kVec == 0 && run > 0 &&
      run * bins <= kLoads * kBlockThreads * kVec && aligned16(src)) {
    W* stage = reinterpret_cast<W*>(stage_bytes);
    const int runs = (channels + run - 1) / run;
    const index_t pairs = num_rois * runs;
    for (index_t t = blockIdx.x; t < pairs; t += gridDim.x) {
      const index_t k = roi_of_pair(t, pairs, runs);
      const int c0 = (int)(t - k * runs) * run, n = min(run, channels - c0), vecs = n * bins / kVec;
      const uint4* from = reinterpret_cast<const uint4*>(src + k * s0 + (index_t)c0 * bins);
      uint4 v[kLoads];  // the rule above: a run is at most kLoads vectors a thread
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int e = threadIdx.x + u * kBlockThreads;
        if (e < vecs) v[u] = from[e];
      }
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int e = threadIdx.x + u * kBlockThreads;
        if (e >= vecs) break;
        W w[kVec];
        unpack16(v[u], w);
        int c = e * kVec / bins, bin = e * kVec - c * bins;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          stage[c * row + bin] = w[i];
          if (++bin == bins) bin = 0, ++c;
        }
      }
      __syncthreads();
      const int groups = n / kVec;  // vectors a bin, side by side in a warp
      T* to = dst + k * bins * channels + c0;
      for (int e = threadIdx.x; e < bins * groups; e += kBlockThreads) {
        const int bin = e / groups, g = e - bin * groups;
        W w[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) w[i] = stage[(g * kVec + i) * row + bin];
        *reinterpret_cast<uint4*>(to + (index_t)bin * channels + g * kVec) = pack16(w);
      }
      __syncthreads();
    }
    return;
  }
  constexpr int kWarps = kBlockThreads / 32, kRowsPerWarp = 32 / kWarps;
  A (*tile)[33] = reinterpret_cast<A (*)[33]>(stage_bytes);  // [channel][bin]
  static_assert(sizeof(A) * 32 * 33 <= kGradStageBytes, "the tile fits the stage");
  const int channel_tiles = (channels + 31) / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool flat = s2 == pw * s3;  // the bins one run
  const index_t pairs = num_rois * channel_tiles;
  for (index_t t = blockIdx.x; t < pairs; t += gridDim.x) {
    const index_t k = roi_of_pair(t, pairs, channel_tiles);
    const int c0 = (int)(t - k * channel_tiles) * 32;
    const T* sk = src + k * s0 + c0 * s1;
    T* dk = dst + k * bins * channels + c0;
    const int rows = min(32, channels - c0);
    for (int q0 = 0; q0 < bins; q0 += 32) {
      const int q = q0 + lane;
      const index_t at = q < bins ? (flat ? q * s3 : (q / pw) * s2 + (q % pw) * s3) : 0;
      A v[kRowsPerWarp];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int r = warp + i * kWarps;
        v[i] = q < bins && r < rows ? to_acc(sk[at + r * s1]) : A(0);
      }
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) tile[warp + i * kWarps][lane] = v[i];
      __syncthreads();
      if (lane < rows) {
        const int last = min(32, bins - q0);
        T* to = dk + (index_t)(q0 + warp) * channels + lane;
#pragma unroll 4
        for (int r = warp; r < last; r += kWarps, to += (index_t)kWarps * channels) store(to, tile[lane][r]);
      }
      __syncthreads();
    }
  }
}

// Rotated RoIAlign, mmcv's semantics: rows (batch_index, cx, cy, w, h, theta),
// theta in radians, counter-clockwise unless clockwise is set.
template <typename T, bool PS>
__global__ void roi_align_rotated_forward(
    const T* __restrict__ input, int batch, int height, int width,
    index_t in_s0, index_t in_s1, index_t in_s2, index_t in_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw,
    typename acc_type<T>::type spatial_scale, int sampling_ratio, int aligned, int clockwise,
    int channel_block,
    T* __restrict__ output, index_t out_s0, index_t out_s1, index_t out_s2, index_t out_s3) {
  typedef typename acc_type<T>::type A;
  const OutputIndex out_at(out_s0, out_s1, out_s2, out_s3, channels_out, ph, pw, channel_block);
  const index_t total = num_rois * channels_out * ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    const BinPos p = decompose(idx, num_rois, channels_out, ph, pw, channel_block);
    T* out = output + out_at.at(idx, p);
    int b; AlignGrid<A> g; RotatedFrame<A> f;
    if (!load_rotated(rois, p.k, batch, spatial_scale, ph, pw, sampling_ratio, aligned != 0, clockwise != 0, b, g,
                      f)) {
      store(out, quiet_nan<A>());
      continue;
    }
    const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
    const T* plane = input + (index_t)b * in_s0 + (index_t)c_in * in_s1;
    const ChannelGroup<1, T, false> group(p.c, channels_out, 0);
    A sum[1];
    bin_sample_sums(group, plane, in_s2, in_s3, height, width, g, f, p.i, p.j, sum);
    group.store(out, 0, false, sum, &g);
  }
}

template <typename T, bool PS>
__global__ void roi_align_rotated_backward(
    const T* __restrict__ grad_output, index_t go_s0, index_t go_s1, index_t go_s2, index_t go_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw,
    typename acc_type<T>::type spatial_scale, int sampling_ratio, int aligned, int clockwise,
    int channel_block,
    void* __restrict__ grad_input, int batch, int height, int width,
    index_t gi_s0, index_t gi_s1, index_t gi_s2, index_t gi_s3, const T* __restrict__ max_grad) {
  typedef typename acc_type<T>::type A;
  const Strides4 go_st = make_strides(go_s0, go_s1, go_s2, go_s3);
  const GradSink<A> sink(grad_input, max_grad, gradient_contributions(num_rois, ph, pw, PS));
  const index_t total = num_rois * channels_out * ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    const BinPos p = decompose(idx, num_rois, channels_out, ph, pw, channel_block);
    int b; AlignGrid<A> g; RotatedFrame<A> f;
    if (!load_rotated(rois, p.k, batch, spatial_scale, ph, pw, sampling_ratio, aligned != 0, clockwise != 0, b, g,
                      f))
      continue;
    const A grad = to_acc(grad_output[go_st.at(p.k, p.c, p.i, p.j)]) * g.inv_count;
    const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
    const index_t plane = (index_t)b * gi_s0 + (index_t)c_in * gi_s1;
    bin_sample_scatter<0>(sink, plane, gi_s2, gi_s3, height, width, g, f, p.i, p.j, grad);
  }
}

// Multi-level (FPN) RoIAlign: every RoI pools from the level pyramid_level
// picks for it, all levels in one launch. Rows whose level is NaN stay zero
// (as torchvision's MultiScaleRoIAlign leaves them); invalid rows give NaN.
template <typename T, bool PS, int CPT = 1>
__global__ void multi_scale_roi_align_forward(
    LevelTable levels, int batch,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw,
    int mode, typename acc_type<T>::type canonical_scale, int canonical_level, int k_min, int k_max,
    int sampling_ratio, int aligned, int channel_block,
    T* __restrict__ output, index_t out_s0, index_t out_s1, index_t out_s2, index_t out_s3) {
  typedef typename acc_type<T>::type A;
  const OutputIndex out_at(out_s0, out_s1, out_s2, out_s3, channels_out, ph, pw, channel_block);
  const index_t total = num_rois * (channels_out / CPT) * ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    const BinPos p = decompose_group<CPT>(idx, num_rois, channels_out, ph, pw, channel_block);
    T* out = output + out_at.at<CPT>(idx, p);
    A sum[CPT];
    int b; A x1, y1, x2, y2;
    ChannelGroup<CPT, T, false> group(p.c, channels_out, 0);  // its plane step comes with the level
    if (!load_roi(rois, p.k, batch, b, x1, y1, x2, y2)) {
      group.store(out, out_s1, false, sum, (const AlignGrid<A>*)nullptr);
      continue;
    }
    const int l = pyramid_level(x1, y1, x2, y2, mode, canonical_scale, canonical_level, k_min, k_max);
    if (l < 0 || l >= levels.count) {
#pragma unroll
      for (int t = 0; t < CPT; ++t) store(out + t * out_s1, A(0));
      continue;
    }
    AlignGrid<A> g;
    g.set(x1, y1, x2, y2, (A)levels.scale[l], ph, pw, sampling_ratio, aligned != 0);
    const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
    const T* plane = reinterpret_cast<const T*>(levels.data[l]) + (index_t)b * levels.s0[l] +
                     (index_t)c_in * levels.s1[l];
    group.step = group_plane_step<PS>(levels.s1[l], ph, pw);
    bin_sample_sums(group, plane, levels.s2[l], levels.s3[l], levels.height[l], levels.width[l], g, AxisFrame(),
                    p.i, p.j, sum);
    group.store(out, out_s1, false, sum, &g);
  }
}

// grads: the levels' zero-filled accumulation buffers (float for half types;
// long long when max_grad is given, see GradSink). The modes and order of
// roi_align_backward.
template <typename T, bool PS, int CPT = 1>
__global__ void __launch_bounds__(kBlockThreads, 4) multi_scale_roi_align_backward(
    const T* __restrict__ grad_output, index_t go_s0, index_t go_s1, index_t go_s2, index_t go_s3,
    LevelTable grads, int batch,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw,
    int mode, typename acc_type<T>::type canonical_scale, int canonical_level, int k_min, int k_max,
    int sampling_ratio, int aligned, int channel_block, int channels_per_warp, const T* __restrict__ max_grad,
    const int* __restrict__ order) {
  typedef typename acc_type<T>::type A;
  const Strides4 go_st = make_strides(go_s0, go_s1, go_s2, go_s3);
  const GradSink<A> sink((void*)nullptr, max_grad, gradient_contributions(num_rois, ph, pw, PS));
  if (CPT > 1) {
    backward_groups<CPT>(grad_output, go_st, num_rois, channels_out, ph, pw, channel_block, order, sink,
                         [&](index_t k, GradTarget<A>& t) {
      int b; A x1, y1, x2, y2;
      if (!load_roi(rois, k, batch, b, x1, y1, x2, y2)) return false;
      const int l = pyramid_level(x1, y1, x2, y2, mode, canonical_scale, canonical_level, k_min, k_max);
      if (l < 0 || l >= grads.count) return false;
      t = GradTarget<A>{reinterpret_cast<void*>(grads.data[l]),
                        make_strides(grads.s0[l], grads.s1[l], grads.s2[l], grads.s3[l]), grads.height[l],
                        grads.width[l], (index_t)b * grads.s0[l], {}};
      t.g.set(x1, y1, x2, y2, (A)grads.scale[l], ph, pw, sampling_ratio, aligned != 0);
      return true;
    });
    return;
  }
  if (!PS && channels_per_warp > 0) {
    for_each_warp_roi(rois, num_rois, batch, channels_out, channel_block, channels_per_warp, order,
                      [&](const BinPos& p, int b, A x1, A y1, A x2, A y2) {
      const int l = pyramid_level(x1, y1, x2, y2, mode, canonical_scale, canonical_level, k_min, k_max);
      if (l < 0 || l >= grads.count) return;
      AlignGrid<A> g;
      g.set(x1, y1, x2, y2, (A)grads.scale[l], ph, pw, sampling_ratio, aligned != 0);
      warp_scatter_roi(sink.rebased(reinterpret_cast<void*>(grads.data[l])),
                       (index_t)b * grads.s0[l] + (index_t)p.c * grads.s1[l], grads.s1[l], grads.s2[l], grads.s3[l],
                       grads.height[l], grads.width[l], g, ph, pw, grad_output + go_st.at(p.k, p.c, 0, 0), go_s1,
                       go_s2, go_s3, channels_per_warp);
    });
    return;
  }
  const index_t total = num_rois * channels_out * ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    BinPos p = decompose(idx, num_rois, channels_out, ph, pw, channel_block);
    if (order) p.k = order[p.k];
    int b; A x1, y1, x2, y2;
    if (!load_roi(rois, p.k, batch, b, x1, y1, x2, y2)) continue;
    const int l = pyramid_level(x1, y1, x2, y2, mode, canonical_scale, canonical_level, k_min, k_max);
    if (l < 0 || l >= grads.count) continue;
    AlignGrid<A> g;
    g.set(x1, y1, x2, y2, (A)grads.scale[l], ph, pw, sampling_ratio, aligned != 0);
    const A grad = to_acc(grad_output[go_st.at(p.k, p.c, p.i, p.j)]) * g.inv_count;
    const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
    const index_t plane = (index_t)b * grads.s0[l] + (index_t)c_in * grads.s1[l];
    bin_scatter_axis_aligned<0>(sink.rebased(reinterpret_cast<void*>(grads.data[l])), plane, grads.s2[l],
                                grads.s3[l], grads.height[l], grads.width[l], g, p.i, p.j, grad);
  }
}
