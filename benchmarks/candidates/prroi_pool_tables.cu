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
  for (; t < n - 1 && cuts[t] <= s.hi && count < kRunsPerBin; ++t) {
    const int r0 = cuts[t], r1 = cuts[t + 1];
    A w = A(0);
    if (r0 >= s.i0 && r1 <= s.i1 && s.i1 > s.i0) w = A(1);
    else if (r1 == r0 + 1) w = s.weight(origin, i, r0);
    if (w != A(0)) { run[count] = t; wgt[count] = w; ++count; }
  }
  return count;
}

struct WarpCuts {
  int y[kCuts], x[kCuts];
  int ny, nx, use_tables;
};

}  // namespace cupy_roi

// S[h][w] = sum of the plane over [0, h) x [0, w), (H + 1) x (W + 1) doubles per
// (image, channel) plane: this kernel writes row h of every plane as the
// prefix sums of row h - 1 of the map (row 0: zeros); prroi_tables_columns
// then sums the rows.
template <typename T>
__global__ void prroi_tables_rows(const T* __restrict__ input, int batch, int channels, int height, int width,
                                  index_t s0, index_t s1, index_t s2, index_t s3, double* __restrict__ tables) {
  const index_t total = (index_t)batch * channels * (height + 1);
  const index_t row_len = width + 1;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    const int h = (int)(idx % (height + 1));
    const index_t plane = idx / (height + 1);
    double* out = tables + idx * row_len;
    out[0] = 0.0;
    if (h == 0) {
      for (int w = 1; w <= width; ++w) out[w] = 0.0;
      continue;
    }
    const T* row = input + (plane / channels) * s0 + (plane % channels) * s1 + (index_t)(h - 1) * s2;
    double acc = 0.0;
    for (int w = 0; w < width; ++w) {
      acc += (double)to_acc(row[w * s3]);
      out[w + 1] = acc;
    }
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

// One warp per (RoI, channel) item, items in channel-block order.
template <typename T>
__global__ void prroi_forward_tables(
    const double* __restrict__ tables, const T* __restrict__ input, int batch, int channels, int height, int width,
    index_t s0, index_t s1, index_t s2, index_t s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois, int ph, int pw,
    typename acc_type<T>::type spatial_scale, int channel_block,
    T* __restrict__ output, index_t o0, index_t o1, index_t o2, index_t o3) {
  typedef typename acc_type<T>::type A;
  __shared__ WarpCuts cuts[kWarps];
  __shared__ double grid[kWarps][kCuts * kCuts];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  WarpCuts& cw = cuts[warp];
  double* g = grid[warp];
  const Strides4 out_st = make_strides(o0, o1, o2, o3);
  const index_t items = num_rois * channels;
  for (index_t item = (index_t)blockIdx.x * kWarps + warp; item < items; item += (index_t)gridDim.x * kWarps) {
    const BinPos it = decompose(item, num_rois, channels, 1, 1, channel_block);
    const index_t k = it.k;
    const int c = it.c;
    int b; A x1, y1, x2, y2;
    const bool valid = load_roi(rois, k, batch, b, x1, y1, x2, y2);
    const A ry1 = scaled(y1, spatial_scale), rx1 = scaled(x1, spatial_scale);
    const A bin_h = max(scaled(y2, spatial_scale) - ry1, A(0)) / ph;
    const A bin_w = max(scaled(x2, spatial_scale) - rx1, A(0)) / pw;
    const A area = bin_h * bin_w;
    if (!valid || !(area > A(0))) {
      for (int q = lane; q < ph * pw; q += 32)
        store(output + out_st.at(k, c, q / pw, q % pw), valid ? A(0) : quiet_nan<A>());
      continue;
    }
    if (lane == 0) {
      int ny = 0, nx = 0;
      const bool ok = bin_h >= A(1) && bin_w >= A(1) && axis_cuts(ry1, bin_h, ph, height, cw.y, ny) &&
                      axis_cuts(rx1, bin_w, pw, width, cw.x, nx);
      cw.ny = ny; cw.nx = nx;
      cw.use_tables = ok && ny >= 2 && nx >= 2;
    }
    __syncwarp();
    const T* plane = input + (index_t)b * s0 + (index_t)c * s1;
    if (cw.use_tables) {
      const int ny = cw.ny, nx = cw.nx;
      const double* table = tables + ((index_t)b * channels + c) * (index_t)(height + 1) * (width + 1);
      for (int q = lane; q < ny * nx; q += 32) g[q] = table[(index_t)cw.y[q / nx] * (width + 1) + cw.x[q % nx]];
      __syncwarp();
      for (int q = lane; q < ph * pw; q += 32) {
        const int i = q / pw, j = q % pw;
        int rt[kRunsPerBin], ru[kRunsPerBin];
        A wy[kRunsPerBin], wx[kRunsPerBin];
        const int nr = bin_runs(ry1, bin_h, i, height, cw.y, ny, rt, wy);
        const int nc = bin_runs(rx1, bin_w, j, width, cw.x, nx, ru, wx);
        double sum = 0.0;
        for (int r = 0; r < nr; ++r) {
          const double* g0 = g + rt[r] * nx;
          const double* g1 = g0 + nx;
          double row = 0.0;
          for (int u = 0; u < nc; ++u) {
            const int cu = ru[u];
            row += (double)wx[u] * ((g1[cu + 1] - g0[cu + 1]) - (g1[cu] - g0[cu]));
          }
          sum += (double)wy[r] * row;
        }
        store(output + out_st.at(k, c, i, j), A(sum) / area);
      }
    } else {
      for (int q = lane; q < ph * pw; q += 32) {
        PreciseBin<A> bin;
        bin.set(x1, y1, x2, y2, spatial_scale, q / pw, q % pw, ph, pw, height, width);
        const A sum = bin.wide() ? bin_integral<T, A, false, true>(plane, s2, s3, bin)
                                 : bin_integral<T, A, false, false>(plane, s2, s3, bin);
        store(output + out_st.at(k, c, q / pw, q % pw), sum / bin.area);
      }
    }
    __syncwarp();  // the next item rewrites this warp's cuts and grid
  }
}

// Feature backward into the corner buffer (zero-filled doubles, (H + 1) x (W + 1)
// per plane); prroi_corner_rows and prroi_corner_columns turn it into the gradient.
template <typename T>
__global__ void prroi_backward_tables(
    const T* __restrict__ grad_output, index_t go0, index_t go1, index_t go2, index_t go3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int batch, int channels, int height, int width, int ph, int pw,
    typename acc_type<T>::type spatial_scale, int channel_block, double* __restrict__ corners) {
  typedef typename acc_type<T>::type A;
  __shared__ WarpCuts cuts[kWarps];
  __shared__ double grid[kWarps][kCuts * kCuts];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  WarpCuts& cw = cuts[warp];
  double* g = grid[warp];
  const Strides4 go_st = make_strides(go0, go1, go2, go3);
  const index_t items = num_rois * channels;
  const index_t row_len = width + 1;
  for (index_t item = (index_t)blockIdx.x * kWarps + warp; item < items; item += (index_t)gridDim.x * kWarps) {
    const BinPos it = decompose(item, num_rois, channels, 1, 1, channel_block);
    const index_t k = it.k;
    const int c = it.c;
    int b; A x1, y1, x2, y2;
    if (!load_roi(rois, k, batch, b, x1, y1, x2, y2)) continue;
    const A ry1 = scaled(y1, spatial_scale), rx1 = scaled(x1, spatial_scale);
    const A bin_h = max(scaled(y2, spatial_scale) - ry1, A(0)) / ph;
    const A bin_w = max(scaled(x2, spatial_scale) - rx1, A(0)) / pw;
    const A area = bin_h * bin_w;
    if (!(area > A(0))) continue;
    if (lane == 0) {
      int ny = 0, nx = 0;
      const bool ok = bin_h >= A(1) && bin_w >= A(1) && axis_cuts(ry1, bin_h, ph, height, cw.y, ny) &&
                      axis_cuts(rx1, bin_w, pw, width, cw.x, nx);
      cw.ny = ny; cw.nx = nx;
      cw.use_tables = ok && ny >= 2 && nx >= 2;
    }
    __syncwarp();
    double* plane = corners + ((index_t)b * channels + c) * (index_t)(height + 1) * row_len;
    if (cw.use_tables) {
      const int ny = cw.ny, nx = cw.nx;
      for (int q = lane; q < ny * nx; q += 32) g[q] = 0.0;
      __syncwarp();
      for (int q = lane; q < ph * pw; q += 32) {
        const int i = q / pw, j = q % pw;
        int rt[kRunsPerBin], ru[kRunsPerBin];
        A wy[kRunsPerBin], wx[kRunsPerBin];
        const int nr = bin_runs(ry1, bin_h, i, height, cw.y, ny, rt, wy);
        const int nc = bin_runs(rx1, bin_w, j, width, cw.x, nx, ru, wx);
        const double coeff = (double)(to_acc(grad_output[go_st.at(k, c, i, j)]) / area);
        for (int r = 0; r < nr; ++r) {
          double* g0 = g + rt[r] * nx;
          double* g1 = g0 + nx;
          const double cr = coeff * (double)wy[r];
          for (int u = 0; u < nc; ++u) {
            const double v = cr * (double)wx[u];
            const int cu = ru[u];
            atomicAdd(g1 + cu + 1, v);
            atomicAdd(g0 + cu + 1, -v);
            atomicAdd(g1 + cu, -v);
            atomicAdd(g0 + cu, v);
          }
        }
      }
      __syncwarp();
      for (int q = lane; q < ny * nx; q += 32)
        if (g[q] != 0.0) atomicAdd(plane + (index_t)cw.y[q / nx] * row_len + cw.x[q % nx], g[q]);
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
