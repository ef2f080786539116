"""Small driver for compute-sanitizer (memcheck, racecheck): runs the CUDA kernels on exact-size
allocations (CuPy's memory pool is disabled so that every buffer is its own cudaMalloc and an
out-of-bounds access is reported) and checks the results against the NumPy reference.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 kernels/postprocess/sanitize_driver.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "sdk"))

from edgead import kernels  # noqa: E402
from edgead.postprocess import EfficientADPost, QuantileAffine, efficientad_postprocess, resize_bilinear  # noqa: E402

CASES = [  # (n, c, h, w, pad, dtype, out_size)
    (1, 384, 56, 56, 4, np.float16, (97, 131)),
    (2, 384, 64, 64, 0, np.float32, (256, 256)),
    (16, 16, 9, 7, 4, np.float32, (13, 11)),
    (3, 5, 1, 1, 2, np.float16, (3, 4)),
    (1, 3, 33, 1, 0, np.float32, (1, 1)),
]


def main() -> int:
    import cupy as cp

    cp.cuda.set_allocator(None)  # exact cudaMalloc per array: memcheck sees every overrun
    lib = kernels.load_library("cuda")
    stream = cp.cuda.Stream(non_blocking=True)
    failures = 0
    for n, c, h, w, pad, dtype, out in CASES:
        rng = np.random.default_rng(n * 1000 + c)
        t = rng.normal(0.3, 1.0, (n, c, h, w)).astype(dtype)
        s = rng.normal(-0.2, 1.0, (n, 2 * c, h, w)).astype(dtype)
        a = rng.normal(0.1, 0.8, (n, c, h, w)).astype(dtype)
        post = EfficientADPost(QuantileAffine(0.5, 4.0), QuantileAffine(0.4, 3.0), pad=pad)
        with stream:
            dt, ds, da = cp.asarray(t), cp.asarray(s), cp.asarray(a)
            dm = cp.empty((n, h + 2 * pad, w + 2 * pad), cp.float32)
            dsc = cp.empty((n,), cp.float32)
            dr = cp.empty((n, *out), cp.float32)
            kernels.device_postprocess(dt.data.ptr, ds.data.ptr, da.data.ptr, dtype="fp16" if dtype == np.float16 else "fp32", shape=(n, c, h, w),
                                       post=post, map_out=dm.data.ptr, score_out=dsc.data.ptr, stream=stream.ptr, library=lib)
            kernels.device_resize(dm.data.ptr, dm.shape, dr.data.ptr, out, stream=stream.ptr, library=lib)
        stream.synchronize()
        ref_m, ref_s = efficientad_postprocess(t, s, a, post)
        ref_r = resize_bilinear(ref_m, *out)
        scale = float(np.abs(ref_m).max())
        errs = [float(np.abs(cp.asnumpy(x) - r).max()) / max(scale, 1e-30) for x, r in ((dm, ref_m), (dsc, ref_s), (dr, ref_r))]
        ok = max(errs) <= 1e-5
        failures += not ok
        print(f"case n={n} c={c} h={h} w={w} pad={pad} {np.dtype(dtype).name} -> {out}: rel err map/score/resize {errs} {'OK' if ok else 'FAIL'}")
    print("sanitize_driver:", "PASS" if failures == 0 else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
