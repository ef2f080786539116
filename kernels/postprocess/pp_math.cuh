/* Arithmetic shared by the CUDA kernels and their host twins (__host__ __device__ when built by nvcc).
 * Plain C++ otherwise, so the host library builds from the same code without the CUDA toolkit.
 */
#ifndef EDGEAD_PP_MATH_CUH
#define EDGEAD_PP_MATH_CUH

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define EDGEAD_HD __host__ __device__ __forceinline__
#else
#define EDGEAD_HD inline
#endif

namespace edgead_pp {

/* IEEE binary16 bits -> float. On the device this is the hardware conversion; on the host a bit-exact
 * software version (every binary16 value, subnormals, infinities and NaN, is exactly representable). */
EDGEAD_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1Fu) {                     /* inf / NaN */
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {                  /* normal */
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {                  /* +-0 */
    bits = sign;
  } else {                                /* subnormal: renormalise */
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    man &= 0x3FFu;
    bits = sign | (exp << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

/* Load element i of a FP32 or FP16 (given as raw uint16 bits) array as float. */
EDGEAD_HD float load_as_float(const float* p, int64_t i) { return p[i]; }
EDGEAD_HD float load_as_float(const uint16_t* p, int64_t i) { return half_bits_to_float(p[i]); }

/* One channel's contribution to both maps: (t - s_local)^2 and (a - s_global)^2, accumulated in fp32. */
EDGEAD_HD void accumulate_sq(float t, float s_local, float a, float s_global, float& acc_local, float& acc_global) {
  const float dl = t - s_local;
  const float dg = a - s_global;
  acc_local += dl * dl;
  acc_global += dg * dg;
}

/* Constants of the two quantile affines, x' = (x - qa) * scale with scale = 0.1 / (qb - qa). */
struct Affine2 {
  float qa_st, scale_st, qa_ae, scale_ae;
};

/* Merged normalised value of one pixel from the channel sums (mean = sum / c). */
EDGEAD_HD float merge_pixel(float sum_local, float sum_global, float inv_c, const Affine2& q) {
  const float local = sum_local * inv_c;
  const float glob = sum_global * inv_c;
  return 0.5f * ((local - q.qa_st) * q.scale_st) + 0.5f * ((glob - q.qa_ae) * q.scale_ae);
}

/* Bilinear source coordinate along one axis, half-pixel centres, clamped at 0 (cv2.INTER_LINEAR). */
struct AxisTap {
  int i0, i1;
  float frac;
};

EDGEAD_HD AxisTap axis_tap(int o, int in_size, int out_size) {
  const float scale = (float)in_size / (float)out_size;
  float src = ((float)o + 0.5f) * scale - 0.5f;
  if (src < 0.0f) src = 0.0f;
  int i0 = (int)src; /* floor: src >= 0 */
  if (i0 > in_size - 1) i0 = in_size - 1;
  const int i1 = i0 + 1 < in_size ? i0 + 1 : in_size - 1;
  AxisTap tap;
  tap.i0 = i0;
  tap.i1 = i1;
  tap.frac = src - (float)i0;
  return tap;
}

/* Bilinear sample of one (h,w) plane at the output pixel (oy, ox). */
EDGEAD_HD float bilinear(const float* plane, int w, const AxisTap& ty, const AxisTap& tx) {
  const float v00 = plane[(int64_t)ty.i0 * w + tx.i0];
  const float v01 = plane[(int64_t)ty.i0 * w + tx.i1];
  const float v10 = plane[(int64_t)ty.i1 * w + tx.i0];
  const float v11 = plane[(int64_t)ty.i1 * w + tx.i1];
  const float top = v00 * (1.0f - tx.frac) + v01 * tx.frac;
  const float bottom = v10 * (1.0f - tx.frac) + v11 * tx.frac;
  return top * (1.0f - ty.frac) + bottom * ty.frac;
}

/* Order-preserving map float -> uint32 (a < b  <=>  key(a) < key(b), negatives included), so that a
 * per-image max can use atomicMax on unsigned ints. key 0 is below every non-NaN float. */
EDGEAD_HD uint32_t float_to_ordered(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

EDGEAD_HD float ordered_to_float(uint32_t k) {
  const uint32_t b = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
}

/* Key used for the per-image max: NaN (any sign) is the largest key, so a NaN map gives a NaN score
 * on the host and the device alike (as numpy's max does). */
EDGEAD_HD uint32_t score_key(float v) { return v != v ? 0xFFFFFFFFu : float_to_ordered(v); }

/* Edge padding: the border element (y, x) of the padded map copies the seen element nearest to it,
 * at (clamp(y, pad, pad+h-1), clamp(x, pad, pad+w-1)) in padded coordinates. */
EDGEAD_HD int clamp_index(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* Position (y, x) in the padded (h+2p, w+2p) map of the j-th border element (0 <= j < border_count). */
EDGEAD_HD int64_t border_count(int h, int w, int pad) {
  return (int64_t)(h + 2 * pad) * (w + 2 * pad) - (int64_t)h * w;
}

EDGEAD_HD void border_position(int64_t j, int h, int w, int pad, int& y, int& x) {
  const int64_t wp = w + 2 * pad;
  const int64_t band = (int64_t)pad * wp;
  if (j < band) {                /* top rows */
    y = (int)(j / wp);
    x = (int)(j % wp);
  } else if (j < 2 * band) {     /* bottom rows */
    j -= band;
    y = pad + h + (int)(j / wp);
    x = (int)(j % wp);
  } else {                       /* left and right strips of the middle rows */
    j -= 2 * band;
    const int64_t row = j / (2 * pad);
    const int col = (int)(j % (2 * pad));
    y = pad + (int)row;
    x = col < pad ? col : w + col;
  }
}

}  // namespace edgead_pp

#endif /* EDGEAD_PP_MATH_CUH */
