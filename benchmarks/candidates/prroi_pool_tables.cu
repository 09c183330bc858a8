// Candidate for issue 14, part 2 (not used by the package; benchmarks/prroi_tables.py
// appends it to the library's prroi_pool.cu and compares it with the package's
// kernels): PrRoIPool forward and feature backward through summed-area tables,
// one warp per (RoI, channel), all bins of the RoI from one grid of table values.
// The math and its float64 model: benchmarks/prroi_sat.py.
//
// Along one axis, bin i's weight on a row is exactly 1 on its interior rows
// [i0, i1) (the row's whole tent inside the bin) and partial on at most two
// rows at each edge. The RoI's cuts, {i0, i1} and {p, p + 1} for every partial
// row p of every bin, split the axis into blocks on which each bin's weight is
// constant. With S the table and G its values at the cuts (ny x nx), a bin's
// integral is sum over its row blocks t and column blocks u of
// wy(t) wx(u) (G[t+1][u+1] - G[t][u+1] - G[t+1][u] + G[t][u]). The backward adds
// the adjoint at the same grid points into a corner buffer C; the feature
// gradient is then grad[h][w] = sum_{h' > h, w' > w} C[h'][w'].
//
// Not handled here (the direct kernels do it): position-sensitive pooling
// (every bin reads another channel, so nothing is shared), box gradients, the
// deterministic mode. RoIs whose bins are under one cell, or that need more
// cuts than kCuts, take the direct path inside these kernels.
//
// Version 2 (not yet run): the cuts and every bin's runs are computed once per
// RoI and axis by prroi_table_geometry (version 1 rebuilt them in lane 0 of
// every warp, for every channel: its forward was 3-6x slower than the direct
// kernel), and the table's row pass is a warp scan (coalesced).

namespace cupy_roi {

constexpr int kCuts = 26;       // cut rows (columns) per RoI held in shared memory
constexpr int kWarps = 8;       // warps per block (BLOCK = 256)
constexpr int kRunsPerBin = 12; // row (column) blocks one bin may cover

// One bin side [s, s + size) on an axis of `extent` grid points.
template <typename A>
struct AxisBin {
  A start, size;
  int lo, hi;  // grid points touched, inclusive, clipped to the map
  int i0, i1;  // interior points [i0, i1): weight exactly 1

  __device__ __forceinline__ void set(A origin, A bin, int i, int extent) {
    start = origin + i * bin;
    size = bin;
    const A end = start + bin;
    lo = (int)min(max(floor(start), A(0)), A(extent));
    hi = (int)min(max(ceil(end), A(-1)), A(extent - 1));
    i0 = (int)min(max(ceil(start + A(1)), A(0)), A(extent));
    i1 = (int)min(max(floor(end - A(1)) + A(1), A(0)), A(extent));
    if (i1 < i0) i1 = i0;
  }
  __device__ __forceinline__ bool interior(int p) const { return p >= i0 && p < i1; }
  // the weight of grid point p: integral of its tent over the side (wide bins)
  __device__ __forceinline__ A weight(A origin, int i, int p) const {
    const A a = (origin - A(p)) + i * size;
    return tent_cdf(a + size) - tent_cdf(a);
  }
};

__device__ __forceinline__ bool add_cut(int* cuts, int& n, int c) {
  int pos = n;
  while (pos > 0 && cuts[pos - 1] > c) --pos;
  if (pos > 0 && cuts[pos - 1] == c) return true;
  if (n == kCuts) return false;
  for (int q = n; q > pos; --q) cuts[q] = cuts[q - 1];
  cuts[pos] = c;
  ++n;
  return true;
}

// The cuts of one axis for `bins` bins; false when they do not fit.
template <typename A>
__device__ __forceinline__ bool axis_cuts(A origin, A bin, int bins, int extent, int* cuts, int& n) {
  n = 0;
  bool ok = true;
  for (int i = 0; i < bins && ok; ++i) {
    AxisBin<A> s;
    s.set(origin, bin, i, extent);
    if (s.i1 > s.i0) ok = add_cut(cuts, n, s.i0) && add_cut(cuts, n, s.i1);
    for (int p = s.lo; p <= s.hi && ok; ++p)
      if (!s.interior(p)) ok = add_cut(cuts, n, p) && add_cut(cuts, n, p + 1);
  }
  return ok;
}

// The blocks (index into the cuts, weight) of bin i along one axis.
template <typename A>
__device__ __forceinline__ int bin_runs(A origin, A bin, int i, int extent, const int* cuts, int n, int* run,
                                        A* wgt) {
  AxisBin<A> s;
  s.set(origin, bin, i, extent);
  int t = 0;
  while (t < n - 1 && cuts[t] < s.lo) ++t;
  int count = 0;
  for (; t < n - 1 && cuts[t] <= s.hi; ++t) {
    const int r0 = cuts[t], r1 = cuts[t + 1];
    A w = A(0);
    if (r0 >= s.i0 && r1 <= s.i1 && s.i1 > s.i0) w = A(1);
    else if (r1 == r0 + 1) w = s.weight(origin, i, r0);
    if (w == A(0)) continue;
    if (count == kRunsPerBin) return -1;
    run[count] = t; wgt[count] = w; ++count;
  }
  return count;
}

constexpr int kMaxBins = 16;  // bins per side the tables path takes

// One RoI's geometry along one axis, shared by all its channels: the cuts and,
// for every bin, its runs (cut index, weight).
template <typename A>
struct AxisRuns {
  int n, use;
  int cut[kCuts];
  int count[kMaxBins];
  unsigned char run[kMaxBins][kRunsPerBin];
  A weight[kMaxBins][kRunsPerBin];
};

}  // namespace cupy_roi

// S[h][w] = sum of the plane over [0, h) x [0, w), (H + 1) x (W + 1) doubles per
// (image, channel) plane: this kernel writes row h of every plane as the
// prefix sums of row h - 1 of the map (row 0: zeros), one warp per row, 32
// columns at a time with a warp scan; prroi_tables_columns then sums the rows.
template <typename T>
__global__ void prroi_tables_rows(const T* __restrict__ input, int batch, int channels, int height, int width,
                                  index_t s0, index_t s1, index_t s2, index_t s3, double* __restrict__ tables) {
  const int lane = threadIdx.x & 31;
  const index_t warps = (index_t)gridDim.x * (blockDim.x >> 5);
  const index_t total = (index_t)batch * channels * (height + 1);
  const index_t row_len = width + 1;
  for (index_t idx = (index_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); idx < total; idx += warps) {
    const int h = (int)(idx % (height + 1));
    const index_t plane = idx / (height + 1);
    double* out = tables + idx * row_len;
    if (lane == 0) out[0] = 0.0;
    const T* row = input + (plane / channels) * s0 + (plane % channels) * s1 + (index_t)max(h - 1, 0) * s2;
    double carry = 0.0;
    for (int w0 = 0; w0 < width; w0 += 32) {
      const int w = w0 + lane;
      double v = (h > 0 && w < width) ? (double)to_acc(row[w * s3]) : 0.0;
      for (int off = 1; off < 32; off <<= 1) {
        const double u = __shfl_up_sync(0xffffffffu, v, off);
        if (lane >= off) v += u;
      }
      if (w < width) out[w + 1] = carry + v;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
  }
}

// Every RoI's AxisRuns for y (geo[2k]) and x (geo[2k + 1]), one thread each.
template <typename T>
__global__ void prroi_table_geometry(const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
                                     int batch, int height, int width, int ph, int pw,
                                     typename acc_type<T>::type spatial_scale,
                                     AxisRuns<typename acc_type<T>::type>* __restrict__ geo) {
  typedef typename acc_type<T>::type A;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < num_rois * 2;
       idx += (index_t)blockDim.x * gridDim.x) {
    const index_t k = idx / 2;
    const bool y_axis = idx % 2 == 0;
    AxisRuns<A>& g = geo[idx];
    g.use = 0;
    g.n = 0;
    int b; A x1, y1, x2, y2;
    if (!load_roi(rois, k, batch, b, x1, y1, x2, y2)) continue;
    const int bins = y_axis ? ph : pw, extent = y_axis ? height : width;
    const A origin = y_axis ? scaled(y1, spatial_scale) : scaled(x1, spatial_scale);
    const A bin = max((y_axis ? scaled(y2, spatial_scale) : scaled(x2, spatial_scale)) - origin, A(0)) / bins;
    if (!(bin >= A(1)) || bins > kMaxBins) continue;
    int n = 0;
    if (!axis_cuts(origin, bin, bins, extent, g.cut, n) || n < 2) continue;
    g.n = n;
    bool ok = true;
    for (int i = 0; i < bins && ok; ++i) {
      int run[kRunsPerBin];
      A wgt[kRunsPerBin];
      const int count = bin_runs(origin, bin, i, extent, g.cut, n, run, wgt);
      ok = count >= 0;
      g.count[i] = max(count, 0);
      for (int r = 0; r < max(count, 0); ++r) { g.run[i][r] = (unsigned char)run[r]; g.weight[i][r] = wgt[r]; }
    }
    g.use = ok;
  }
}

__global__ void prroi_tables_columns(double* __restrict__ tables, index_t planes, int height, int width) {
  const index_t total = planes * (width + 1);
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    const int w = (int)(idx % (width + 1));
    double* col = tables + (idx / (width + 1)) * (index_t)(height + 1) * (width + 1) + w;
    double acc = 0.0;
    for (int h = 1; h <= height; ++h) {
      acc += col[(index_t)h * (width + 1)];
      col[(index_t)h * (width + 1)] = acc;
    }
  }
}

// One (RoI, channel) item of the warp-per-item kernels, items in
// channel-block order: its RoI row and the area every bin of the RoI has.
template <typename A>
struct TableItem {
  index_t k;
  int c, b;
  A x1, y1, x2, y2, area;
  bool valid;

  __device__ __forceinline__ void set(index_t item, const A* rois, index_t num_rois, int batch, int channels,
                                      int channel_block, A spatial_scale, int ph, int pw, int height, int width) {
    const BinPos it = decompose(item, num_rois, channels, 1, 1, channel_block);
    k = it.k;
    c = it.c;
    valid = load_roi(rois, k, batch, b, x1, y1, x2, y2);
    PreciseBin<A> first;
    first.set(x1, y1, x2, y2, spatial_scale, 0, 0, ph, pw, height, width);
    area = first.area;
  }
};

// One warp per (RoI, channel) item, items in channel-block order.
template <typename T>
__global__ void prroi_forward_tables(
    const double* __restrict__ tables, const T* __restrict__ input, int batch, int channels, int height, int width,
    index_t s0, index_t s1, index_t s2, index_t s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois, int ph, int pw,
    typename acc_type<T>::type spatial_scale, int channel_block,
    const AxisRuns<typename acc_type<T>::type>* __restrict__ geo,
    T* __restrict__ output, index_t o0, index_t o1, index_t o2, index_t o3) {
  typedef typename acc_type<T>::type A;
  __shared__ double grid[kWarps][kCuts * kCuts];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  double* g = grid[warp];
  const Strides4 out_st = make_strides(o0, o1, o2, o3);
  const index_t items = num_rois * channels;
  for (index_t item = (index_t)blockIdx.x * kWarps + warp; item < items; item += (index_t)gridDim.x * kWarps) {
    TableItem<A> t;
    t.set(item, rois, num_rois, batch, channels, channel_block, spatial_scale, ph, pw, height, width);
    const index_t k = t.k;
    const int c = t.c, b = t.b;
    const bool valid = t.valid;
    const A area = t.area, x1 = t.x1, y1 = t.y1, x2 = t.x2, y2 = t.y2;
    if (!valid || !(area > A(0))) {
      for (int q = lane; q < ph * pw; q += 32)
        store(output + out_st.at(k, c, q / pw, q % pw), valid ? A(0) : quiet_nan<A>());
      continue;
    }
    const AxisRuns<A>& gy = geo[2 * k];
    const AxisRuns<A>& gx = geo[2 * k + 1];
    const T* plane = input + (index_t)b * s0 + (index_t)c * s1;
    if (gy.use && gx.use) {
      const int ny = gy.n, nx = gx.n;
      const double* table = tables + ((index_t)b * channels + c) * (index_t)(height + 1) * (width + 1);
      for (int q = lane; q < ny * nx; q += 32) g[q] = table[(index_t)gy.cut[q / nx] * (width + 1) + gx.cut[q % nx]];
      __syncwarp();
      for (int q = lane; q < ph * pw; q += 32) {
        const int i = q / pw, j = q % pw;
        const int nr = gy.count[i], nc = gx.count[j];
        double sum = 0.0;
        for (int r = 0; r < nr; ++r) {
          const double* g0 = g + gy.run[i][r] * nx;
          const double* g1 = g0 + nx;
          double row = 0.0;
          for (int u = 0; u < nc; ++u) {
            const int cu = gx.run[j][u];
            row += (double)gx.weight[j][u] * ((g1[cu + 1] - g0[cu + 1]) - (g1[cu] - g0[cu]));
          }
          sum += (double)gy.weight[i][r] * row;
        }
        store(output + out_st.at(k, c, i, j), A(sum) / area);
      }
    } else {
      for (int q = lane; q < ph * pw; q += 32) {
        PreciseBin<A> bin;
        bin.set(x1, y1, x2, y2, spatial_scale, q / pw, q % pw, ph, pw, height, width);
        A sum[1];
        if (bin.wide()) bin_integrals<1, T, A, false, true>(plane, 0, s2, s3, bin, sum);
        else bin_integrals<1, T, A, false, false>(plane, 0, s2, s3, bin, sum);
        store(output + out_st.at(k, c, q / pw, q % pw), sum[0] / bin.area);
      }
    }
    __syncwarp();  // the next item rewrites this warp's grid
  }
}

// Feature backward into the corner buffer (zero-filled doubles, (H + 1) x (W + 1)
// per plane); prroi_corner_rows and prroi_corner_columns turn it into the gradient.
template <typename T>
__global__ void prroi_backward_tables(
    const T* __restrict__ grad_output, index_t go0, index_t go1, index_t go2, index_t go3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int batch, int channels, int height, int width, int ph, int pw,
    typename acc_type<T>::type spatial_scale, int channel_block,
    const AxisRuns<typename acc_type<T>::type>* __restrict__ geo, double* __restrict__ corners) {
  typedef typename acc_type<T>::type A;
  __shared__ double grid[kWarps][kCuts * kCuts];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  double* g = grid[warp];
  const Strides4 go_st = make_strides(go0, go1, go2, go3);
  const index_t items = num_rois * channels;
  const index_t row_len = width + 1;
  for (index_t item = (index_t)blockIdx.x * kWarps + warp; item < items; item += (index_t)gridDim.x * kWarps) {
    TableItem<A> t;
    t.set(item, rois, num_rois, batch, channels, channel_block, spatial_scale, ph, pw, height, width);
    if (!t.valid || !(t.area > A(0))) continue;
    const index_t k = t.k;
    const int c = t.c, b = t.b;
    const A area = t.area, x1 = t.x1, y1 = t.y1, x2 = t.x2, y2 = t.y2;
    const AxisRuns<A>& gy = geo[2 * k];
    const AxisRuns<A>& gx = geo[2 * k + 1];
    double* plane = corners + ((index_t)b * channels + c) * (index_t)(height + 1) * row_len;
    if (gy.use && gx.use) {
      const int ny = gy.n, nx = gx.n;
      for (int q = lane; q < ny * nx; q += 32) g[q] = 0.0;
      __syncwarp();
      for (int q = lane; q < ph * pw; q += 32) {
        const int i = q / pw, j = q % pw;
        const int nr = gy.count[i], nc = gx.count[j];
        const double coeff = (double)(to_acc(grad_output[go_st.at(k, c, i, j)]) / area);
        for (int r = 0; r < nr; ++r) {
          double* g0 = g + gy.run[i][r] * nx;
          double* g1 = g0 + nx;
          const double cr = coeff * (double)gy.weight[i][r];
          for (int u = 0; u < nc; ++u) {
            const double v = cr * (double)gx.weight[j][u];
            const int cu = gx.run[j][u];
            atomicAdd(g1 + cu + 1, v);
            atomicAdd(g0 + cu + 1, -v);
            atomicAdd(g1 + cu, -v);
            atomicAdd(g0 + cu, v);
          }
        }
      }
      __syncwarp();
      for (int q = lane; q < ny * nx; q += 32)
        if (g[q] != 0.0) atomicAdd(plane + (index_t)gy.cut[q / nx] * row_len + gx.cut[q % nx], g[q]);
    } else {
      // every touched cell (h, w) as a 1 x 1 rectangle: four corners
      for (int q = lane; q < ph * pw; q += 32) {
        PreciseBin<A> bin;
        bin.set(x1, y1, x2, y2, spatial_scale, q / pw, q % pw, ph, pw, height, width);
        if (!(bin.area > A(0))) continue;
        const A coeff = to_acc(grad_output[go_st.at(k, c, q / pw, q % pw)]) / bin.area;
        for (int h = bin.h_lo; h <= bin.h_hi; ++h) {
          const A wyh = bin.wide() ? bin.template weight_y<true>(h) : bin.template weight_y<false>(h);
          for (int w = bin.w_lo; w <= bin.w_hi; ++w) {
            const A wxw = bin.wide() ? bin.template weight_x<true>(w) : bin.template weight_x<false>(w);
            const double v = (double)(coeff * wyh * wxw);
            if (v == 0.0) continue;
            atomicAdd(plane + (index_t)(h + 1) * row_len + w + 1, v);
            atomicAdd(plane + (index_t)h * row_len + w + 1, -v);
            atomicAdd(plane + (index_t)(h + 1) * row_len + w, -v);
            atomicAdd(plane + (index_t)h * row_len + w, v);
          }
        }
      }
    }
    __syncwarp();
  }
}

// Row pass: C[h][w] <- sum_{w' > w} C[h][w'], every row of every plane.
__global__ void prroi_corner_rows(double* __restrict__ corners, index_t planes, int height, int width) {
  const index_t total = planes * (height + 1);
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    double* row = corners + idx * (index_t)(width + 1);
    double acc = 0.0;
    for (int w = width; w >= 0; --w) {
      const double v = row[w];
      row[w] = acc;
      acc += v;
    }
  }
}

// Column pass: grad[h][w] = sum_{h' > h} C[h'][w], written in the gradient's dtype.
template <typename T>
__global__ void prroi_corner_columns(const double* __restrict__ corners, index_t planes, int channels, int height,
                                     int width, T* __restrict__ grad, index_t g0, index_t g1, index_t g2,
                                     index_t g3) {
  const index_t total = planes * width;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    const int w = (int)(idx % width);
    const index_t plane = idx / width;
    const double* col = corners + plane * (index_t)(height + 1) * (width + 1) + w;
    T* out = grad + (plane / channels) * g0 + (plane % channels) * g1 + w * g3;
    double acc = 0.0;
    for (int h = height; h >= 0; --h) {
      if (h < height) store(out + h * g2, (typename acc_type<T>::type)acc);
      acc += col[(index_t)h * (width + 1)];
    }
  }
}
