// Candidate for issue 14 (not used by the package; benchmarks/align_forward.py
// appends it to the library's roi_align.cu and times it against
// roi_align_forward): RoIAlign forward with CPT output channels per thread.
//
// After the channel-block work order the NCHW forward reads its map from DRAM
// about once and is bound by instructions (SM 83%): per output element, the
// index decomposition, the RoI load, the sampling grid and every sample's
// bilinear weights cost more than the four reads. Computed once for CPT
// channels they cost 1/CPT per element. With channels fastest (channels_last)
// the CPT values of a corner are adjacent: for float and CPT = 4 one 16-byte
// load reads them when the addresses allow it.

template <typename T, typename A, int CPT>
struct CornerReads {
  // sum[t] += w * plane[chan[t] + at] for the CPT channels
  __device__ __forceinline__ static void add(A* sum, const T* plane, const index_t* chan, index_t at, A w,
                                             bool) {
#pragma unroll
    for (int t = 0; t < CPT; ++t) sum[t] += w * to_acc(plane[chan[t] + at]);
  }
};

template <>
struct CornerReads<float, float, 4> {
  __device__ __forceinline__ static void add(float* sum, const float* plane, const index_t* chan, index_t at,
                                             float w, bool vector) {
    if (vector) {  // chan[t] = chan[0] + t, 16-byte aligned
      const float4 v = *reinterpret_cast<const float4*>(plane + chan[0] + at);
      sum[0] += w * v.x; sum[1] += w * v.y; sum[2] += w * v.z; sum[3] += w * v.w;
      return;
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) sum[t] += w * plane[chan[t] + at];
  }
};

template <typename T, bool PS, int CPT>
__global__ void roi_align_forward_cpt(
    const T* __restrict__ input, int batch, int height, int width,
    index_t in_s0, index_t in_s1, index_t in_s2, index_t in_s3,
    const typename acc_type<T>::type* __restrict__ rois, index_t num_rois,
    int channels_out, int ph, int pw,
    typename acc_type<T>::type spatial_scale, int sampling_ratio, int aligned,
    int channel_block,
    T* __restrict__ output, index_t out_s0, index_t out_s1, index_t out_s2, index_t out_s3) {
  typedef typename acc_type<T>::type A;
  // Groups of CPT channels take the channels' place in the work order.
  const int groups = (channels_out + CPT - 1) / CPT;
  // A block must divide the groups (channel blocks divide the channels, but
  // 21 channels in blocks of 7 are 11 groups of 2: blocks of 3 groups would
  // leave the last groups out).
  int group_block = channel_block == 0 ? 0 : max(channel_block / CPT, 1);
  while (group_block > 1 && groups % group_block) --group_block;
  const Strides4 out_st = make_strides(out_s0, out_s1, out_s2, out_s3);
  const index_t total = num_rois * groups * ph * pw;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (index_t)blockDim.x * gridDim.x) {
    const BinPos p = decompose(idx, num_rois, groups, ph, pw, group_block);
    const int c0 = p.c * CPT;
    A sum[CPT];
#pragma unroll
    for (int t = 0; t < CPT; ++t) sum[t] = A(0);
    int b; A x1, y1, x2, y2;
    if (load_roi(rois, p.k, batch, b, x1, y1, x2, y2)) {
      AlignGrid<A> g;
      g.set(x1, y1, x2, y2, spatial_scale, ph, pw, sampling_ratio, aligned != 0);
      const T* plane = input + (index_t)b * in_s0;
      index_t chan[CPT];
#pragma unroll
      for (int t = 0; t < CPT; ++t)  // a tail group repeats the last channel and stores nothing for it
        chan[t] = (index_t)input_channel<PS>(min(c0 + t, channels_out - 1), p.i, p.j, ph, pw) * in_s1;
      const bool vector = !PS && in_s1 == 1 && c0 + CPT <= channels_out && in_s2 % 4 == 0 && in_s3 % 4 == 0 &&
                          (reinterpret_cast<unsigned long long>(plane + chan[0]) & 15) == 0;
      for (int iy = 0; iy < g.grid_h; ++iy) {
        const A yy = g.sample_y(p.i, iy);
        for (int ix = 0; ix < g.grid_w; ++ix) {
          Bilinear<A> w;
          if (!w.set(yy, g.sample_x(p.j, ix), height, width)) continue;
          CornerReads<T, A, CPT>::add(sum, plane, chan, w.y0 * in_s2 + w.x0 * in_s3, w.w00, vector);
          CornerReads<T, A, CPT>::add(sum, plane, chan, w.y0 * in_s2 + w.x1 * in_s3, w.w01, vector);
          CornerReads<T, A, CPT>::add(sum, plane, chan, w.y1 * in_s2 + w.x0 * in_s3, w.w10, vector);
          CornerReads<T, A, CPT>::add(sum, plane, chan, w.y1 * in_s2 + w.x1 * in_s3, w.w11, vector);
        }
      }
#pragma unroll
      for (int t = 0; t < CPT; ++t) sum[t] *= g.inv_count;
    } else {
#pragma unroll
      for (int t = 0; t < CPT; ++t) sum[t] = quiet_nan<A>();
    }
#pragma unroll
    for (int t = 0; t < CPT; ++t)
      if (c0 + t < channels_out) store(output + out_st.at(p.k, c0 + t, p.i, p.j), sum[t]);
  }
}
