/* Internal helpers shared by pp_host.cpp and pp_cuda.cu (argument checks, error state). Not installed. */
#ifndef EDGEAD_PP_INTERNAL_H
#define EDGEAD_PP_INTERNAL_H

#include "edgead_pp.h"
#include "pp_math.cuh"

namespace edgead_pp {

/* Record a failure for edgead_pp_last_error() on this thread and return `code`. */
int fail(int code, const char* fmt, ...);
/* Clear the last error (called on entry of every public function). */
void clear_error();

/* Checks shared by the CUDA and host entry points; on success fills `q` and returns EDGEAD_PP_OK. */
int check_efficientad_args(const void* t, const void* s, const void* a, int dtype, int n, int c, int h, int w, double qa_st, double qb_st,
                           double qa_ae, double qb_ae, int pad, const float* map_out, const float* score_out, Affine2* q);
int check_resize_args(const float* in, int n, int h, int w, const float* out, int oh, int ow);

}  // namespace edgead_pp

#endif
