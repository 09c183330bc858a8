// Precise RoI Pooling (IoU-Net) and its position-sensitive variant.
//
// f(y, x) = sum_{h,w} F[h,w] tent(y - h) tent(x - w) with tent(t) = max(0, 1 - |t|)
// is separable, so the exact integral of f over a bin [ys, ye) x [xs, xe) is
//   sum_{h,w} F[h,w] * Wy(h) * Wx(w),   Wy(h) = integral_{ys}^{ye} tent(y - h) dy,
// and its derivative w.r.t. a bin edge, e.g. d/dxs = -integral f(y, xs) dy,
//   = -sum_{h,w} F[h,w] * Wy(h) * tent(xs - w).
// Each feature is read once per bin instead of once per unit cell it touches.
#include "roi_common.cuh"

namespace cupy_roi {

// Grid columns whose weights a thread keeps in registers at a time: unrolled
// slots past a bin's last column still issue, so a chunk near the typical bin
// width wins (6 beat 4 and 8 on an H100 at detector scale; benchmarks/NOTES.md).
constexpr int kColumns = 6;

// What one grid point's tent contributes over a bin side [a, a + width) in the
// tent's own coordinate (a = bin start - grid point):
//   weight       = integral_a^b tent(t) dt,
//   start_moment = integral_a^b (b - u) tent'(u) du = weight - width * tent(a),
//   end_moment   = integral_a^b (u - a) tent'(u) du = width * tent(b) - weight,
// with b = a + width. The moments are the bin-edge derivatives of the integral
// times width^2 (d mean / d start = sum F start_moment / width^2 ...), formed
// directly instead of as differences of nearly equal terms: for bins far
// thinner than a pixel, tent_cdf(b) - tent_cdf(a) and weight - width * tent(a)
// keep only a few digits in float.
template <typename A>
struct TentSpan { A weight, start_moment, end_moment; };

// Overlap of [a, b) with one linear piece [p0, p1) of the tent (slope +1 on
// [-1, 0), -1 on [0, 1)). Its length and its gaps to a and to b are each
// written around an end they share with a, so that a bin of width 1e-3 keeps
// its digits wherever it lies.
template <typename A, bool kMoments>
__device__ __forceinline__ void add_tent_piece(A a, A width, A b, A p0, A p1, bool rising, TentSpan<A>& s) {
  if (!(a < p1 && b > p0)) return;
  const bool clip_lo = a < p0, clip_hi = b > p1;
  const A len = clip_lo ? (clip_hi ? p1 - p0 : (a - p0) + width) : (clip_hi ? p1 - a : width);
  const A half = A(0.5) * len;
  const A lo = clip_lo ? p0 : a;
  const A mid_height = rising ? (A(1) + lo) + half : (A(1) - lo) - half;  // tent at the overlap's middle
  s.weight += len * mid_height;
  if (kMoments) {
    const A lo_gap = clip_lo ? p0 - a : A(0);           // a to the overlap's start
    const A hi_gap = clip_hi ? (a - p1) + width : A(0);  // the overlap's end to b
    const A signed_len = rising ? len : -len;
    s.start_moment += signed_len * (hi_gap + half);
    s.end_moment += signed_len * (lo_gap + half);
  }
}

template <typename A, bool kMoments>
__device__ __forceinline__ TentSpan<A> tent_span(A a, A width) {
  TentSpan<A> s = {A(0), A(0), A(0)};
  const A b = a + width;
  add_tent_piece<A, kMoments>(a, width, b, A(-1), A(0), true, s);
  add_tent_piece<A, kMoments>(a, width, b, A(0), A(1), false, s);
  return s;
}

// integral_{-inf}^{t} tent(u) du, as a select rather than branches; each half
// is written around its own end so that small values keep their precision.
template <typename A>
__device__ __forceinline__ A tent_cdf(A t) {
  const A u = min(max(t, A(-1)), A(1));
  const A v = A(1) - fabs(u);
  const A tail = A(0.5) * v * v;
  return u >= A(0) ? A(1) - tail : tail;
}

// Bins at least this wide (in feature pixels) take a grid point's weight as
// tent_cdf(b) - tent_cdf(a): a few instructions fewer than tent_span, and its
// rounding error, about eps / width relative, stays under 1e-6 there. Thinner
// bins need tent_span's cancellation-free form.
constexpr double kWideBin = 0.25;

// One output bin of a PrRoIPool RoI in feature-map coordinates, and the grid
// points [lo, hi] (clipped to the map: the surface is zero-padded) it touches.
// A grid point's offset is taken as (RoI start - point) + bin offset: the first
// difference is exact for the points near a small RoI, so a thin bin's position
// relative to its grid points is not rounded to the size of its coordinates.
template <typename A>
struct PreciseBin {
  A rx1, ry1, off_x, off_y, bin_h, bin_w, area;
  int h_lo, h_hi, w_lo, w_hi;

  __device__ __forceinline__ void set(A x1, A y1, A x2, A y2, A scale, int i, int j, int ph, int pw,
                                      int height, int width) {
    set_roi(x1, y1, x2, y2, scale, ph, pw);
    place(i, j, height, width);
  }
  // The RoI's corner and bin size (the same for all its bins).
  __device__ __forceinline__ void set_roi(A x1, A y1, A x2, A y2, A scale, int ph, int pw) {
    rx1 = scaled(x1, scale); ry1 = scaled(y1, scale);
    bin_w = max(scaled(x2, scale) - rx1, A(0)) / pw;
    bin_h = max(scaled(y2, scale) - ry1, A(0)) / ph;
    area = bin_w * bin_h;
  }
  // Moves to bin (i, j) of the RoI.
  __device__ __forceinline__ void place(int i, int j, int height, int width) {
    off_x = j * bin_w; off_y = i * bin_h;
    const A xs = rx1 + off_x, ys = ry1 + off_y;
    const A xe = xs + bin_w, ye = ys + bin_h;
    // Clamp in floating point first so that far-away boxes cannot overflow int.
    h_lo = (int)min(max(floor(ys), A(0)), A(height));
    h_hi = (int)min(max(ceil(ye), A(-1)), A(height - 1));
    w_lo = (int)min(max(floor(xs), A(0)), A(width));
    w_hi = (int)min(max(ceil(xe), A(-1)), A(width - 1));
  }
  template <bool kMoments>
  __device__ __forceinline__ TentSpan<A> span_y(int h) const {
    return tent_span<A, kMoments>((ry1 - A(h)) + off_y, bin_h);
  }
  template <bool kMoments>
  __device__ __forceinline__ TentSpan<A> span_x(int w) const {
    return tent_span<A, kMoments>((rx1 - A(w)) + off_x, bin_w);
  }
  // span_x<true> of the kColumns grid columns from wc (zeros past w_hi) as
  // three register arrays: weights, start and end moments.
  __device__ __forceinline__ void column_spans(int wc, A (&weight)[kColumns], A (&start)[kColumns],
                                               A (&end)[kColumns]) const {
#pragma unroll
    for (int u = 0; u < kColumns; ++u) {
      const TentSpan<A> t = wc + u <= w_hi ? span_x<true>(wc + u) : TentSpan<A>{0, 0, 0};
      weight[u] = t.weight; start[u] = t.start_moment; end[u] = t.end_moment;
    }
  }
  // s times the gradients of bin (i, j)'s mean w.r.t. the box's x1, y1, x2, y2
  // (d[0..3]) from its edge moments m_xs, m_xe, m_ys, m_ye (sum F Wy Sx, ...,
  // see TentSpan): d mean / d xs = m_xs / (bin_h bin_w^2), and likewise for
  // the other edges; xs = x1' (1 - j/pw) + x2' j/pw and xe = x1' (1 - (j+1)/pw)
  // + x2' (j+1)/pw.
  __device__ __forceinline__ void box_gradient(A m_xs, A m_xe, A m_ys, A m_ye, int i, int j, int ph, int pw, A s,
                                               A (&d)[4]) const {
    const A d_xs = m_xs / (area * bin_w), d_xe = m_xe / (area * bin_w);
    const A d_ys = m_ys / (area * bin_h), d_ye = m_ye / (area * bin_h);
    const A fj0 = A(j) / pw, fj1 = A(j + 1) / pw;
    const A fi0 = A(i) / ph, fi1 = A(i + 1) / ph;
    d[0] = s * (d_xs * (A(1) - fj0) + d_xe * (A(1) - fj1));
    d[1] = s * (d_ys * (A(1) - fi0) + d_ye * (A(1) - fi1));
    d[2] = s * (d_xs * fj0 + d_xe * fj1);
    d[3] = s * (d_ys * fi0 + d_ye * fi1);
  }
  __device__ __forceinline__ bool wide() const { return bin_w >= A(kWideBin) && bin_h >= A(kWideBin); }
  // Weights only (the forward): the short form for wide bins, tent_span for thin ones.
  template <bool kWide>
  __device__ __forceinline__ A weight_y(int h) const {
    const A a = (ry1 - A(h)) + off_y;
    return kWide ? tent_cdf(a + bin_h) - tent_cdf(a) : tent_span<A, false>(a, bin_h).weight;
  }
  template <bool kWide>
  __device__ __forceinline__ A weight_x(int w) const {
    const A a = (rx1 - A(w)) + off_x;
    return kWide ? tent_cdf(a + bin_w) - tent_cdf(a) : tent_span<A, false>(a, bin_w).weight;
  }
};

// sum_{h,w} F[h,w] Wy(h) Wx(w) over the bin's grid points of CPT planes
// plane_step elements apart. Columns go in register-held chunks, so their
// weights are computed once per chunk (and once for all CPT planes) rather
// than once per grid point. Each plane's sum is a chain of fused
// multiply-adds in a fixed order, so no result depends on CPT.
template <int CPT, typename T, typename A, bool kUnitColumns, bool kWide>
__device__ __forceinline__ void bin_integrals(const T* plane, index_t plane_step, index_t row_stride,
                                              index_t col_stride, const PreciseBin<A>& bin, A (&sum)[CPT]) {
  const index_t cs = kUnitColumns ? 1 : col_stride;
#pragma unroll
  for (int t = 0; t < CPT; ++t) sum[t] = A(0);
  for (int wc = bin.w_lo; wc <= bin.w_hi; wc += kColumns) {
    A wx[kColumns];
#pragma unroll
    for (int u = 0; u < kColumns; ++u) wx[u] = (wc + u <= bin.w_hi) ? bin.template weight_x<kWide>(wc + u) : A(0);
    const T* row = plane + bin.h_lo * row_stride + wc * cs;
    for (int h = bin.h_lo; h <= bin.h_hi; ++h, row += row_stride) {
      const A wy = bin.template weight_y<kWide>(h);
#pragma unroll
      for (int t = 0; t < CPT; ++t) {
        const T* r = row + t * plane_step;
        A acc = 0;
#pragma unroll
        for (int u = 0; u < kColumns; ++u)
          if (wc + u <= bin.w_hi) acc = fused(wx[u], to_acc(r[u * cs]), acc);
        sum[t] = fused(wy, acc, sum[t]);
      }
    }
  }
}

// The box-edge moments of a bin, for the coordinate gradients: with F' =
// sum_t g[t] F_t the CPT planes weighed by their output gradients (the
// moments are linear in F, so one set serves all CPT channels), and TentSpan's
// weight W and moments S, E per grid line,
//   m[0] = sum F' Wy Sx,  m[1] = sum F' Wy Ex,  m[2] = sum F' Sy Wx,  m[3] = sum F' Ey Wx,
// the bin's xs, xe, ys and ye moments (see prroi_pool_backward). Columns in
// register-held chunks as bin_integrals; the tents always in their
// cancellation-free form (moments of thin bins need it).
template <int CPT, typename T, typename A, bool kUnitColumns>
__device__ __forceinline__ void bin_moments(const T* plane, index_t plane_step, index_t row_stride,
                                            index_t col_stride, const PreciseBin<A>& bin, const A (&g)[CPT],
                                            A (&m)[4]) {
  const index_t cs = kUnitColumns ? 1 : col_stride;
#pragma unroll
  for (int e = 0; e < 4; ++e) m[e] = A(0);
  for (int wc = bin.w_lo; wc <= bin.w_hi; wc += kColumns) {
    A wx[kColumns], sx[kColumns], ex[kColumns];
    bin.column_spans(wc, wx, sx, ex);
    const T* row = plane + bin.h_lo * row_stride + wc * cs;
    for (int h = bin.h_lo; h <= bin.h_hi; ++h, row += row_stride) {
      A rw = 0, rs = 0, re = 0;
#pragma unroll
      for (int u = 0; u < kColumns; ++u) {
        if (wc + u > bin.w_hi) continue;
        A f = 0;
#pragma unroll
        for (int t = 0; t < CPT; ++t) f = fused(g[t], to_acc(row[t * plane_step + u * cs]), f);
        rw = fused(f, wx[u], rw);
        rs = fused(f, sx[u], rs);
        re = fused(f, ex[u], re);
      }
      const TentSpan<A> sy = bin.template span_y<true>(h);
      m[0] = fused(sy.weight, rs, m[0]);
      m[1] = fused(sy.weight, re, m[1]);
      m[2] = fused(sy.start_moment, rw, m[2]);
      m[3] = fused(sy.end_moment, rw, m[3]);
    }
  }
}

// Sums v over each run of lanes holding the same key (the work order puts a
// RoI's bins next to each other, so a warp holds one run or a few): a
// segmented inclusive scan over (run start, value) pairs. Returns whether
// this lane ends its run; that lane then holds the run's sums. Every lane of
// the warp must call it.
template <typename A, int N>
__device__ __forceinline__ bool run_sums(long long key, A (&v)[N]) {
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const long long before = __shfl_up_sync(full, key, 1), after = __shfl_down_sync(full, key, 1);
  bool starts = lane == 0 || before != key;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const bool starts_before = __shfl_up_sync(full, (int)starts, d) != 0;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const A o = __shfl_up_sync(full, v[e], d);
      if (lane >= d && !starts) v[e] += o;
    }
    if (lane >= d) starts = starts || starts_before;
  }
  return lane == 31 || after != key;
}

// The rows lo..hi (the same on every lane) of a bin row in a warp mode:
// body(h, v) with v = row_value(h), each worked out by one lane, 32 rows at
// a time, and handed round by shuffles. A row's tent weights and moments
// cost dozens of instructions; computed by every lane for every row they
// outweighed the row's reads and adds.
template <typename V> struct Shuffled;
template <> struct Shuffled<float> {
  __device__ __forceinline__ static float from(float v, int lane) { return __shfl_sync(0xffffffffu, v, lane); }
};
template <> struct Shuffled<double> {
  __device__ __forceinline__ static double from(double v, int lane) { return __shfl_sync(0xffffffffu, v, lane); }
};
template <typename A> struct Shuffled<TentSpan<A>> {
  __device__ __forceinline__ static TentSpan<A> from(const TentSpan<A>& v, int lane) {
    return {Shuffled<A>::from(v.weight, lane), Shuffled<A>::from(v.start_moment, lane),
            Shuffled<A>::from(v.end_moment, lane)};
  }
};

template <typename RowValue, typename Body>
__device__ __forceinline__ void for_warp_rows(int lo, int hi, RowValue row_value, Body body) {
  for (int r0 = lo; r0 <= hi; r0 += 32) {
    typedef decltype(row_value(lo)) V;
    const V mine = row_value(min(r0 + (int)(threadIdx.x & 31), hi));
    const int n = min(hi - r0 + 1, 32);
    for (int r = 0; r < n; ++r) body(r0 + r, Shuffled<V>::from(mine, r));
  }
}

// Bins whose tents a lane of warp_precise_backward holds at a time: a pixel
// column meets at most 2 / bin_w + 2 bins, so 4 cover bins from 2/3 of a
// pixel up in one pass; thinner bins take more passes (their rows read and
// added again). All of a RoI's bins at once (kWarpBins) took 155 registers
// and made the coordinate pass 2x slower.
constexpr int kColumnBins = 4;

// Warp-mode backward of one RoI over `channels` (at most kWarpChannels)
// planes (see the warp mode in roi_common.cuh), any number of bins: lanes
// over the RoI's pixel columns, 32 at a time (an integral weighs every pixel
// its bins cover, so no lane idles inside the box). With G_ij the bin's
// gradient, Wx_j(w) the column's weight in bin j and Sx_j, Ex_j its start
// and end moments (TentSpan), f0_j = j / pw and f1_j = (j + 1) / pw the
// shares of x2 in the bin's two edges, a lane forms per bin row i, over the
// bins j its column meets (kColumnBins at a time), divided by the bins' area,
//   Q_i(w)  = sum_j G_ij Wx_j(w),
//   X1_i(w) = sum_j G_ij (Sx_j(w) (1 - f0_j) + Ex_j(w) (1 - f1_j)),
//   X2_i(w) = sum_j G_ij (Sx_j(w) f0_j + Ex_j(w) f1_j).
// Feature gradient: Wy_i(h) Q_i(w) added to pixel (h, w) once per pixel row
// (RowRun). With kCoords, the box moments too: F[h, w] times Wy_i(h)
// X1_i(w), Wy_i(h) X2_i(w) and, through the rows' own moments, Q_i(w) for y1
// and y2 (the block mode's sums over bins, regrouped); d x1 = spatial_scale
// / bin_w * the x1 moment summed over the lanes, and likewise.
template <bool kCoords, typename A, typename T>
__device__ __forceinline__ void warp_precise_backward(const GradSink<A>& sink, index_t g_plane, index_t gi_s1,
                                                      index_t gi_s2, index_t gi_s3, const T* plane,
                                                      index_t plane_step, index_t s2, index_t s3, int height,
                                                      int width, const PreciseBin<A>& roi, int ph, int pw,
                                                      const T* grad, index_t grad_step, index_t go_s2,
                                                      index_t go_s3, int channels,
                                                      A (&moment)[4]) {
  PreciseBin<A> first = roi, last = roi;
  first.place(0, 0, height, width);
  last.place(ph - 1, pw - 1, height, width);
  const A inv_area = A(1) / roi.area;
  // The column tents (weight and x1, x2 moment shares) of the bins a lane
  // meets are read once per bin row: they wait in shared memory, lane-major
  // (each lane reads only its own, without bank conflicts), so that the
  // registers (64 under the cap) keep the row loop's sums. Held in registers
  // they pushed those sums to local memory (224 against 184 bytes spilled;
  // detector case with box gradients 1% slower, benchmarks/NOTES.md).
  __shared__ A tent_store[kBlockThreads / 32][3][kColumnBins][32];
  const int lane = threadIdx.x & 31;
  A (&tents)[3][kColumnBins][32] = tent_store[threadIdx.x >> 5];
  for (int c0 = first.w_lo; c0 <= last.w_hi; c0 += kWarpColumns) {
    const int col = c0 + lane;
    const bool inside = col <= last.w_hi;
    // the bins [j_first, j_last] whose tents over (col - 1, col + 1) may meet
    // this column (a superset: tent_span gives the others zero)
    int j_first = 0, j_last = -1;
    if (inside) {
      j_first = (int)min(max(floor(((A(col) - A(1)) - roi.rx1) / roi.bin_w), A(0)), A(pw));
      j_last = (int)min(floor(((A(col) + A(1)) - roi.rx1) / roi.bin_w), A(pw - 1));
    }
    int passes = j_last >= j_first ? (j_last - j_first) / kColumnBins + 1 : 0;
    passes = warp_max(passes);
    const RowSink<A> flush{sink, g_plane + col * gi_s3, gi_s2, gi_s1, channels};
    for (int pass = 0; pass < passes; ++pass) {
      const int j0 = j_first + pass * kColumnBins;
#pragma unroll
      for (int u = 0; u < kColumnBins; ++u) {
        A wx = A(0), ax1 = A(0), ax2 = A(0);
        const int j = j0 + u;
        if (j <= j_last) {
          PreciseBin<A> bin = roi;
          bin.place(0, j, height, width);
          if (!kCoords) {
            wx = bin.template weight_x<false>(col);
          } else {
            const TentSpan<A> sx = bin.template span_x<true>(col);
            const A f0 = A(j) / pw, f1 = A(j + 1) / pw;
            wx = sx.weight;
            ax1 = sx.start_moment * (A(1) - f0) + sx.end_moment * (A(1) - f1);
            ax2 = sx.start_moment * f0 + sx.end_moment * f1;
          }
        }
        tents[0][u][lane] = wx;
        tents[1][u][lane] = ax1;
        tents[2][u][lane] = ax2;
      }
      RowRun<A, 3> rows;
      for (int i = 0; i < ph; ++i) {
        A q[kWarpChannels], x1[kWarpChannels], x2[kWarpChannels];
#pragma unroll
        for (int t = 0; t < kWarpChannels; ++t) q[t] = x1[t] = x2[t] = A(0);
#pragma unroll
        for (int u = 0; u < kColumnBins; ++u) {
          const A wx = tents[0][u][lane], ax1 = tents[1][u][lane], ax2 = tents[2][u][lane];
          if (wx == A(0) && ax1 == A(0) && ax2 == A(0)) continue;  // a bin the column misses
#pragma unroll
          for (int t = 0; t < kWarpChannels; ++t) {
            if (t >= channels) continue;
            const A g = to_acc(grad[t * grad_step + i * go_s2 + (j0 + u) * go_s3]);
            q[t] = fused(g, wx, q[t]);
            if (kCoords) {
              x1[t] = fused(g, ax1, x1[t]);
              x2[t] = fused(g, ax2, x2[t]);
            }
          }
        }
#pragma unroll
        for (int t = 0; t < kWarpChannels; ++t) {
          q[t] *= inv_area;
          if (kCoords) {
            x1[t] *= inv_area;
            x2[t] *= inv_area;
          }
        }
        PreciseBin<A> bin = roi;
        bin.place(i, 0, height, width);
        const A f0 = A(i) / ph, f1 = A(i + 1) / ph;
        // per row: Wy_i(h) and its moments in the y1 and y2 shares
        const auto row_weights = [&](int h) {
          if (!kCoords) return TentSpan<A>{bin.template weight_y<false>(h), A(0), A(0)};
          const TentSpan<A> sy = bin.template span_y<true>(h);
          return TentSpan<A>{sy.weight, sy.start_moment * (A(1) - f0) + sy.end_moment * (A(1) - f1),
                             sy.start_moment * f0 + sy.end_moment * f1};
        };
        // the next row's features are loaded while this row's are summed (the loads wait on L2)
        A f_next[kWarpChannels];
        const auto load_row = [&](int h) {
#pragma unroll
          for (int t = 0; t < kWarpChannels; ++t) f_next[t] = A(0);
          if (!kCoords || !inside) return;
          const T* px = plane + h * s2 + col * s3;
#pragma unroll
          for (int t = 0; t < kWarpChannels; ++t)
            if (t < channels) f_next[t] = to_acc(px[t * plane_step]);
        };
        if (bin.h_lo <= bin.h_hi) load_row(bin.h_lo);
        for_warp_rows(bin.h_lo, bin.h_hi, row_weights, [&](int h, const TentSpan<A>& wy) {
          rows.add(h, wy.weight, q, flush);
          if (kCoords) {
            A f[kWarpChannels];
#pragma unroll
            for (int t = 0; t < kWarpChannels; ++t) f[t] = f_next[t];
            if (h < bin.h_hi) load_row(h + 1);
            A rq = 0, r1 = 0, r2 = 0;
#pragma unroll
            for (int t = 0; t < kWarpChannels; ++t) {
              rq = fused(f[t], q[t], rq);
              r1 = fused(f[t], x1[t], r1);
              r2 = fused(f[t], x2[t], r2);
            }
            moment[0] = fused(wy.weight, r1, moment[0]);
            moment[1] = fused(wy.start_moment, rq, moment[1]);
            moment[2] = fused(wy.weight, r2, moment[2]);
            moment[3] = fused(wy.end_moment, rq, moment[3]);
          }
        });
      }
      rows.finish(flush);
    }
  }
}

}  // namespace cupy_roi

using namespace cupy_roi;

// CPT: output channels per thread (decompose_group); 1 but for plain
// PrRoIPool in float types, where the host picks it.
template <typename T, bool PS, int CPT = 1>
__global__ void prroi_pool_forward(
    const T* __restrict__ input, int batch, int height, int width,
    index_t in_s0, index_t in_s1, index_t in_s2, index_t in_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw, typename acc_type<T>::type spatial_scale,
    int channel_block,
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
    PreciseBin<A> bin;
    const bool valid = load_roi(rois, p.k, batch, b, x1, y1, x2, y2);
    if (valid) bin.set(x1, y1, x2, y2, spatial_scale, p.i, p.j, ph, pw, height, width);
    if (!valid || !(bin.area > A(0))) {
#pragma unroll
      for (int t = 0; t < CPT; ++t) store(out + t * out_s1, valid ? A(0) : quiet_nan<A>());
      continue;
    }
    const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
    const T* plane = input + (index_t)b * in_s0 + (index_t)c_in * in_s1;
    const index_t step = group_plane_step<PS>(in_s1, ph, pw);
    // The common unit column stride as a constant spares an address multiply per read.
    if (bin.wide()) {
      if (in_s3 == 1) bin_integrals<CPT, T, A, true, true>(plane, step, in_s2, 1, bin, sum);
      else bin_integrals<CPT, T, A, false, true>(plane, step, in_s2, in_s3, bin, sum);
    } else {
      if (in_s3 == 1) bin_integrals<CPT, T, A, true, false>(plane, step, in_s2, 1, bin, sum);
      else bin_integrals<CPT, T, A, false, false>(plane, step, in_s2, in_s3, bin, sum);
    }
#pragma unroll
    for (int t = 0; t < CPT; ++t) store(out + t * out_s1, sum[t] / bin.area);
  }
}

// The block mode (position-sensitive pooling and channels-last buffers;
// prroi_pool_backward_warp elsewhere): one
// block works on a contiguous chunk of one RoI's output elements, so the
// four coordinate gradients of that RoI are reduced inside the block and
// written with four atomics per block instead of four per output element.
// grad_input and grad_rois ([K, 5]) are zero-filled accumulation buffers of the
// accumulation type; input is read only when want_coords is set (the
// launcher sets it for the deterministic backward alone: with float atomics
// prroi_pool_coords is faster). Deterministic (max_grad given, see GradSink): grad_input holds long long,
// and each block writes its four sums to grad_rois[block * 4 ...], a
// [K * chunks_per_roi, 4] buffer that prroi_pool_coords_sum reduces in a
// fixed order (a block's own sum is fixed by its chunk, not by scheduling).
template <typename T, bool PS>
__global__ void prroi_pool_backward(
    const T* __restrict__ grad_output, index_t go_s0, index_t go_s1, index_t go_s2, index_t go_s3,
    const T* __restrict__ input, index_t in_s0, index_t in_s1, index_t in_s2, index_t in_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw, typename acc_type<T>::type spatial_scale,
    int channels_fastest, int chunks_per_roi, int want_coords,
    void* __restrict__ grad_input, int batch, int height, int width,
    index_t gi_s0, index_t gi_s1, index_t gi_s2, index_t gi_s3,
    typename acc_type<T>::type* __restrict__ grad_rois, const T* __restrict__ max_grad) {
  typedef typename acc_type<T>::type A;
  __shared__ A scratch[32];
  const GradSink<A> sink(grad_input, max_grad, gradient_contributions(num_rois, ph, pw, PS));
  const Strides4 go_st = make_strides(go_s0, go_s1, go_s2, go_s3);
  const index_t per_roi = (index_t)channels_out * ph * pw;
  const index_t chunk_len = (per_roi + chunks_per_roi - 1) / chunks_per_roi;
  for (index_t blk = blockIdx.x; blk < num_rois * chunks_per_roi; blk += gridDim.x) {
    const index_t k = blk / chunks_per_roi;
    const index_t e_begin = (blk % chunks_per_roi) * chunk_len;
    const index_t e_end = min(e_begin + chunk_len, per_roi);
    int b; A x1, y1, x2, y2;
    if (!load_roi(rois, k, batch, b, x1, y1, x2, y2)) continue;  // uniform over the block
    A g_x1 = 0, g_y1 = 0, g_x2 = 0, g_y2 = 0;
    for (index_t e = e_begin + threadIdx.x; e < e_end; e += blockDim.x) {
      const BinPos p = decompose(k * per_roi + e, num_rois, channels_out, ph, pw,
                                 channels_fastest ? 0 : channels_out);
      PreciseBin<A> bin;
      bin.set(x1, y1, x2, y2, spatial_scale, p.i, p.j, ph, pw, height, width);
      if (!(bin.area > A(0))) continue;
      const A grad = to_acc(grad_output[go_st.at(p.k, p.c, p.i, p.j)]);
      const A coeff = grad / bin.area;
      const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
      const index_t g_plane = (index_t)b * gi_s0 + (index_t)c_in * gi_s1;
      const T* plane = input + (index_t)b * in_s0 + (index_t)c_in * in_s1;
      // moments along xs, xe, ys, ye: sum F Wy start_moment_x(w), ... (see TentSpan)
      A m_xs = 0, m_xe = 0, m_ys = 0, m_ye = 0;
      for (int wc = bin.w_lo; wc <= bin.w_hi; wc += kColumns) {
        A wx[kColumns], mx_s[kColumns], mx_e[kColumns];
        bin.column_spans(wc, wx, mx_s, mx_e);
        for (int h = bin.h_lo; h <= bin.h_hi; ++h) {
          const TentSpan<A> sy = bin.template span_y<true>(h);
          const A wy = sy.weight;
          const index_t g_row = g_plane + h * gi_s2;
          const T* row = plane + h * in_s2;
#pragma unroll
          for (int t = 0; t < kColumns; ++t) {
            if (wc + t > bin.w_hi) continue;
            sink.add(g_row + (wc + t) * gi_s3, coeff * wy * wx[t]);
            if (want_coords) {
              const A f = to_acc(row[(wc + t) * in_s3]);
              const A fwy = f * wy, fwx = f * wx[t];
              m_xs += fwy * mx_s[t];
              m_xe += fwy * mx_e[t];
              m_ys += fwx * sy.start_moment;
              m_ye += fwx * sy.end_moment;
            }
          }
        }
      }
      if (want_coords) {
        A d[4];
        bin.box_gradient(m_xs, m_xe, m_ys, m_ye, p.i, p.j, ph, pw, grad * spatial_scale, d);
        g_x1 += d[0];
        g_y1 += d[1];
        g_x2 += d[2];
        g_y2 += d[3];
      }
    }
    if (want_coords) {
      g_x1 = block_sum(g_x1, scratch);
      g_y1 = block_sum(g_y1, scratch);
      g_x2 = block_sum(g_x2, scratch);
      g_y2 = block_sum(g_y2, scratch);
      if (threadIdx.x == 0 && sink.fixed) {
        A* r = grad_rois + blk * 4;
        r[0] = g_x1; r[1] = g_y1; r[2] = g_x2; r[3] = g_y2;
      } else if (threadIdx.x == 0) {
        A* r = grad_rois + k * 5;
        atomicAdd(r + 1, g_x1); atomicAdd(r + 2, g_y1);
        atomicAdd(r + 3, g_x2); atomicAdd(r + 4, g_y2);
      }
    }
  }
}

// The warp mode of plain PrRoIPool's backward (warp_precise_backward): a
// warp per RoI and channels_per_warp channels in the order of channel_block.
// grad_input and grad_rois as in prroi_pool_backward, but the deterministic
// coordinate sums go per warp: grad_rois is then a zero-filled
// [K * groups, 4] buffer, groups = channels_out / channels_per_warp, for
// prroi_pool_coords_sum. grad_rois null: the feature gradient alone (the
// launcher passes it for the deterministic backward alone, as above).
// At most 64 registers (4 blocks of 256 threads an SM): left free it took 128
// and ran latency-bound at a quarter of the warps; capped it spills a little
// to L1 and measured faster (H200, benchmarks/NOTES.md, session 15).
template <typename T, bool PS>
__global__ void __launch_bounds__(kBlockThreads, 4) prroi_pool_backward_warp(
    const T* __restrict__ grad_output, index_t go_s0, index_t go_s1, index_t go_s2, index_t go_s3,
    const T* __restrict__ input, int batch, int height, int width,
    index_t in_s0, index_t in_s1, index_t in_s2, index_t in_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw, typename acc_type<T>::type spatial_scale,
    int channel_block, int channels_per_warp,
    void* __restrict__ grad_input, index_t gi_s0, index_t gi_s1, index_t gi_s2, index_t gi_s3,
    const T* __restrict__ max_grad, typename acc_type<T>::type* __restrict__ grad_rois) {
  typedef typename acc_type<T>::type A;
  const GradSink<A> sink(grad_input, max_grad, gradient_contributions(num_rois, ph, pw, PS));
  const Strides4 go_st = make_strides(go_s0, go_s1, go_s2, go_s3);
  const bool want_coords = grad_rois != nullptr;
  for_each_warp_roi(rois, num_rois, batch, channels_out, channel_block, channels_per_warp, nullptr,
                    [&](const BinPos& p, int b, A x1, A y1, A x2, A y2) {
    PreciseBin<A> roi;
    roi.set_roi(x1, y1, x2, y2, spatial_scale, ph, pw);
    if (!(roi.area > A(0))) return;
    A m[4] = {A(0), A(0), A(0), A(0)};
    // two instances: the scatter alone (the common case: float atomics take
    // the coordinate gradients in prroi_pool_coords) is not held to the
    // registers and spills of the coordinate sums
    const index_t g_plane = (index_t)b * gi_s0 + (index_t)p.c * gi_s1;
    const T* plane = input + (index_t)b * in_s0 + (index_t)p.c * in_s1;
    const T* grad = grad_output + go_st.at(p.k, p.c, 0, 0);
    if (!want_coords) {
      warp_precise_backward<false>(sink, g_plane, gi_s1, gi_s2, gi_s3, plane, in_s1, in_s2, in_s3, height, width,
                                   roi, ph, pw, grad, go_s1, go_s2, go_s3, channels_per_warp, m);
      return;
    }
    warp_precise_backward<true>(sink, g_plane, gi_s1, gi_s2, gi_s3, plane, in_s1, in_s2, in_s3, height, width,
                                roi, ph, pw, grad, go_s1, go_s2, go_s3, channels_per_warp, m);
#pragma unroll
    for (int e = 0; e < 4; ++e) m[e] = warp_sum(m[e]);
    if ((threadIdx.x & 31) != 0) return;
    const A sx = spatial_scale / roi.bin_w, sy = spatial_scale / roi.bin_h;
    const A g[4] = {m[0] * sx, m[1] * sy, m[2] * sx, m[3] * sy};
    if (sink.fixed) {
      A* r = grad_rois + (p.k * (channels_out / channels_per_warp) + p.c / channels_per_warp) * 4;
#pragma unroll
      for (int e = 0; e < 4; ++e) r[e] = g[e];
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) atomicAdd(grad_rois + p.k * 5 + 1 + e, g[e]);
    }
  });
}

// The box-coordinate gradients alone, with float atomics: a thread per bin
// and CPT output channels in the forward's work order (channel_block, so the
// threads running together read planes L2 holds), reading the bin's cells
// as the forward does and weighing them by the tents' edge moments. Runs of
// a warp's lanes on one RoI sum by shuffles; each run adds its four sums to
// grad_rois[k, 1..4] (a zero-filled [K, 5] accumulation buffer). The
// backward kernels above then scatter the feature gradient alone, in an
// instance free of the coordinate sums' registers. Joined with the scatter
// the sums cost more than a separate pass over the forward's reads (H200,
// benchmarks/NOTES.md, session 18); the deterministic backward keeps them
// there, where their order is fixed.
template <typename T, bool PS, int CPT = 1>
__global__ void prroi_pool_coords(
    const T* __restrict__ grad_output, index_t go_s0, index_t go_s1, index_t go_s2, index_t go_s3,
    const T* __restrict__ input, int batch, int height, int width,
    index_t in_s0, index_t in_s1, index_t in_s2, index_t in_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw, typename acc_type<T>::type spatial_scale,
    int channel_block, typename acc_type<T>::type* __restrict__ grad_rois) {
  typedef typename acc_type<T>::type A;
  const Strides4 go_st = make_strides(go_s0, go_s1, go_s2, go_s3);
  const index_t total = num_rois * (channels_out / CPT) * ph * pw;
  const int lane = threadIdx.x & 31;
  // whole warps go round the loop together: run_sums shuffles over all lanes
  for (index_t base = (index_t)blockIdx.x * blockDim.x + threadIdx.x - lane; base < total;
       base += (index_t)blockDim.x * gridDim.x) {
    const index_t idx = base + lane;
    long long key = -1;  // the RoI this lane adds to; -1: none
    A d[4] = {A(0), A(0), A(0), A(0)};
    int b; A x1, y1, x2, y2;
    BinPos p;
    if (idx < total) {
      p = decompose_group<CPT>(idx, num_rois, channels_out, ph, pw, channel_block);
      if (load_roi(rois, p.k, batch, b, x1, y1, x2, y2)) key = p.k;
    }
    if (key >= 0) {
      PreciseBin<A> bin;
      bin.set(x1, y1, x2, y2, spatial_scale, p.i, p.j, ph, pw, height, width);
      if (bin.area > A(0)) {
        A g[CPT];
#pragma unroll
        for (int t = 0; t < CPT; ++t) g[t] = to_acc(grad_output[go_st.at(p.k, p.c + t, p.i, p.j)]);
        const int c_in = input_channel<PS>(p.c, p.i, p.j, ph, pw);
        const T* plane = input + (index_t)b * in_s0 + (index_t)c_in * in_s1;
        const index_t step = group_plane_step<PS>(in_s1, ph, pw);
        A m[4];
        if (in_s3 == 1) bin_moments<CPT, T, A, true>(plane, step, in_s2, 1, bin, g, m);
        else bin_moments<CPT, T, A, false>(plane, step, in_s2, in_s3, bin, g, m);
        bin.box_gradient(m[0], m[1], m[2], m[3], p.i, p.j, ph, pw, spatial_scale, d);
      }
    }
    if (run_sums(key, d) && key >= 0) {
#pragma unroll
      for (int e = 0; e < 4; ++e) atomicAdd(grad_rois + key * 5 + 1 + e, d[e]);
    }
  }
}

// The deterministic backward's coordinate gradients: grad_rois[k, 1 + e] +=
// the sum over chunks of partials[(k * chunks_per_roi + chunk) * 4 + e], in
// chunk order. partials must be zero-filled (blocks of invalid RoIs skip it).
template <typename T, bool PS>
__global__ void prroi_pool_coords_sum(
    const typename acc_type<T>::type* __restrict__ partials, index_t num_rois, int chunks_per_roi,
    typename acc_type<T>::type* __restrict__ grad_rois) {
  typedef typename acc_type<T>::type A;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < num_rois * 4;
       idx += (index_t)blockDim.x * gridDim.x) {
    const index_t k = idx / 4;
    const int e = (int)(idx % 4);
    A sum = 0;
    for (int chunk = 0; chunk < chunks_per_roi; ++chunk) sum += partials[(k * chunks_per_roi + chunk) * 4 + e];
    grad_rois[k * 5 + 1 + e] += sum;
  }
}
