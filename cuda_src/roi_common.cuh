// Device helpers shared by every RoI pooling kernel family.
// The kernel loader inlines this header into each .cu source before compiling,
// so CuPy's on-disk cache (keyed by source text) sees edits made here.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cupy_roi {

typedef long long index_t;

// Half types accumulate in float; double stays double.
template <typename T> struct acc_type { typedef float type; };
template <> struct acc_type<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// v * s rounded on its own, never fused into a following add: an FMA keeps
// the product's rounding error, so that x2 * s - x1 * s of two equal
// coordinates would give a sliver instead of an empty box.
__device__ __forceinline__ float scaled(float v, float s) { return __fmul_rn(v, s); }
__device__ __forceinline__ double scaled(double v, double s) { return __dmul_rn(v, s); }

// a * b + c rounded once. Written out, never left to the compiler's
// contraction, where one value is formed in several code paths (one or
// several channels per thread) that must agree to the bit: the compiler
// contracts each instantiation its own way.
__device__ __forceinline__ float fused(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fused(double a, double b, double c) { return __fma_rn(a, b, c); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// 16-byte vectors: the elements one holds (1: no vector path for the type).
// A warp whose lanes take consecutive 16-byte pieces of a channels-last
// corner reads 512 contiguous bytes an instruction; the same channels read
// element by element cost L1 one pass per element (benchmarks/NOTES.md,
// session 20).
template <typename T> struct vector_width { static constexpr int value = 1; };
template <> struct vector_width<float> { static constexpr int value = 4; };
template <> struct vector_width<__half> { static constexpr int value = 8; };
template <> struct vector_width<__nv_bfloat16> { static constexpr int value = 8; };

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15) == 0;
}

// The half types' element pairs, and their conversions from and to float2
// (each element rounded as store() rounds it).
template <typename T> struct half_pair;
template <> struct half_pair<__half> { typedef __half2 type; };
template <> struct half_pair<__nv_bfloat16> { typedef __nv_bfloat162 type; };
__device__ __forceinline__ float2 widen(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float2 widen(__nv_bfloat162 h) { return __bfloat1622float2(h); }
__device__ __forceinline__ void narrow(float a, float b, __half2& h) { h = __floats2half2_rn(a, b); }
__device__ __forceinline__ void narrow(float a, float b, __nv_bfloat162& h) { h = __floats2bfloat162_rn(a, b); }

// The 16 bytes at p (16-byte aligned), widened to the accumulation type.
__device__ __forceinline__ void load_vector(const float* p, float (&v)[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
template <typename T>  // __half, __nv_bfloat16
__device__ __forceinline__ void load_vector(const T* p, float (&v)[8]) {
  const uint4 q = *reinterpret_cast<const uint4*>(p);
  const unsigned u[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = widen(*reinterpret_cast<const typename half_pair<T>::type*>(&u[k]));
    v[2 * k] = f.x; v[2 * k + 1] = f.y;
  }
}

// v rounded to T (as store() rounds each element) into the 16 bytes at p.
__device__ __forceinline__ void store_vector(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
template <typename T>  // __half, __nv_bfloat16
__device__ __forceinline__ void store_vector(T* p, const float* v) {
  unsigned u[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    typename half_pair<T>::type h;
    narrow(v[2 * k], v[2 * k + 1], h);
    u[k] = *reinterpret_cast<const unsigned*>(&h);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(u[0], u[1], u[2], u[3]);
}

// Strides (in elements) of a 4-d array; lets every kernel read NCHW,
// channels_last and arbitrary views without a copy.
struct Strides4 {
  index_t s0, s1, s2, s3;
  __device__ __forceinline__ index_t at(index_t a, index_t b, index_t c, index_t d) const {
    return a * s0 + b * s1 + c * s2 + d * s3;
  }
};

__device__ __forceinline__ Strides4 make_strides(index_t s0, index_t s1, index_t s2, index_t s3) {
  Strides4 s; s.s0 = s0; s.s1 = s1; s.s2 = s2; s.s3 = s3; return s;
}

// Which output element (k, c, i, j) thread idx of a flat-grid kernel works
// on, by the launch's channel_block B:
//   B = 0: channels fastest, (k, i, j, c): consecutive threads read
//          consecutive channels, which is what makes channels_last coalesce;
//   B > 0: channel blocks, (c / B, k, c % B, i, j): the threads that run
//          together work on B channels for every RoI, so the B planes per
//          image they read (or, backward, add to) stay in L2 instead of being
//          fetched again from DRAM by RoIs of one image far apart in time.
//          B = C is the RoI-major (NCHW output) order. The host picks B so
//          that B planes of every image fit in a share of L2; a larger B
//          spreads a backward's atomics over more addresses. B divides C.
//   B < 0: channels fastest in blocks of -B, (c / -B, k, i, j, c % -B): a
//          channels-last map read -B channels at a time, so that the part
//          of an image the threads running together read stays in L2 where
//          the whole image would not (the RoIAlign forward).

// Where a forward kernel writes output element idx. Outputs the library
// allocates are dense NCHW or channels_last; where the work order is that
// layout's order the flat index is the offset, otherwise (channel blocks
// smaller than C, or any view the array API's out= gives) the four strided
// products.
struct OutputIndex {
  Strides4 st;
  bool dense;
  __device__ __forceinline__ OutputIndex(index_t s0, index_t s1, index_t s2, index_t s3, int channels, int ph,
                                         int pw, int channel_block) {
    st = make_strides(s0, s1, s2, s3);
    const index_t plane = (index_t)ph * pw, roi = plane * channels;
    dense = channel_block == 0        ? (s1 == 1 && s3 == channels && s2 == (index_t)pw * channels && s0 == roi)
          : channel_block == channels ? (s3 == 1 && s2 == pw && s1 == plane && s0 == roi)
                                      : false;
  }
  // CPT > 1: thread idx computes CPT channels (decompose_group), so idx is
  // no element's offset.
  template <int CPT = 1, typename P>
  __device__ __forceinline__ index_t at(index_t idx, const P& p) const {
    return CPT == 1 && dense ? idx : st.at(p.k, p.c, p.i, p.j);
  }
};

struct BinPos { index_t k; int c, i, j; };

// kBlocksLast: the kernel takes B < 0 (only RoIAlign's forward does; the
// branch cost every other kernel registers: PrRoIPool's forward 72 -> 80).
template <typename I, bool kBlocksLast>
__device__ __forceinline__ BinPos decompose_as(I idx, I num_rois, int channels, int ph, int pw, int channel_block) {
  BinPos p;
  const I H = (I)ph, W = (I)pw;
  if (channel_block == 0) {
    const I C = (I)channels;
    p.c = (int)(idx % C); idx /= C;
    p.j = (int)(idx % W); idx /= W;
    p.i = (int)(idx % H); p.k = (index_t)(idx / H);
  } else if (kBlocksLast && channel_block < 0) {
    const I B = (I)(-channel_block);
    const int c_low = (int)(idx % B); idx /= B;
    p.j = (int)(idx % W); idx /= W;
    p.i = (int)(idx % H); idx /= H;
    p.k = (index_t)(idx % num_rois);
    p.c = (int)(idx / num_rois) * -channel_block + c_low;
  } else {
    const I B = (I)channel_block;
    p.j = (int)(idx % W); idx /= W;
    p.i = (int)(idx % H); idx /= H;
    const int c_low = (int)(idx % B); idx /= B;
    p.k = (index_t)(idx % num_rois);
    p.c = (int)(idx / num_rois) * channel_block + c_low;
  }
  return p;
}

// 64-bit division is a long software routine, 32-bit a few instructions, and
// nearly every launch has fewer than 2^32 output elements.
template <bool kBlocksLast = false>
__device__ __forceinline__ BinPos decompose(index_t idx, index_t num_rois, int channels, int ph, int pw,
                                            int channel_block) {
  if (idx <= (index_t)0xffffffffu && num_rois <= (index_t)0xffffffffu)
    return decompose_as<unsigned, kBlocksLast>((unsigned)idx, (unsigned)num_rois, channels, ph, pw, channel_block);
  return decompose_as<unsigned long long, kBlocksLast>((unsigned long long)idx, (unsigned long long)num_rois,
                                                       channels, ph, pw, channel_block);
}

// Thread idx of a kernel that computes CPT output channels of one bin (a
// group): the bin's geometry, which costs more instructions than its reads,
// is then worked out once for CPT channels. Groups take the channels' place
// in the work order (C / CPT groups, blocks of |B| / CPT groups; the host makes
// C and B multiples of CPT); p.c is the group's first channel.
template <int CPT, bool kBlocksLast = false>
__device__ __forceinline__ BinPos decompose_group(index_t idx, index_t num_rois, int channels, int ph, int pw,
                                                  int channel_block) {
  BinPos p = decompose<kBlocksLast>(idx, num_rois, channels / CPT, ph, pw, channel_block / CPT);
  p.c *= CPT;
  return p;
}

// Position-sensitive pooling reads a different input channel for every bin.
template <bool PS>
__device__ __forceinline__ int input_channel(int c_out, int i, int j, int ph, int pw) {
  return PS ? (c_out * ph + i) * pw + j : c_out;
}

// Input elements between the planes a group's channels read (s1: the
// channel stride): position-sensitive channel c + 1 reads the plane ph * pw
// after channel c's.
template <bool PS>
__device__ __forceinline__ index_t group_plane_step(index_t s1, int ph, int pw) {
  return PS ? s1 * ph * pw : s1;
}

// A RoI row is (batch_index, x1, y1, x2, y2), or (batch_index, cx, cy, w, h,
// theta) for rotated boxes. Host code checks RoI values only on request (the
// check synchronizes), so kernels must never read out of bounds: an invalid
// row (batch index outside [0, N) or fractional, a non-finite coordinate) is
// detected here; its outputs become NaN and it contributes no gradient.
template <int kCols, typename A>
__device__ __forceinline__ bool load_row(const A* rois, index_t k, int batch, int& b, A* v) {
  const A* r = rois + k * kCols;
  const A bf = r[0];
  bool ok = bf >= A(0) && bf < A(batch) && bf == floor(bf);
#pragma unroll
  for (int i = 0; i < kCols - 1; ++i) {
    v[i] = r[i + 1];
    ok = ok && isfinite(v[i]);
  }
  b = ok ? (int)bf : -1;
  return ok;
}

template <typename A>
__device__ __forceinline__ bool load_roi(const A* rois, index_t k, int batch, int& b, A& x1, A& y1, A& x2, A& y2) {
  A v[4];
  const bool ok = load_row<5>(rois, k, batch, b, v);
  x1 = v[0]; y1 = v[1]; x2 = v[2]; y2 = v[3];
  return ok;
}

template <typename A> __device__ __forceinline__ A quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }
template <typename A> __device__ __forceinline__ A negative_infinity();
template <> __device__ __forceinline__ float negative_infinity<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double negative_infinity<double>() { return __longlong_as_double(0xfff0000000000000LL); }

// Where a backward kernel adds its contributions to an input gradient.
//
// Default: float atomics into an accumulation-type buffer. Fast, but atomics
// land in whatever order the threads reach them, so the last bits of a sum
// change from run to run.
//
// Deterministic (a bound is given): each contribution is rounded to a
// fixed-point integer with 2^shift units per gradient unit and added with a
// 64-bit integer atomic into a long long buffer. Integer addition is
// associative, so every order gives the same bits. No element's running sum
// can exceed M = max|grad_output| * contributions, where contributions is the
// most output bins that can reach one input element (K * ph * pw, or K for
// position-sensitive pooling: each bin hands out at most its own gradient, as
// its weights sum to at most 1). shift puts M just under 2^62, so no sum
// overflows; each rounding errs by at most 2^-(shift + 1) <= M * 2^-62.
// fixed_point_gradient turns the buffer back into floating point.
__device__ __forceinline__ int fixed_point_shift(double max_grad, double contributions) {
  int e = 0;
  frexp(max_grad * contributions, &e);  // M < 2^e
  // Clamped so that 2^shift is a normal float: only absurd magnitudes lose bits.
  return min(max(62 - e, -126), 126);
}

__device__ __forceinline__ long long to_fixed(float v) { return __float2ll_rn(v); }
__device__ __forceinline__ long long to_fixed(double v) { return __double2ll_rn(v); }

// One vector atomic adding a to p[0] and b to p[1], where the hardware has
// vector atomics (sm_90): 8 bytes where p is 8-byte aligned, or, where p
// is 4 bytes past a 16-byte boundary and `spare` says p[-1] and p[2] are
// elements of the same buffer row, 16 bytes adding 0 to those two; false
// otherwise. An atomic add is one L2 operation on a 32-byte sector whatever
// its width, and backwards are bound by those operations.
__device__ __forceinline__ bool pair_atomic(float* p, float a, float b, bool spare = false) {
#if __CUDA_ARCH__ >= 900
  const unsigned long long address = reinterpret_cast<unsigned long long>(p);
  if ((address & 7) == 0) {
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
    return true;
  }
  if (spare && (address & 15) == 4) {
    atomicAdd(reinterpret_cast<float4*>(p - 1), make_float4(0.0f, a, b, 0.0f));
    return true;
  }
#endif
  return false;
}
__device__ __forceinline__ bool pair_atomic(double*, double, double, bool = false) { return false; }

// v[k] added to p[k], k < 4, where zeros need no add: one 16-byte atomic per
// aligned block the non-zero values meet (sm_90), which adds 0 to its other
// elements; those must lie in [lo, hi] (p[lo] .. p[hi]: the same buffer
// row). false (nothing added) where that or the hardware does not allow it.
__device__ __forceinline__ bool quad_atomic(float* p, const float (&v)[4], int lo, int hi) {
#if __CUDA_ARCH__ >= 900
  const unsigned long long address = reinterpret_cast<unsigned long long>(p);
  if ((address & 3) != 0) return false;
  const int o = (int)((address >> 2) & 3);  // p's slot in its 16-byte block
  // the blocks [-o, 3 - o] and [4 - o, 7 - o] relative to p, where values fall
  const bool first = v[0] != 0.0f || (o < 3 && v[1] != 0.0f) || (o < 2 && v[2] != 0.0f) || (o < 1 && v[3] != 0.0f);
  const bool second = o > 0 && ((o > 2 && v[1] != 0.0f) || (o > 1 && v[2] != 0.0f) || v[3] != 0.0f);
  if ((first && (-o < lo || 3 - o > hi)) || (second && (4 - o < lo || 7 - o > hi))) return false;
  // the value of block slot s (selects, not indexing, which would move v to local memory)
  const auto slot = [&](int s) {
    const int k = s - o;
    return k == 0 ? v[0] : k == 1 ? v[1] : k == 2 ? v[2] : k == 3 ? v[3] : 0.0f;
  };
  if (first) atomicAdd(reinterpret_cast<float4*>(p - o), make_float4(slot(0), slot(1), slot(2), slot(3)));
  if (second) atomicAdd(reinterpret_cast<float4*>(p - o + 4), make_float4(slot(4), slot(5), slot(6), slot(7)));
  return true;
#else
  return false;
#endif
}
__device__ __forceinline__ bool quad_atomic(double*, const double (&)[4], int, int) { return false; }

// v added to the n elements from p on: 16-byte vector atomics (sm_90) over
// the aligned middle, pairs and singles at the ends; false (nothing added)
// where the hardware has no vector atomics.
__device__ __forceinline__ bool run_atomic(float* p, int n, float v) {
#if __CUDA_ARCH__ >= 900
  if ((reinterpret_cast<unsigned long long>(p) & 3) != 0) return false;
  // up to the next 16-byte boundary
  if ((reinterpret_cast<unsigned long long>(p) & 4) != 0 && n > 0) { atomicAdd(p, v); ++p; --n; }
  if ((reinterpret_cast<unsigned long long>(p) & 8) != 0 && n >= 2) {
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(v, v));
    p += 2; n -= 2;
  }
  for (; n >= 4; p += 4, n -= 4) atomicAdd(reinterpret_cast<float4*>(p), make_float4(v, v, v, v));
  if (n >= 2) { atomicAdd(reinterpret_cast<float2*>(p), make_float2(v, v)); p += 2; n -= 2; }
  if (n > 0) atomicAdd(p, v);
  return true;
#else
  return false;
#endif
}
__device__ __forceinline__ bool run_atomic(double*, int, double) { return false; }

// v[e] added to p[e], e < 4, p 16-byte aligned: one 16-byte atomic (sm_90);
// false (nothing added) where the hardware has none.
__device__ __forceinline__ bool vector_atomic(float* p, const float (&v)[4]) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  return true;
#else
  return false;
#endif
}
__device__ __forceinline__ bool vector_atomic(double*, const double (&)[4]) { return false; }

template <typename A>
struct GradSink {
  void* base;
  A scale;
  bool fixed;

  // max_grad: device pointer to max|grad_output| (in grad_output's type: a
  // maximum is exact in any type), or null for float atomics.
  template <typename T>
  __device__ __forceinline__ GradSink(void* buffer, const T* max_grad, double contributions)
      : base(buffer), scale(A(1)), fixed(max_grad != nullptr) {
    if (fixed) scale = A(ldexp(1.0, fixed_point_shift((double)to_acc(max_grad[0]), contributions)));
  }
  __device__ __forceinline__ GradSink<A> rebased(void* buffer) const {
    GradSink<A> s = *this;
    s.base = buffer;
    return s;
  }
  __device__ __forceinline__ void add(index_t at, A v) const {
    if (fixed)
      atomicAdd(static_cast<unsigned long long*>(base) + at, (unsigned long long)to_fixed(v * scale));
    else
      atomicAdd(static_cast<A*>(base) + at, v);
  }
  // Adds v0 to element at and v1 to element at + 1 (both in the buffer; with
  // spare, at - 1 and at + 2 too, in the same row): one vector atomic where
  // pair_atomic can, else two adds.
  __device__ __forceinline__ void add_pair(index_t at, A v0, A v1, bool spare = false) const {
    if (!fixed && pair_atomic(static_cast<A*>(base) + at, v0, v1, spare)) return;
    add(at, v0);
    add(at + 1, v1);
  }
  // Adds v[k] to element at + k, k < 4, where v[k] is not 0; the elements
  // at + lo .. at + hi are of the same buffer row (quad_atomic).
  __device__ __forceinline__ void add_quad(index_t at, const A (&v)[4], int lo, int hi) const {
    if (!fixed && quad_atomic(static_cast<A*>(base) + at, v, lo, hi)) return;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (v[k] != A(0)) add(at + k, v[k]);
  }
  // Adds v[e] to element at + e * step, e < 4: one 16-byte atomic where
  // `vector` says step is 1 and at 16-byte aligned and vector_atomic can.
  __device__ __forceinline__ void add_vector(index_t at, index_t step, const A (&v)[4], bool vector) const {
    if (vector && !fixed && vector_atomic(static_cast<A*>(base) + at, v)) return;
#pragma unroll
    for (int e = 0; e < 4; ++e) add(at + e * step, v[e]);
  }
  // Adds v to the n adjacent elements from at on: a quarter of the atomic
  // operations where run_atomic can.
  __device__ __forceinline__ void add_run(index_t at, int n, A v) const {
    if (!fixed && run_atomic(static_cast<A*>(base) + at, n, v)) return;
    for (int e = 0; e < n; ++e) add(at + e, v);
  }
};

// Threads a block of every launch (the host's _kernels.BLOCK); kernels that
// cap their registers with __launch_bounds__ name it.
constexpr int kBlockThreads = 256;

// Most output bins that can add to one input element (see GradSink).
__device__ __forceinline__ double gradient_contributions(index_t num_rois, int ph, int pw, bool ps) {
  return (double)num_rois * (ps ? 1.0 : (double)ph * pw);
}

// Warp-mode backwards (RoIAlign, PrRoIPool): a warp takes one RoI and up to
// kWarpChannels channels, its lanes 32 adjacent pixel columns. Bin weights
// of both are separable, Wy_i(r) * Wx_j(c), so a lane sums its column over
// the bins, T_i = sum_j grad_ij * Wx_j(col), and the warp then adds
// sum_i Wy_i(r) * T_i once per pixel row: one atomic instruction for 32
// adjacent pixels, where bin by bin the lanes hit scattered rows and every
// pixel again from each neighbouring bin (the backwards were bound by those
// L2 operations). RoIAlign's lanes hold every bin's column weight: at most
// kWarpBins bins per axis there (PrRoIPool's hold the few their column meets).
constexpr int kWarpBins = 16;
constexpr int kWarpChannels = 4;
constexpr int kWarpColumns = 32;

// The warp-mode grid: each warp in turn takes one RoI and channels_per_warp
// channels, in the order of channel_block (decompose) over groups of
// channels, the RoIs in the order `order` lists them (roi_image_order) where
// it is given, and runs body(p, b, x1, y1, x2, y2) on all its lanes for each
// valid RoI row (p.c: the group's first channel; b: the row's image).
template <typename A, typename Body>
__device__ __forceinline__ void for_each_warp_roi(const A* rois, index_t num_rois, int batch, int channels,
                                                  int channel_block, int channels_per_warp, const int* order,
                                                  Body body) {
  const index_t warps = num_rois * (channels / channels_per_warp);
  for (index_t w = ((index_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < warps;
       w += ((index_t)blockDim.x * gridDim.x) >> 5) {
    BinPos p = decompose(w, num_rois, channels / channels_per_warp, 1, 1, channel_block / channels_per_warp);
    p.c *= channels_per_warp;
    if (order) p.k = order[p.k];
    int b; A x1, y1, x2, y2;
    if (load_roi(rois, p.k, batch, b, x1, y1, x2, y2)) body(p, b, x1, y1, x2, y2);
  }
}

// A lane's per-row sums for its channels over a window of kRows pixel rows
// from base. Contributions arrive row by row; a row leaves (flush(row,
// sums)) once the window must move past it, and the rest at finish(). A
// window of 2 takes a sequence of bilinear samples (rows lo and lo + 1, lo
// never decreasing: RoIAlign), 3 the rows of consecutive bins (a bin's first
// rows are its predecessor's last two: PrRoIPool). Rows are the same for
// every lane of the warp, so its branches never diverge; zero weights add
// nothing (a NaN sum reaches only the rows its bin weighs). Any order stays
// exact: a row reached again after it left is added again.
template <typename A, int kRows>
struct RowRun {
  int base = -(1 << 30);
  A v[kRows][kWarpChannels];

  __device__ __forceinline__ RowRun() {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int t = 0; t < kWarpChannels; ++t) v[r][t] = A(0);
  }
  // Adds w * sum[t] to row `row`.
  template <typename Flush>
  __device__ __forceinline__ void add(int row, A w, const A (&sum)[kWarpChannels], Flush flush) {
    if (w == A(0)) return;
    const int at = place(row, row, flush);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (at == r) accumulate(r, w, sum);
  }
  // Adds w0 * sum[t] to row `row` and w1 * sum[t] to row + 1.
  template <typename Flush>
  __device__ __forceinline__ void add_pair(int row, A w0, A w1, const A (&sum)[kWarpChannels], Flush flush) {
    const int at = place(row, row + 1, flush);
#pragma unroll
    for (int r = 0; r + 1 < kRows; ++r)
      if (at == r) {
        if (w0 != A(0)) accumulate(r, w0, sum);
        if (w1 != A(0)) accumulate(r + 1, w1, sum);
      }
  }
  template <typename Flush>
  __device__ __forceinline__ void finish(Flush flush) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      flush(base + r, v[r]);
#pragma unroll
      for (int t = 0; t < kWarpChannels; ++t) v[r][t] = A(0);
    }
  }

 private:
  // Moves the window to hold rows first..last; returns first - base.
  template <typename Flush>
  __device__ __forceinline__ int place(int first, int last, Flush flush) {
    if (first < base || last - base >= 2 * kRows) {  // the first row, a jump back (inverted box), or a gap
      finish(flush);
      base = first;
    }
    while (last - base >= kRows) {
      flush(base, v[0]);
#pragma unroll
      for (int r = 0; r + 1 < kRows; ++r)
#pragma unroll
        for (int t = 0; t < kWarpChannels; ++t) v[r][t] = v[r + 1][t];
#pragma unroll
      for (int t = 0; t < kWarpChannels; ++t) v[kRows - 1][t] = A(0);
      ++base;
    }
    return first - base;
  }
  __device__ __forceinline__ void accumulate(int r, A w, const A (&sum)[kWarpChannels]) {
#pragma unroll
    for (int t = 0; t < kWarpChannels; ++t) v[r][t] = fused(w, sum[t], v[r][t]);
  }
};

// The flush of a warp-mode backward: adds a row's non-zero sums of the
// first `channels` channels at column (element offset of the lane's pixel in
// the first channel's plane, row 0), rows row_stride and channels
// plane_step apart.
template <typename A>
struct RowSink {
  const GradSink<A>& sink;
  index_t column, row_stride, plane_step;
  int channels;
  __device__ __forceinline__ void operator()(int row, const A (&v)[kWarpChannels]) const {
#pragma unroll
    for (int t = 0; t < kWarpChannels; ++t)
      if (t < channels && v[t] != A(0)) sink.add(column + t * plane_step + row * row_stride, v[t]);
  }
};

// Sum over a warp, in a fixed order (the deterministic backward's partial
// sums depend on it); the result is valid in lane 0 only.
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Maximum over a warp, valid in every lane.
template <typename V>
__device__ __forceinline__ V warp_max(V v) {
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Sum over a thread block; the result is valid in thread 0 only.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < warps) ? scratch[threadIdx.x] : A(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

}  // namespace cupy_roi

using namespace cupy_roi;

// A deterministic backward's fixed-point buffer (dense, in the order of the
// gradient's layout) as floating point: into out (the input's dtype, or the
// accumulation dtype with out_is_acc), added to what out holds with
// accumulate. num_rois, ph, pw and position_sensitive are the backward's.
// A non-finite max|grad_output| makes every element NaN: the integers cannot
// carry it.
template <typename T, bool PS>
__global__ void fixed_point_gradient(
    const long long* __restrict__ fixed, const T* __restrict__ max_grad,
    index_t num_rois, int ph, int pw, int position_sensitive,
    int batch, int channels, int height, int width, int channels_fastest,
    void* __restrict__ out, index_t out_s0, index_t out_s1, index_t out_s2, index_t out_s3,
    int out_is_acc, int accumulate) {
  typedef typename acc_type<T>::type A;
  const int channel_block = channels_fastest ? 0 : channels;
  const OutputIndex out_at(out_s0, out_s1, out_s2, out_s3, channels, height, width, channel_block);
  const double contributions = gradient_contributions(num_rois, ph, pw, position_sensitive != 0);
  const double bound = (double)to_acc(max_grad[0]) * contributions;
  const double unit = ldexp(1.0, -fixed_point_shift((double)to_acc(max_grad[0]), contributions));
  const bool finite = isfinite(bound);
  const index_t total = (index_t)batch * channels * height * width;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    // a dense output (what the torch ops allocate) needs no position
    const index_t at = out_at.dense ? idx : out_at.at(idx, decompose(idx, batch, channels, height, width, channel_block));
    A v = finite ? A((double)fixed[idx] * unit) : quiet_nan<A>();
    if (out_is_acc) {
      A* o = static_cast<A*>(out) + at;
      *o = accumulate ? *o + v : v;
    } else {
      T* o = static_cast<T*>(out) + at;
      store(o, accumulate ? to_acc(*o) + v : v);
    }
  }
}
