/* CUDA kernels of the fused EfficientAD post-processing (device pointers, asynchronous on a stream).
 *
 * fused_maps_kernel: one block = 32 consecutive pixels (flat index along h*w, so a warp reads 32
 * consecutive elements of one channel: coalesced in NCHW) x CG channel groups (threadIdx.y). Each
 * thread walks channels ty, ty+CG, ... reading T, S[:C], S[C:] and A once, accumulating both squared
 * differences in fp32; the CG partial sums are reduced in shared memory in a fixed order (deterministic),
 * the merged normalised value is written to the padded map, and the per-image max is reduced with
 * warp shuffles on order-preserving uint keys + one atomicMax per warp (negative values are handled
 * by the key mapping; see pp_math.cuh). A second kernel fills the border by edge padding (each border
 * element copies the nearest seen one; copies cannot change the max, so the score is the max of the seen
 * pixels). score_out is used as the uint key buffer (memset to 0 first) and decoded in place by a final
 * tiny kernel.
 */
#include <cuda_runtime.h>
#include <stdint.h>

#include "pp_internal.h"

namespace edgead_pp {

constexpr int kTile = 32;    /* pixels per block (one warp wide) */
constexpr int kGroups = 16;  /* channel groups per block -> 512 threads */

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const uint32_t o = __shfl_xor_sync(0xFFFFFFFFu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kTile* kGroups) fused_maps_kernel(const T* __restrict__ t, const T* __restrict__ s, const T* __restrict__ a, int c,
                                                                     int h, int w, int pad, Affine2 q, float* __restrict__ map_out,
                                                                     uint32_t* __restrict__ keys) {
  const int b = blockIdx.y;
  const int64_t hw = (int64_t)h * w;
  const int wp = w + 2 * pad;
  const int64_t plane_out = (int64_t)(h + 2 * pad) * wp;
  float* mb = map_out + (int64_t)b * plane_out;

  __shared__ float part_l[kGroups][kTile];
  __shared__ float part_g[kGroups][kTile];
  const int64_t i = (int64_t)blockIdx.x * kTile + threadIdx.x;
  float acc_l = 0.0f, acc_g = 0.0f;
  if (i < hw) {
    const T* tb = t + (int64_t)b * c * hw + i;
    const T* sb = s + (int64_t)b * 2 * c * hw + i;
    const T* ab = a + (int64_t)b * c * hw + i;
    const int64_t global_off = (int64_t)c * hw;
#pragma unroll 4
    for (int k = threadIdx.y; k < c; k += kGroups) {
      const int64_t off = (int64_t)k * hw;
      accumulate_sq(load_as_float(tb, off), load_as_float(sb, off), load_as_float(ab, off), load_as_float(sb, global_off + off), acc_l, acc_g);
    }
  }
  part_l[threadIdx.y][threadIdx.x] = acc_l;
  part_g[threadIdx.y][threadIdx.x] = acc_g;
  __syncthreads();
  if (threadIdx.y != 0) return;
  float sum_l = 0.0f, sum_g = 0.0f;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    sum_l += part_l[g][threadIdx.x];
    sum_g += part_g[g][threadIdx.x];
  }
  uint32_t key = 0u;
  if (i < hw) {
    const float v = merge_pixel(sum_l, sum_g, 1.0f / (float)c, q);
    const int y = (int)(i / w), x = (int)(i % w);
    mb[(int64_t)(y + pad) * wp + (x + pad)] = v;
    key = score_key(v);
  }
  key = warp_max_u32(key);
  if (threadIdx.x == 0) atomicMax(keys + b, key);
}

/* Edge padding of the (h+2p, w+2p) maps after fused_maps_kernel wrote their interiors (same stream). */
__global__ void edge_pad_kernel(float* __restrict__ map_out, int h, int w, int pad) {
  const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= border_count(h, w, pad)) return;
  const int wp = w + 2 * pad;
  float* mb = map_out + (int64_t)blockIdx.y * (h + 2 * pad) * wp;
  int y, x;
  border_position(j, h, w, pad, y, x);
  mb[(int64_t)y * wp + x] = mb[(int64_t)clamp_index(y, pad, pad + h - 1) * wp + clamp_index(x, pad, pad + w - 1)];
}

__global__ void decode_scores_kernel(uint32_t* keys, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) reinterpret_cast<float*>(keys)[i] = ordered_to_float(keys[i]);
}

__global__ void resize_kernel(const float* __restrict__ in, int n, int h, int w, float* __restrict__ out, int oh, int ow) {
  const int64_t total = (int64_t)n * oh * ow;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * blockDim.x) {
    const int x = (int)(idx % ow);
    const int64_t r = idx / ow;
    const int y = (int)(r % oh);
    const int b = (int)(r / oh);
    out[idx] = bilinear(in + (int64_t)b * h * w, w, axis_tap(y, h, oh), axis_tap(x, w, ow));
  }
}

static int cuda_fail(cudaError_t err, const char* where) {
  return fail(EDGEAD_PP_ERR_CUDA, "%s: %s (%s)", where, cudaGetErrorString(err), cudaGetErrorName(err));
}

}  // namespace edgead_pp

using namespace edgead_pp;

extern "C" {

const char* edgead_pp_cuda_archs(void) { return EDGEAD_PP_ARCHS; }

int edgead_pp_cuda_runtime_version(void) { return EDGEAD_PP_CUDART_VERSION; }

int edgead_pp_cuda_probe(int device) {
  clear_error();
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return cuda_fail(err, "cudaGetDeviceCount");
  if (device < 0 || device >= count) return fail(EDGEAD_PP_ERR_CUDA, "device %d: %d CUDA device(s) present", device, count);
  int current = 0;
  err = cudaGetDevice(&current);
  if (err != cudaSuccess) return cuda_fail(err, "cudaGetDevice");
  err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_fail(err, "cudaSetDevice");
  /* a kernel image for this GPU's architecture? (cudaErrorNoKernelImageForDevice otherwise) */
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, fused_maps_kernel<float>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, fused_maps_kernel<uint16_t>);
  cudaSetDevice(current);
  if (err != cudaSuccess) return cuda_fail(err, "cudaFuncGetAttributes(fused_maps_kernel)");
  return EDGEAD_PP_OK;
}

int edgead_pp_efficientad(const void* t, const void* s, const void* a, int dtype, int n, int c, int h, int w, double qa_st, double qb_st, double qa_ae,
                          double qb_ae, int pad, float* map_out, float* score_out, void* stream) {
  clear_error();
  Affine2 q;
  int rc = check_efficientad_args(t, s, a, dtype, n, c, h, w, qa_st, qb_st, qa_ae, qb_ae, pad, map_out, score_out, &q);
  if (rc != EDGEAD_PP_OK) return rc;
  if (n > 65535) return fail(EDGEAD_PP_ERR_SHAPE, "batch n=%d: the CUDA build supports at most 65535 images per call", n);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  uint32_t* keys = reinterpret_cast<uint32_t*>(score_out);
  cudaError_t err = cudaMemsetAsync(keys, 0, sizeof(uint32_t) * (size_t)n, st);
  if (err != cudaSuccess) return cuda_fail(err, "cudaMemsetAsync(score_out)");
  const int64_t hw = (int64_t)h * w;
  const int tiles = (int)((hw + kTile - 1) / kTile);
  const dim3 grid((unsigned)tiles, (unsigned)n);
  const dim3 block(kTile, kGroups);
  if (dtype == EDGEAD_PP_FP32)
    fused_maps_kernel<float><<<grid, block, 0, st>>>((const float*)t, (const float*)s, (const float*)a, c, h, w, pad, q, map_out, keys);
  else
    fused_maps_kernel<uint16_t>
        <<<grid, block, 0, st>>>((const uint16_t*)t, (const uint16_t*)s, (const uint16_t*)a, c, h, w, pad, q, map_out, keys);
  err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_fail(err, "fused_maps_kernel launch");
  if (pad > 0) {
    const int64_t border = border_count(h, w, pad);
    edge_pad_kernel<<<dim3((unsigned)((border + 255) / 256), (unsigned)n), 256, 0, st>>>(map_out, h, w, pad);
    err = cudaGetLastError();
    if (err != cudaSuccess) return cuda_fail(err, "edge_pad_kernel launch");
  }
  decode_scores_kernel<<<(n + 127) / 128, 128, 0, st>>>(keys, n);
  err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_fail(err, "decode_scores_kernel launch");
  return EDGEAD_PP_OK;
}

int edgead_pp_resize_bilinear(const float* in, int n, int h, int w, float* out, int oh, int ow, void* stream) {
  clear_error();
  const int rc = check_resize_args(in, n, h, w, out, oh, ow);
  if (rc != EDGEAD_PP_OK) return rc;
  const int64_t total = (int64_t)n * oh * ow;
  const int threads = 256;
  const int64_t blocks64 = (total + threads - 1) / threads;
  const unsigned blocks = (unsigned)(blocks64 < 65535 * 8 ? blocks64 : 65535 * 8);
  resize_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(in, n, h, w, out, oh, ow);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_fail(err, "resize_kernel launch");
  return EDGEAD_PP_OK;
}

}  // extern "C"
