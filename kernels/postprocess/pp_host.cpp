/* Host twin of the fused EfficientAD post-processing, argument checks and error state.
 * Compiled into both libraries: libedgead_pp_host (alone) and libedgead_pp_cuda (with pp_cuda.cu).
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>

#include <vector>

#include "pp_internal.h"

namespace edgead_pp {

static thread_local char g_last_error[512] = "";

int fail(int code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_last_error, sizeof g_last_error, fmt, args);
  va_end(args);
  return code;
}

void clear_error() { g_last_error[0] = '\0'; }

static const int64_t kMaxElements = (int64_t)1 << 40;

int check_efficientad_args(const void* t, const void* s, const void* a, int dtype, int n, int c, int h, int w, double qa_st, double qb_st,
                           double qa_ae, double qb_ae, int pad, const float* map_out, const float* score_out, Affine2* q) {
  if (!t || !s || !a || !map_out || !score_out)
    return fail(EDGEAD_PP_ERR_NULL, "null pointer: teacher=%p student=%p ae=%p map_out=%p score_out=%p", t, s, a, (const void*)map_out,
                (const void*)score_out);
  if (dtype != EDGEAD_PP_FP32 && dtype != EDGEAD_PP_FP16)
    return fail(EDGEAD_PP_ERR_DTYPE, "dtype %d: expected %d (fp32) or %d (fp16)", dtype, EDGEAD_PP_FP32, EDGEAD_PP_FP16);
  if (n <= 0 || c <= 0 || h <= 0 || w <= 0)
    return fail(EDGEAD_PP_ERR_SHAPE, "shape n=%d c=%d h=%d w=%d: every dimension must be >= 1", n, c, h, w);
  if (pad < 0 || pad > 4096) return fail(EDGEAD_PP_ERR_SHAPE, "pad=%d: expected 0 <= pad <= 4096", pad);
  if ((int64_t)n * 2 * c * h * w > kMaxElements || (int64_t)(h + 2 * pad) * (w + 2 * pad) > ((int64_t)1 << 31))
    return fail(EDGEAD_PP_ERR_SHAPE, "shape n=%d c=%d h=%d w=%d pad=%d is too large", n, c, h, w, pad);
  if (!isfinite(qa_st) || !isfinite(qb_st) || !(qb_st > qa_st) || !isfinite(qa_ae) || !isfinite(qb_ae) || !(qb_ae > qa_ae))
    return fail(EDGEAD_PP_ERR_VALUE, "quantiles qa_st=%g qb_st=%g qa_ae=%g qb_ae=%g: expected finite values with qb > qa", qa_st, qb_st, qa_ae,
                qb_ae);
  /* the difference and the scale in double: qb - qa can be far below float resolution of qa (qa=1000, qb=1000.00003) */
  q->qa_st = (float)qa_st;
  q->scale_st = (float)(0.1 / (qb_st - qa_st));
  q->qa_ae = (float)qa_ae;
  q->scale_ae = (float)(0.1 / (qb_ae - qa_ae));
  return EDGEAD_PP_OK;
}

int check_resize_args(const float* in, int n, int h, int w, const float* out, int oh, int ow) {
  if (!in || !out) return fail(EDGEAD_PP_ERR_NULL, "null pointer: in=%p out=%p", (const void*)in, (const void*)out);
  if (n <= 0 || h <= 0 || w <= 0 || oh <= 0 || ow <= 0)
    return fail(EDGEAD_PP_ERR_SHAPE, "resize n=%d h=%d w=%d -> oh=%d ow=%d: every size must be >= 1", n, h, w, oh, ow);
  if ((int64_t)n * oh * ow > kMaxElements || (int64_t)oh * ow > ((int64_t)1 << 31))
    return fail(EDGEAD_PP_ERR_SHAPE, "resize output n=%d oh=%d ow=%d is too large", n, oh, ow);
  return EDGEAD_PP_OK;
}

/* Host fused pass: channels outer, pixels inner (contiguous), fp32 accumulators per pixel. */
template <typename T>
static void efficientad_host(const T* t, const T* s, const T* a, int n, int c, int h, int w, const Affine2& q, int pad, float* map_out,
                             float* score_out) {
  const int64_t hw = (int64_t)h * w;
  const int hp = h + 2 * pad, wp = w + 2 * pad;
  const float inv_c = 1.0f / (float)c;
  std::vector<float> acc_l((size_t)hw), acc_g((size_t)hw);
  for (int b = 0; b < n; ++b) {
    const T* tb = t + (int64_t)b * c * hw;
    const T* sb = s + (int64_t)b * 2 * c * hw;
    const T* ab = a + (int64_t)b * c * hw;
    for (int64_t i = 0; i < hw; ++i) acc_l[(size_t)i] = acc_g[(size_t)i] = 0.0f;
    for (int k = 0; k < c; ++k) {
      const int64_t off = (int64_t)k * hw, off_g = (int64_t)(c + k) * hw;
      for (int64_t i = 0; i < hw; ++i)
        accumulate_sq(load_as_float(tb, off + i), load_as_float(sb, off + i), load_as_float(ab, off + i), load_as_float(sb, off_g + i),
                      acc_l[(size_t)i], acc_g[(size_t)i]);
    }
    float* mb = map_out + (int64_t)b * hp * wp;
    uint32_t best = score_key(-INFINITY);
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        const float v = merge_pixel(acc_l[(size_t)y * w + x], acc_g[(size_t)y * w + x], inv_c, q);
        mb[(int64_t)(y + pad) * wp + (x + pad)] = v;
        const uint32_t key = score_key(v);
        if (key > best) best = key;
      }
    for (int64_t j = 0; j < border_count(h, w, pad); ++j) { /* edge padding, in the CUDA border order */
      int y, x;
      border_position(j, h, w, pad, y, x);
      mb[(int64_t)y * wp + x] = mb[(int64_t)clamp_index(y, pad, pad + h - 1) * wp + clamp_index(x, pad, pad + w - 1)];
    }
    score_out[b] = ordered_to_float(best);
  }
}

}  // namespace edgead_pp

using namespace edgead_pp;

extern "C" {

int edgead_pp_version(void) { return 3; }

int edgead_pp_is_cuda(void) {
#if defined(EDGEAD_PP_WITH_CUDA)
  return 1;
#else
  return 0;
#endif
}

const char* edgead_pp_error_string(int code) {
  switch (code) {
    case EDGEAD_PP_OK: return "ok";
    case EDGEAD_PP_ERR_NULL: return "null pointer";
    case EDGEAD_PP_ERR_SHAPE: return "invalid shape or size";
    case EDGEAD_PP_ERR_DTYPE: return "unsupported dtype";
    case EDGEAD_PP_ERR_VALUE: return "invalid quantile constants";
    case EDGEAD_PP_ERR_CUDA: return "CUDA error";
    default: return "unknown error code";
  }
}

const char* edgead_pp_last_error(void) { return g_last_error; }

int edgead_pp_efficientad_host(const void* t, const void* s, const void* a, int dtype, int n, int c, int h, int w, double qa_st, double qb_st,
                               double qa_ae, double qb_ae, int pad, float* map_out, float* score_out) {
  clear_error();
  Affine2 q;
  const int rc = check_efficientad_args(t, s, a, dtype, n, c, h, w, qa_st, qb_st, qa_ae, qb_ae, pad, map_out, score_out, &q);
  if (rc != EDGEAD_PP_OK) return rc;
  if (dtype == EDGEAD_PP_FP32)
    efficientad_host((const float*)t, (const float*)s, (const float*)a, n, c, h, w, q, pad, map_out, score_out);
  else
    efficientad_host((const uint16_t*)t, (const uint16_t*)s, (const uint16_t*)a, n, c, h, w, q, pad, map_out, score_out);
  return EDGEAD_PP_OK;
}

int edgead_pp_resize_bilinear_host(const float* in, int n, int h, int w, float* out, int oh, int ow) {
  clear_error();
  const int rc = check_resize_args(in, n, h, w, out, oh, ow);
  if (rc != EDGEAD_PP_OK) return rc;
  for (int b = 0; b < n; ++b) {
    const float* plane = in + (int64_t)b * h * w;
    float* ob = out + (int64_t)b * oh * ow;
    for (int y = 0; y < oh; ++y) {
      const AxisTap ty = axis_tap(y, h, oh);
      for (int x = 0; x < ow; ++x) ob[(int64_t)y * ow + x] = bilinear(plane, w, ty, axis_tap(x, w, ow));
    }
  }
  return EDGEAD_PP_OK;
}

}  // extern "C"
