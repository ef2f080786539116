"""``Detector``: load a bundle, pick a backend, turn frames into scores and anomaly maps.

The runtime never imports torch. ``backend="auto"`` picks TensorRT when TensorRT, cuda-python and a
GPU are present and the bundle has an engine for this GPU; otherwise ONNX Runtime. The choice and
the reason are logged once (INFO) and visible as ``.backend``, ``.precision``, ``.variant``.

Thread safety: one Detector may be shared by several threads. Pre- and post-processing run in the
calling thread; the backend run is serialised by a lock (one session / one CUDA stream per Detector).
For parallel inference on several cores, create one Detector per thread.

>>> with Detector("bundle", backend="onnxruntime", threads=2) as det:   # doctest: +SKIP
...     result = det.infer(cv2.imread("part.png"))
...     print(result.decision, result.score, result.anomaly_map.shape)
NG 0.83 (480, 640)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .backends.base import Backend, check_threads
from .backends.onnxruntime import OnnxRuntimeBackend
from .bundle import Bundle, load_bundle
from .errors import BackendError, ConfigError, InputError, MissingDependencyError, message
from .postprocess import efficientad_postprocess
from .preprocess import check_frame, prepare
from .registry import BACKENDS, COLORS, RUNTIME_PRECISIONS, check_choice
from .result import Result
from .tiling import Tiling

__all__ = ["Detector", "resize_map"]


def _evidence(e: dict) -> str:
    if "products" in e:  # a multi-product bundle: the evidence of each product
        return "; ".join(f"{name}: {_evidence(ev)}" for name, ev in e["products"].items())
    keys = ("score_rank_correlation", "delta_points", "dataset")
    return ", ".join(f"{k} {e[k]:.4g}" if isinstance(e.get(k), float) else f"{k} {e[k]}" for k in keys if k in e)

log = logging.getLogger(__name__)

_DEFAULT_CHUNK = 16
_ORT_VARIANT_ORDER = ("merged", "raw", "merged_int8")


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one (h, w) float32 map with half-pixel centres (same as ``postprocess.resize_bilinear``).

    >>> resize_map(np.ones((4, 4), np.float32), 8, 6).shape
    (8, 6)
    """
    if anomaly_map.shape == (height, width):
        return np.ascontiguousarray(anomaly_map, dtype=np.float32)
    return cv2.resize(np.ascontiguousarray(anomaly_map, dtype=np.float32), (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


MAX_MAP_SIDE = 16384  # a map side beyond any camera; (50000, 50000) would allocate 10 GB per frame


def _check_map_size(map_size: object) -> str | tuple[int, int]:
    if isinstance(map_size, str) and map_size in ("frame", "model"):
        return map_size
    if (
        isinstance(map_size, (tuple, list))
        and len(map_size) == 2
        and all(isinstance(v, int | np.integer) and not isinstance(v, bool) and 0 < int(v) <= MAX_MAP_SIDE for v in map_size)
    ):
        return (int(map_size[0]), int(map_size[1]))
    raise ConfigError(
        message("map_size", repr(map_size), f"'frame', 'model' or a (height, width) of ints in 1..{MAX_MAP_SIDE}", "pass map_size='frame' (default)")
    )


class Detector:
    """Anomaly detector on one bundle.

    Args:
        bundle: bundle directory / ``.tar`` / ``manifest.json`` path, or a loaded :class:`edgead.bundle.Bundle`.
        backend: ``"auto"``, ``"tensorrt"`` or ``"onnxruntime"``.
        threshold: decision threshold on the image score (default: the bundle's calibrated one).
        device: GPU index (TensorRT).
        threads: ONNX Runtime intra-op threads (None: ONNX Runtime's default).
        variant: bundle variant to run (None: merged when present, raw with the CUDA kernels on TensorRT).
        precision: TensorRT engine precision to require (None: fp16 first); ``"int8"`` on ONNX Runtime
            selects the ``merged_int8`` variant.
        allow_onnx_fallback: with ``backend="tensorrt"``, run the ONNX model with ONNX Runtime (WARNING logged)
            instead of refusing when no engine matches this GPU / TensorRT version.
        cuda_graph: replay TensorRT runs as CUDA graphs (per batch size).
        product: the product a multi-product bundle (UniAD) inspects by default; ``infer(..., product=)`` overrides it.
            With one product (or an EfficientAD bundle) it is implied.
        on_nonfinite: what a NaN/inf score or map becomes: ``"ng"`` (default: decided NG, counted in
            ``nonfinite_count``, WARNING logged; a broken engine never passes a part) or ``"raise"`` (BackendError).

    >>> det = Detector("bundle")                          # doctest: +SKIP
    >>> det.backend, det.precision, det.variant           # doctest: +SKIP
    ('onnxruntime', 'fp32', 'merged')
    """

    def __init__(
        self,
        bundle: str | Path | Bundle,
        backend: str = "auto",
        threshold: float | None = None,
        device: int = 0,
        threads: int | None = None,
        variant: str | None = None,
        *,
        precision: str | None = None,
        allow_onnx_fallback: bool = False,
        cuda_graph: bool = False,
        on_nonfinite: str = "ng",
        product: str | None = None,
    ) -> None:
        self._on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("ng", "raise"))
        self._nonfinite = 0
        if not isinstance(bundle, str | Path | Bundle):
            raise ConfigError(message("bundle", repr(bundle), "a bundle directory, .tar or manifest.json path, or a loaded Bundle", "pass Detector('path/to/bundle')"))
        self._owns_bundle = not isinstance(bundle, Bundle)  # then close() removes a .tar's temporary extraction
        self._bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        try:
            self._product = self._check_product(product) if product is not None else None
            self._setup(backend, threshold, device, threads, variant, precision, allow_onnx_fallback, cuda_graph)
        except BaseException:
            if self._owns_bundle:  # a refused option must not leave a .tar's extraction behind
                self._bundle.release()
            raise

    def _setup(
        self,
        backend: str,
        threshold: float | None,
        device: int,
        threads: int | None,
        variant: str | None,
        precision: str | None,
        allow_onnx_fallback: bool,
        cuda_graph: bool,
    ) -> None:
        manifest = self._bundle.manifest
        requested = check_choice("backend", backend, BACKENDS)
        if variant is not None:
            variant = check_choice("variant", variant, manifest.variants)
        if precision is not None:
            precision = check_choice("precision", precision, RUNTIME_PRECISIONS)
        if isinstance(device, bool) or not isinstance(device, int | np.integer) or device < 0:
            raise ConfigError(message("device", repr(device), "a GPU index >= 0", "pass device=0"))
        device = int(device)
        threads = check_threads(threads)
        self._user_threshold = None if threshold is None else self._check_threshold(threshold)
        self._threshold = self._check_threshold(manifest.threshold.value if threshold is None else threshold)
        self._post = manifest.post
        self._lock = threading.Lock()
        self._backend, why = self._pick_backend(requested, device, threads, variant, precision, allow_onnx_fallback, cuda_graph)
        log.info(
            "edgead Detector: backend=%s precision=%s variant=%s device=%s; %s",
            self._backend.name,
            self._backend.precision,
            self._backend.variant,
            self._backend.device,
            why,
        )

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _check_threshold(value: object) -> float:
        """Any finite real number, NumPy scalars included (``np.quantile`` returns those)."""
        ok = not isinstance(value, bool | np.bool_) and isinstance(value, int | float | np.integer | np.floating)
        try:
            number = float(value) if ok else math.nan  # type: ignore[arg-type]
        except OverflowError:  # 10**400
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(message("threshold", repr(value), "a finite real number (int, float or NumPy scalar)", "pass threshold=None to use the bundle's calibrated threshold"))
        return number

    def _ort_variant(self, variant: str | None, precision: str | None, runtime: str = "ONNX Runtime") -> str:
        """The bundle variant a CPU runtime runs for ``precision`` (fp32/bf16: merged or raw; int8: merged_int8)."""
        variants = self._bundle.manifest.variants
        if precision == "fp16" or (precision == "bf16" and runtime == "ONNX Runtime"):
            raise ConfigError(
                message(
                    "precision", f"{precision!r} on {runtime}", "fp32 or int8 (fp16 is a TensorRT engine precision, bf16 needs OpenVINO)",
                    "pass backend='tensorrt' for fp16, backend='openvino' for bf16, or precision=None",
                )
            )
        if precision is not None and variant is not None and (variant == "merged_int8") != (precision == "int8"):
            raise ConfigError(
                message(
                    "variant / precision",
                    f"variant={variant!r} with precision={precision!r}",
                    f"int8 only with variant 'merged_int8' on {runtime}",
                    "pass only one of variant= and precision=",
                )
            )
        if precision == "int8":
            if "merged_int8" not in variants:
                raise ConfigError(
                    message(
                        "precision",
                        f"'int8' on {runtime}",
                        "a bundle with the merged_int8 variant",
                        "re-export with 'edgead export RUN --int8', or pass precision=None",
                    )
                )
            return "merged_int8"
        if variant is not None:
            return variant
        return next(v for v in _ORT_VARIANT_ORDER if v in variants)

    def _pick_backend(
        self, requested: str, device: int, threads: int | None, variant: str | None, precision: str | None, allow_fallback: bool, cuda_graph: bool
    ) -> tuple[Backend, str]:
        from .backends import tensorrt as trt_backend

        bundle = self._bundle
        if requested == "onnxruntime":
            return OnnxRuntimeBackend(bundle, self._ort_variant(variant, precision), threads=threads), "backend='onnxruntime' requested"
        if requested == "openvino":
            return self._openvino(variant, precision or "fp32", threads), "backend='openvino' requested"
        if precision == "bf16":
            return self._cpu_backend(variant, precision, threads, "precision='bf16' is a CPU precision")
        ok, status = trt_backend.tensorrt_status(device)
        if requested == "tensorrt" and not ok:
            raise BackendError(
                message(
                    "backend 'tensorrt'",
                    status,
                    "TensorRT 10, cuda-python and an NVIDIA GPU",
                    "install 'edgead[tensorrt]' on a GPU machine, or pass backend='onnxruntime'",
                )
            )
        if not ok:
            return self._cpu_backend(variant, precision, threads, status)
        if requested == "auto" and not bundle.manifest.engines:
            why = f"the bundle has no TensorRT engine (build one: edgead build {bundle.source or bundle.root} --variant merged --precision fp16)"
            return self._cpu_backend(variant, precision, threads, why)
        platform = trt_backend.current_platform(device)
        lib, kernel_why = trt_backend.kernel_library(device)
        # auto never refuses for lack of an engine: it runs ONNX Runtime and says why (with the build command)
        fallback = allow_fallback or requested == "auto"
        engine, why = trt_backend.choose_engine(
            bundle, platform, variant=variant, precision=precision, kernels_available=lib is not None, allow_onnx_fallback=fallback
        )
        if engine is None:
            return self._cpu_backend(variant, None if precision == "fp16" else precision, threads, why, requested)
        backend = trt_backend.TensorRTBackend(bundle, engine, device=device, kernels=lib if engine.variant == "raw" else None, cuda_graph=cuda_graph)
        return backend, f"{requested}: TensorRT with {why}; kernels: {kernel_why}"

    def _openvino(self, variant: str | None, precision: str, threads: int | None) -> Backend:
        from .backends.openvino import OpenVINOBackend

        return OpenVINOBackend(self._bundle, self._ort_variant(variant, precision, "OpenVINO"), precision=precision, threads=threads)

    def _cpu_backend(self, variant: str | None, precision: str | None, threads: int | None, why_not_gpu: str, requested: str = "auto") -> tuple[Backend, str]:
        """No usable TensorRT engine: the fastest installed CPU runtime, at the precision asked for or the most
        efficient one the bundle allows (``manifest.cpu_precisions``, recorded with its measured fidelity).

        OpenVINO runs this model as fast as ONNX Runtime in FP32 and 2-4x faster in BF16 / INT8 on CPUs with
        AVX-512 BF16 / VNNI (docs/benchmarks.md); ONNX Runtime when OpenVINO is not installed."""
        from .backends import openvino as ov_backend

        allowed = self._bundle.manifest.auto_cpu_precisions
        try:
            ov = ov_backend.import_openvino()
        except MissingDependencyError:
            if precision == "bf16":
                raise
            hint = " (pip install 'edgead[openvino]' would run it faster: OpenVINO, BF16/INT8 on this kind of CPU)"
            return OnnxRuntimeBackend(self._bundle, self._ort_variant(variant, precision), threads=threads), f"{requested}: ONNX Runtime because {why_not_gpu}; OpenVINO is not installed{hint}"
        chosen = precision
        why_precision = "as asked" if precision else ""
        if chosen is None:
            for candidate in ("bf16", "int8"):
                if candidate in allowed and (candidate != "bf16" or ov_backend.bf16_supported(ov.Core())) and (candidate != "int8" or "merged_int8" in self._bundle.manifest.variants):
                    chosen, why_precision = candidate, f"allowed by the bundle ({_evidence(self._bundle.manifest.cpu_precisions[candidate])})"
                    break
            else:
                chosen, why_precision = "fp32", "the bundle allows no lower CPU precision" if not allowed else "no lower precision the bundle allows runs here"
        backend = self._openvino(variant, chosen, threads)
        return backend, f"{requested}: OpenVINO {chosen} ({why_precision}) because {why_not_gpu}; OpenVINO is the faster installed CPU runtime"

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        """``"tensorrt"`` or ``"onnxruntime"``: what actually runs."""
        return self._backend.name

    @property
    def precision(self) -> str:
        return self._backend.precision

    @property
    def variant(self) -> str:
        return self._backend.variant

    @property
    def device(self) -> str:
        return self._backend.device

    @property
    def image_size(self) -> int:
        return self._bundle.manifest.input.image_size

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def nonfinite_count(self) -> int:
        """Frames whose score or map was NaN/inf (decided NG) since this Detector was created."""
        return self._nonfinite

    @property
    def tiling(self) -> Tiling | None:
        """The bundle's tile layout (frames are cut into tiles of this many pixels), or None."""
        return self._bundle.manifest.input.tiling

    @property
    def bundle(self) -> Bundle:
        return self._bundle

    @property
    def max_batch(self) -> int:
        """Frames per backend run in ``infer_batch`` (the engine's max batch on TensorRT)."""
        return self._backend.max_batch or _DEFAULT_CHUNK

    # ------------------------------------------------------------------ inference
    @property
    def products(self) -> tuple[str, ...]:
        """The products of a multi-product bundle (empty for a one-product bundle)."""
        return tuple(self._bundle.manifest.classes)

    def _check_product(self, product: str | None) -> str | None:
        """The product to calibrate with: required (and checked) for a bundle of several products."""
        classes = self._bundle.manifest.classes
        if not classes:
            if product is not None:
                raise ConfigError(message("product", repr(product), "no product (this bundle has one product)", "drop product="))
            return None
        if product is None:
            product = self._product if getattr(self, "_product", None) else (next(iter(classes)) if len(classes) == 1 else None)
        if product is None:
            raise ConfigError(message("product", "none", f"one of {', '.join(classes)} (this bundle inspects several products)", "pass product='...' to Detector or infer"))
        return check_choice("product", product, tuple(classes))

    def infer(self, frame: np.ndarray, color: str = "bgr", map_size: str | tuple[int, int] = "frame", product: str | None = None) -> Result:
        """Score one frame (HxW or HxWxC uint8/uint16; ``color`` says the channel order).

        >>> det.infer(np.zeros((480, 640, 3), np.uint8)).anomaly_map.shape  # doctest: +SKIP
        (480, 640)
        """
        return self._infer_chunk([frame], color, _check_map_size(map_size), self._check_product(product))[0]

    def infer_batch(
        self, frames: Sequence[np.ndarray], color: str = "bgr", map_size: str | tuple[int, int] = "frame", product: str | None = None
    ) -> list[Result]:
        """Score several frames (any sizes), run in chunks of at most ``max_batch`` frames.

        >>> [r.decision for r in det.infer_batch([f1, f2])]  # doctest: +SKIP
        ['OK', 'NG']
        """
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frames = list(frames)
        if not isinstance(frames, Sequence) or isinstance(frames, (str, bytes)):
            raise InputError(message("frames", type(frames).__name__, "a list of frames", "pass a list of numpy arrays (use infer for one frame)"))
        if len(frames) == 0:
            raise InputError(message("frames", "an empty sequence", "at least one frame", "pass a non-empty list of frames"))
        size = _check_map_size(map_size)
        color = check_choice("color", color, COLORS)
        which = self._check_product(product)
        results: list[Result] = []
        step = self.max_batch
        for i in range(0, len(frames), step):
            results += self._infer_chunk(list(frames[i : i + step]), color, size, which)
        return results

    def _infer_chunk(self, frames: list[np.ndarray], color: str, map_size: str | tuple[int, int], product: str | None = None) -> list[Result]:
        t0 = time.perf_counter()
        spec = self._bundle.manifest.input
        tiling = spec.tiling
        shapes = [check_frame(f, color).shape[:2] for f in frames]
        # with a tiling every frame contributes its tiles; all tiles run as one batch (in max_batch chunks)
        pieces = [t for f in frames for t in tiling.cut(f)] if tiling is not None else frames
        counts = [len(tiling.layout(h, w)) for h, w in shapes] if tiling is not None else [1] * len(frames)
        batch = np.stack([prepare(f, spec.image_size, spec.mean, spec.std, color) for f in pieces])
        t1 = time.perf_counter()
        maps_parts, score_parts, infer_ms = [], [], 0.0
        with self._lock:
            t_locked = time.perf_counter()
            for i in range(0, len(batch), self.max_batch):
                outputs, ms = self._backend.timed_run(batch[i : i + self.max_batch])
                m, sc = self._maps_and_scores(outputs, len(batch[i : i + self.max_batch]))
                maps_parts.append(m)
                score_parts.append(sc)
                infer_ms += ms
        t2 = time.perf_counter()
        tile_maps, tile_scores = np.concatenate(maps_parts), np.concatenate(score_parts)
        threshold = self._threshold
        if product is not None:  # a product's calibration: its affine on the raw maps and scores, its threshold
            calibration = self._bundle.manifest.classes[product]
            tile_maps = calibration.affine.apply(tile_maps.astype(np.float64)).astype(np.float32)
            tile_scores = calibration.affine.apply(tile_scores.astype(np.float64)).astype(np.float32)
            threshold = calibration.threshold if self._user_threshold is None else self._user_threshold
        n = len(frames)
        results = []
        resized, scores = [], []
        start = 0
        for count, (fh, fw) in zip(counts, shapes, strict=True):
            m_t, s_t = tile_maps[start : start + count], tile_scores[start : start + count]
            start += count
            if tiling is not None:
                frame_map = tiling.stitch(m_t, int(fh), int(fw), self._post.pad)
                model_hw = (max(1, round(fh * spec.image_size / tiling.tile)), max(1, round(fw * spec.image_size / tiling.tile)))
                score = float(s_t.max()) if np.all(np.isfinite(s_t)) else float("nan")
            else:
                frame_map, model_hw, score = m_t[0], (spec.image_size, spec.image_size), float(s_t[0])
            if isinstance(map_size, tuple):
                h, w = map_size
            elif map_size == "model":
                h, w = model_hw
            else:
                h, w = int(fh), int(fw)
            resized.append(resize_map(frame_map, h, w))
            scores.append(score)
        t3 = time.perf_counter()
        post_ms = (t3 - t2) * 1e3
        total_ms = (t3 - t0) * 1e3
        lock_wait_ms = max(0.0, (t_locked - t1) * 1e3)
        timings = {"preprocess": (t1 - t0) * 1e3 / n, "inference": infer_ms / n, "postprocess": post_ms / n, "total": total_ms / n, "queue": lock_wait_ms / n}
        for m, score in zip(resized, scores, strict=True):
            finite = math.isfinite(score) and bool(np.isfinite(m).all())
            if not finite:
                self._nonfinite += 1
                if self._on_nonfinite == "raise":
                    raise BackendError(
                        message("model output", f"a non-finite score or map ({score})", "finite values", "check the bundle/engine (an FP16 overflow or a corrupt model); rebuild or re-export it")
                    )
                log.warning("non-finite model output (score %s): decided NG (%d so far)", score, self._nonfinite)
            # fail safe: anything but a finite score at or below the threshold is NG
            results.append(Result(score, m, not (finite and score <= threshold), threshold, dict(timings), finite))
        return results

    def _maps_and_scores(self, outputs: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        if "anomaly_map" in outputs:
            amap = np.asarray(outputs["anomaly_map"], np.float32)
            score = np.asarray(outputs["score"], np.float32).reshape(-1)
            if amap.ndim != 4 or amap.shape[:2] != (n, 1) or score.shape != (n,):
                raise BackendError(
                    message(
                        "model outputs",
                        f"anomaly_map {amap.shape}, score {score.shape}",
                        f"anomaly_map (N={n}, 1, h, w), score ({n},)",
                        "re-export the bundle with 'edgead export'",
                    )
                )
            return amap[:, 0], score
        return efficientad_postprocess(outputs["teacher"], outputs["student"], outputs["autoencoder"], self._post)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the backend (sessions, CUDA streams and buffers) and a ``.tar`` bundle's extraction; idempotent."""
        with self._lock:
            self._backend.close()
            if self._owns_bundle:
                self._bundle.release()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Detector {self._backend.describe()} image_size={self.image_size} threshold={self._threshold:.4g}>"
