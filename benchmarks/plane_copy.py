"""How long a block of 1024 threads takes to copy a 200x272 float32 plane (Mask
R-CNN's) into shared memory: thread copies (cp.async, 16 bytes each) against one
bulk copy (cp.async.bulk through the copy engine, an mbarrier counting bytes), on
a tenth of the SMs, one wave, and 4096 blocks, with and without 30 us of work
after each copy (what roi_align_forward_plane's pooling does). Needs sm_90.
Session 25's numbers are in NOTES.md."""
import cupy as cp
import numpy as np

src = r'''
extern "C" __global__ void __launch_bounds__(1024, 1) copy_async(const float* in, float* out, int plane, int spin) {
  extern __shared__ __align__(16) unsigned char sm[];
  const float* src = in + (size_t)blockIdx.x * plane;
  for (int e = threadIdx.x; e < plane / 4; e += 1024) {
    unsigned at = (unsigned)__cvta_generic_to_shared(sm + 16 * e);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(at), "l"(src + 4 * e));
  }
  asm volatile("cp.async.wait_all;\n" ::);
  __syncthreads();
  float v = reinterpret_cast<float*>(sm)[(threadIdx.x * 37) % plane];
  long long t0 = clock64(); while (clock64() - t0 < spin) v = v * 0.999f + 1.0f;
  if (v == 12345.0f) out[blockIdx.x] = v;
}
extern "C" __global__ void __launch_bounds__(1024, 1) copy_bulk(const float* in, float* out, int plane, int spin) {
  extern __shared__ __align__(16) unsigned char sm[];
  __shared__ __align__(8) unsigned long long bar;
  const float* src = in + (size_t)blockIdx.x * plane;
  const unsigned b = (unsigned)__cvta_generic_to_shared(&bar);
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(b));
    asm volatile("fence.mbarrier_init.release.cluster;" ::);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned bytes = plane * 4, chunk = 32768;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(bytes));
    for (unsigned o = 0; o < bytes; o += chunk) {
      unsigned n = min(chunk, bytes - o);
      unsigned d = (unsigned)__cvta_generic_to_shared(sm + o);
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(d), "l"((const char*)src + o), "r"(n), "r"(b) : "memory");
    }
  }
  asm volatile("{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], 0;\n @!p bra W;\n}" ::"r"(b) : "memory");
  float v = reinterpret_cast<float*>(sm)[(threadIdx.x * 37) % plane];
  long long t0 = clock64(); while (clock64() - t0 < spin) v = v * 0.999f + 1.0f;
  if (v == 12345.0f) out[blockIdx.x] = v;
}
'''
mod = cp.RawModule(code=src, options=("-std=c++17", "--gpu-architecture=sm_90"))
plane = 200 * 272
nblocks = 4096
x = cp.random.rand(nblocks * plane, dtype=cp.float32)
out = cp.zeros(nblocks, cp.float32)
sms = cp.cuda.Device().attributes["MultiProcessorCount"]
clock = cp.cuda.runtime.getDeviceProperties(0)["clockRate"] * 1e3
print(f"{sms} SMs, clock {clock/1e9:.2f} GHz")
shared = plane * 4
for name in ("copy_async", "copy_bulk"):
    k = mod.get_function(name)
    k.max_dynamic_shared_size_bytes = shared
for spin_us in (0, 30):
    spin = int(spin_us * 1e-6 * clock)
    for blocks in (sms // 10, sms, nblocks):
        row = []
        for name in ("copy_async", "copy_bulk"):
            k = mod.get_function(name)
            args = (x, out, np.int32(plane), np.int32(spin))
            k((blocks,), (1024,), args, shared_mem=shared)
            s, e = cp.cuda.Event(), cp.cuda.Event()
            ts = []
            for _ in range(5):
                s.record(); k((blocks,), (1024,), args, shared_mem=shared); e.record(); e.synchronize()
                ts.append(cp.cuda.get_elapsed_time(s, e) * 1e3)
            t = min(ts)
            waves = -(-blocks // sms)
            row.append(f"{name} {t:8.1f} us ({(t - waves * spin_us) / waves:6.2f} us a wave beyond the spin)")
        print(f"spin {spin_us:2d} us, {blocks:5d} blocks: " + " | ".join(row))
