/* EdgeAD fused EfficientAD post-processing: C ABI shared by the CUDA and the host build.
 *
 * Layout: teacher T (n,c,h,w), student S (n,2c,h,w), autoencoder A (n,c,h,w), NCHW contiguous,
 * dtype EDGEAD_PP_FP32 or EDGEAD_PP_FP16 (same codes as TensorRT's DataType FLOAT/HALF).
 * map_out: (n, h+2*pad, w+2*pad) float32, edge-padded (the border repeats the nearest computed pixel);
 * score_out: (n,) float32 = max of each map.
 * CUDA entry points take device pointers and a cudaStream_t passed as void* (NULL = legacy default
 * stream); they are asynchronous on that stream. Host twins take host pointers and no stream.
 * Every function returns EDGEAD_PP_OK (0) or an error code; edgead_pp_last_error() gives the
 * message of the last failure on the calling thread.
 */
#ifndef EDGEAD_PP_H
#define EDGEAD_PP_H

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define EDGEAD_PP_API __declspec(dllexport)
#else
#define EDGEAD_PP_API __attribute__((visibility("default")))
#endif

enum {
  EDGEAD_PP_FP32 = 0,
  EDGEAD_PP_FP16 = 1
};

enum {
  EDGEAD_PP_OK = 0,
  EDGEAD_PP_ERR_NULL = 1,     /* a required pointer is NULL */
  EDGEAD_PP_ERR_SHAPE = 2,    /* n, c, h, w, pad or output size out of range */
  EDGEAD_PP_ERR_DTYPE = 3,    /* dtype is not FP32/FP16 */
  EDGEAD_PP_ERR_VALUE = 4,    /* quantiles not finite or qb <= qa */
  EDGEAD_PP_ERR_CUDA = 5      /* a CUDA runtime call or kernel launch failed */
};

/* ABI version; bump when a signature or a result changes (2: edge padding instead of zeros; 3: double quantiles,
 * edgead_pp_cuda_probe). */
EDGEAD_PP_API int edgead_pp_version(void);
/* 1 for the CUDA build, 0 for the host build. */
EDGEAD_PP_API int edgead_pp_is_cuda(void);
/* Static description of an error code. */
EDGEAD_PP_API const char* edgead_pp_error_string(int code);
/* Detailed message of the last failure on this thread ("" if none). */
EDGEAD_PP_API const char* edgead_pp_last_error(void);

/* CUDA build: device pointers, asynchronous on `stream`. Host build: the same names are not exported. */
EDGEAD_PP_API int edgead_pp_efficientad(const void* t, const void* s, const void* a, int dtype, int n, int c, int h, int w,
                                        double qa_st, double qb_st, double qa_ae, double qb_ae, int pad,
                                        float* map_out, float* score_out, void* stream);
/* CUDA build: can the kernels run on `device`? Checks the device count (a driver older than the statically linked
 * runtime fails here with cudaErrorInsufficientDriver) and that the fused kernel has an image for the GPU's
 * architecture. EDGEAD_PP_OK or EDGEAD_PP_ERR_CUDA with the CUDA error name in edgead_pp_last_error(). */
EDGEAD_PP_API int edgead_pp_cuda_probe(int device);
/* CUDA build: the SM architectures it was compiled for, e.g. "86,87,89,90", and the CUDA runtime it links
 * statically (1000 * major + 10 * minor, as cudaRuntimeGetVersion), for `edgead doctor`. */
EDGEAD_PP_API const char* edgead_pp_cuda_archs(void);
EDGEAD_PP_API int edgead_pp_cuda_runtime_version(void);
EDGEAD_PP_API int edgead_pp_resize_bilinear(const float* in, int n, int h, int w, float* out, int oh, int ow, void* stream);

/* Host build (and also exported by the CUDA build): host pointers, synchronous. */
EDGEAD_PP_API int edgead_pp_efficientad_host(const void* t, const void* s, const void* a, int dtype, int n, int c, int h, int w,
                                             double qa_st, double qb_st, double qa_ae, double qb_ae, int pad,
                                             float* map_out, float* score_out);
EDGEAD_PP_API int edgead_pp_resize_bilinear_host(const float* in, int n, int h, int w, float* out, int oh, int ow);

#ifdef __cplusplus
}
#endif

#endif /* EDGEAD_PP_H */
