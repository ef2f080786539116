"""TensorRT backend (TensorRT 10 Python API + cuda-python): runs a bundle's ``*.engine`` plan on an NVIDIA GPU.

Flow: ``tensorrt.Runtime.deserialize_cuda_engine`` -> binding names/shapes checked against the manifest ->
``create_execution_context`` -> per run: copy the batch into pinned memory, async copy to the device,
``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on the backend's own stream (optionally
replayed as a CUDA graph per batch size), async copy back, one stream synchronise.

With an engine of the ``raw`` variant the post-processing runs on the GPU through the CUDA build of
``edgead.kernels.device_postprocess`` (CUDA build of the kernels); when that library is absent the
Detector picks a ``merged`` engine instead and logs why.

Status: this path cannot run on the development machines (no TensorRT, no GPU). Its pure logic
(binding checks, profile/batch handling, engine choice, missing-dependency errors) is unit tested
without TensorRT; the GPU path is to be validated on a machine with TensorRT 10.

>>> det = Detector("bundle", backend="tensorrt")   # doctest: +SKIP
>>> det.backend, det.precision                      # doctest: +SKIP
('tensorrt', 'fp16')
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import kernels
from ..bundle import VARIANT_OUTPUTS, Bundle, EngineEntry, Platform, rebuild_command
from ..errors import BackendError, BundleError, MissingDependencyError, message
from ..kernels import NP_DTYPES
from . import cuda
from .base import Backend

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "import_tensorrt",
    "tensorrt_status",
    "current_platform",
    "TensorInfo",
    "check_bindings",
    "batch_range",
    "check_raw_outputs",
    "choose_engine",
    "kernel_library",
    "TensorRTBackend",
]

log = logging.getLogger(__name__)

_PRECISION_ORDER = ("fp16", "int8", "fp32")


def _dims(d: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple of ints (-1 = dynamic)."""
    return tuple(int(d[i]) for i in range(len(d)))


def import_tensorrt(purpose: str = "TensorRT backend", needs: str = "Runtime") -> ModuleType:
    """The real tensorrt module, or MissingDependencyError naming the ``tensorrt`` extra.

    ``needs`` is the attribute the caller relies on: ``Runtime`` to run engines, ``Builder`` to build
    them (the runtime-only "lean" TensorRT package has no builder). A type-stub-only install
    (``tensorrt-stubs``) imports as an empty namespace package; it is treated as missing.
    """
    try:
        import tensorrt as trt_mod
    except ImportError as exc:
        raise MissingDependencyError("tensorrt", "tensorrt", purpose) from exc
    if not hasattr(trt_mod, needs):
        what = "only type stubs are installed" if not hasattr(trt_mod, "__version__") else f"this TensorRT package has no {needs}"
        raise MissingDependencyError("tensorrt", "tensorrt", f"{purpose} ({what})")
    return trt_mod


def tensorrt_status(device: int = 0) -> tuple[bool, str]:
    """Whether the TensorRT backend can run here, and why not (for the Detector's one log line)."""
    try:
        trt_mod = import_tensorrt()
    except MissingDependencyError:
        return False, "TensorRT is not installed (pip install 'edgead[tensorrt]')"
    try:
        cuda.runtime()
    except MissingDependencyError:
        return False, "cuda-python is not installed (pip install 'edgead[tensorrt]')"
    count, why = cuda.device_status()
    if count == 0:
        return False, f"no usable NVIDIA GPU ({why})"
    if not 0 <= device < count:
        return False, f"GPU {device} does not exist ({count} present)"
    return True, f"TensorRT {trt_mod.__version__} and {count} GPU(s) present"


def current_platform(device: int = 0) -> Platform:
    """The GPU (compute capability, name) and TensorRT version an engine must match here."""
    trt_mod = import_tensorrt()
    info = cuda.device_info(device)
    return Platform(info.compute_capability, str(trt_mod.__version__), info.name)


@dataclass(frozen=True)
class TensorInfo:
    """One engine IO tensor: name, direction, shape (-1 = dynamic) and numpy dtype."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


def check_bindings(io: Sequence[TensorInfo], input_name: str, input_shape: tuple[int, int, int], variant: str, engine_file: str, bundle: str) -> None:
    """Check the engine's IO tensors against the manifest: one input ``input_name`` (N,C,H,W), the variant's outputs."""
    fix = f"the plan does not belong to this bundle; rebuild it: {rebuild_command(bundle, variant)}"
    inputs = [t for t in io if t.is_input]
    outputs = [t for t in io if not t.is_input]
    if [t.name for t in inputs] != [input_name]:
        raise BundleError(message(f"engine '{engine_file}' inputs", [t.name for t in inputs], f"['{input_name}'] (manifest input.name)", fix))
    shape = inputs[0].shape
    if len(shape) != 4 or any(g != -1 and g != e for g, e in zip(shape[1:], input_shape, strict=True)):
        raise BundleError(message(f"engine '{engine_file}' input shape", shape, f"(N, {', '.join(map(str, input_shape))})", fix))
    expected = VARIANT_OUTPUTS[variant]
    if sorted(t.name for t in outputs) != sorted(expected):
        raise BundleError(message(f"engine '{engine_file}' outputs", [t.name for t in outputs], f"{list(expected)} for variant '{variant}'", fix))
    for t in outputs:
        if t.dtype not in NP_DTYPES:
            raise BundleError(message(f"engine '{engine_file}' output '{t.name}' dtype", t.dtype, "float32 or float16", fix))
        if any(d == -1 for d in t.shape[1:]):
            raise BundleError(message(f"engine '{engine_file}' output '{t.name}' shape", t.shape, "only the batch axis dynamic", fix))


def check_raw_outputs(shapes: dict[str, tuple[int, ...]], io: dict[str, TensorInfo], engine_file: str, bundle: str) -> None:
    """A raw engine's outputs as the CUDA kernels read them: teacher (N,C,h,w), student (N,2C,h,w), autoencoder
    (N,C,h,w), one dtype (fp16 or fp32) for all three. Anything else would make a kernel read out of bounds."""
    fix = f"rebuild the engine from this bundle: {rebuild_command(bundle, 'raw')}"
    t, s_, a = (shapes[k] for k in ("teacher", "student", "autoencoder"))
    if len(t) != 4 or len(s_) != 4 or len(a) != 4:
        raise BundleError(message(f"engine '{engine_file}' raw output shapes", (t, s_, a), "three NCHW tensors", fix))
    n, c, h, w = t
    if s_ != (n, 2 * c, h, w) or a != (n, c, h, w):
        raise BundleError(message(f"engine '{engine_file}' raw output shapes", f"teacher {t}, student {s_}, autoencoder {a}", f"student {(n, 2 * c, h, w)}, autoencoder {t}", fix))
    dtypes = {io[k].dtype for k in ("teacher", "student", "autoencoder")}
    if len(dtypes) != 1 or next(iter(dtypes)) not in NP_DTYPES:
        raise BundleError(message(f"engine '{engine_file}' raw output dtypes", sorted(str(d) for d in dtypes), "one of float32 / float16 for all three", fix))


def batch_range(profile: Sequence[Sequence[int]], input_shape: tuple[int, int, int], engine_file: str, manifest_max_batch: int) -> tuple[int, int]:
    """(min, max) batch of optimisation profile 0, given as [min_shape, opt_shape, max_shape]."""
    if len(profile) != 3 or any(len(s) != 4 for s in profile):
        raise BundleError(
            message(
                f"engine '{engine_file}' optimisation profile", [tuple(s) for s in profile], "min/opt/max NCHW shapes", "rebuild the engine with 'edgead build'"
            )
        )
    lo, _, hi = (tuple(int(v) for v in s) for s in profile)
    for s in (lo, hi):
        if s[1:] != input_shape:
            raise BundleError(
                message(f"engine '{engine_file}' profile shape", s, f"(N, {', '.join(map(str, input_shape))})", "rebuild the engine with 'edgead build'")
            )
    if not 1 <= lo[0] <= hi[0]:
        raise BundleError(message(f"engine '{engine_file}' profile batch", (lo[0], hi[0]), "1 <= min <= max", "rebuild the engine with 'edgead build'"))
    if hi[0] != manifest_max_batch:
        raise BundleError(
            message(
                f"engine '{engine_file}' max batch",
                f"{hi[0]} in the plan, {manifest_max_batch} in manifest.json",
                "the same value",
                "rebuild the engine with 'edgead build' (the manifest entry is stale)",
            )
        )
    return lo[0], hi[0]


def kernel_library(device: int = 0) -> tuple[Any | None, str]:
    """The CUDA post-processing library, probed on ``device`` (``edgead.kernels.load_library('cuda')``), or None and why not."""
    try:
        lib = kernels.load_library("cuda", device)
    except Exception as exc:  # noqa: BLE001 - any failure means: no device post-processing
        return None, f"the CUDA post-processing library is not available ({exc})"
    return lib, f"CUDA post-processing library {getattr(lib, 'path', '')} loaded"


def choose_engine(
    bundle: Bundle, platform: Platform, *, variant: str | None, precision: str | None, kernels_available: bool, allow_onnx_fallback: bool
) -> tuple[EngineEntry | None, str]:
    """Pick the plan to run: the requested variant/precision, else raw (with kernels) > merged > merged_int8, fp16 first.

    Returns (None, reason) only when ``allow_onnx_fallback``; otherwise a missing match raises BundleError
    with the exact ``edgead build`` command.
    """
    found = bundle.check_engines(platform, variant, allow_onnx_fallback=allow_onnx_fallback)
    if precision is not None:
        found = [e for e in found if e.precision == precision]
        if not found:
            cmd = rebuild_command(bundle.source or bundle.root, variant or "merged", precision)
            text = message(
                "TensorRT engine precision",
                f"no {precision} engine for this GPU",
                f"an engine with precision {precision}",
                f"run '{cmd}' or pass precision=None",
            )
            if not allow_onnx_fallback:
                raise BundleError(text)
            return None, text
    if not found:
        return None, "no engine for this GPU / TensorRT version (allow_onnx_fallback=True)"
    order = ("raw", "merged", "merged_int8")  # raw is only usable with the kernels
    usable = [e for e in found if e.variant != "raw" or kernels_available]
    if not usable:
        text = "only a 'raw' engine matches and the CUDA post-processing library is not available"
        if variant == "raw" or not allow_onnx_fallback:
            raise BundleError(
                message(
                    "TensorRT engine",
                    text,
                    "a 'merged' engine or the CUDA kernels",
                    f"run '{rebuild_command(bundle.source or bundle.root, 'merged', found[0].precision)}' or build the kernels (make kernels)",
                )
            )
        return None, text
    usable.sort(key=lambda e: (order.index(e.variant), _PRECISION_ORDER.index(e.precision)))
    best = usable[0]
    why = f"engine {best.file} ({best.variant}, {best.precision})"
    if not kernels_available and any(e.variant == "raw" for e in found):
        why += "; a raw engine exists but the CUDA post-processing library is not available, so the merged variant is used"
    return best, why


class TensorRTBackend(Backend):
    """One deserialised engine, its execution context, stream and buffers (sized for ``max_batch``).

    Not runnable without TensorRT 10 + an NVIDIA GPU (see module docstring).
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle, engine: EngineEntry, *, device: int = 0, kernels: Any | None = None, cuda_graph: bool = False) -> None:
        import_tensorrt()
        import tensorrt as trt

        if engine.variant == "raw" and kernels is None:  # before anything is allocated
            raise BundleError(
                message(
                    "TensorRT raw engine",
                    "no CUDA post-processing library",
                    "edgead.kernels CUDA build",
                    "use a merged engine or build the kernels (make kernels)",
                )
            )
        self._device_index = device
        cuda.set_device(device)  # for this thread; every run and the release set it again (the device is per host thread)
        manifest = bundle.manifest
        size = manifest.input.image_size
        input_shape = (3, size, size)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        plan = bundle.path(engine.file).read_bytes()
        engine_obj = self._runtime.deserialize_cuda_engine(plan)
        if engine_obj is None:
            raise BundleError(
                message(
                    f"TensorRT engine '{engine.file}'",
                    "TensorRT refused to deserialise the plan",
                    f"a plan built by TensorRT {trt.__version__} for this GPU",
                    f"run '{rebuild_command(bundle.source or bundle.root, engine.variant, engine.precision)}'",
                )
            )
        self._engine: trt.ICudaEngine = engine_obj
        io = [self._tensor_info(self._engine, self._engine.get_tensor_name(i)) for i in range(self._engine.num_io_tensors)]
        check_bindings(io, manifest.input.name, input_shape, engine.variant, engine.file, str(bundle.source or bundle.root))
        profile = self._engine.get_tensor_profile_shape(manifest.input.name, 0)
        self.min_batch, max_batch = batch_range([_dims(s) for s in profile], input_shape, engine.file, engine.max_batch)
        context = self._engine.create_execution_context()
        if context is None:
            raise BackendError(
                message("TensorRT create_execution_context", "None (TensorRT could not allocate the context)", "an execution context",
                        "free GPU memory (other processes on nvidia-smi) or rebuild with a smaller --max-batch")
            )
        self._context: trt.IExecutionContext = context
        # everything allocated from here on is released if a later step fails (no leaked stream or buffers)
        self._graph: Any = None  # one CUDA graph, valid for the batch size it was captured with (_graph_n)
        self._graph_n = 0
        self._host: dict[str, cuda.PinnedBuffer] = {}
        self._dev: dict[str, cuda.DeviceBuffer] = {}
        self._stream: cuda.Stream | None = None
        try:
            self._stream = cuda.Stream()
            info = cuda.device_info(device)
            self._kernels = kernels if engine.variant == "raw" else None
            output_names = VARIANT_OUTPUTS["merged"] if engine.variant == "raw" else VARIANT_OUTPUTS[engine.variant]
            super().__init__(
                variant=engine.variant,
                precision=engine.precision,
                input_name=manifest.input.name,
                input_shape=input_shape,
                output_names=output_names,
                max_batch=max_batch,
                device=f"GPU {device} {info.name} (sm {info.compute_capability}) via TensorRT {trt.__version__}",
            )
            # buffers for the max batch: shapes from the context with the max input shape set
            if not self._context.set_input_shape(self.input_name, (max_batch, *input_shape)):
                raise BackendError(
                    message("TensorRT set_input_shape", (max_batch, *input_shape), "a shape inside the profile", "rebuild the engine with 'edgead build'")
                )
            self._io = {t.name: t for t in io}
            self._out_shapes: dict[str, tuple[int, ...]] = {}
            for t in io:
                shape = (max_batch, *input_shape) if t.is_input else _dims(self._context.get_tensor_shape(t.name))
                self._out_shapes[t.name] = shape
            if self._kernels is not None:  # before a kernel could read out of bounds: the raw outputs must fit it
                check_raw_outputs(self._out_shapes, self._io, engine.file, str(bundle.source or bundle.root))
            for t in io:
                shape = self._out_shapes[t.name]
                self._dev[t.name] = cuda.DeviceBuffer(int(np.prod(shape)) * t.dtype.itemsize)
                if not self._context.set_tensor_address(t.name, self._dev[t.name].ptr):
                    raise BackendError(message("TensorRT set_tensor_address", f"refused for '{t.name}'", "an address for every IO tensor", "rebuild the engine with 'edgead build'"))
                if t.is_input or self._kernels is None:
                    self._host[t.name] = cuda.PinnedBuffer(shape, t.dtype)
            if self._kernels is not None:
                _, c, h, w = self._out_shapes["teacher"]
                p = manifest.post.pad
                self._pp_shape = (h + 2 * p, w + 2 * p)
                for name, shape in (("anomaly_map", (max_batch, 1, *self._pp_shape)), ("score", (max_batch,))):
                    self._dev[name] = cuda.DeviceBuffer(int(np.prod(shape)) * 4)
                    self._host[name] = cuda.PinnedBuffer(shape, "float32")
            self._post = manifest.post
            self._use_graph = cuda_graph
        except BaseException:
            self._release(reraise=False)  # the original error is the one to report; release failures are logged
            raise
        log.info(
            "TensorRT backend ready: %s, batch %d..%d%s", engine.file, self.min_batch, max_batch, ", CUDA post-processing" if self._kernels is not None else ""
        )

    @staticmethod
    def _tensor_info(engine: trt.ICudaEngine, name: str) -> TensorInfo:
        import tensorrt as trt

        mode = engine.get_tensor_mode(name)
        dims = engine.get_tensor_shape(name)
        return TensorInfo(name, mode == trt.TensorIOMode.INPUT, _dims(dims), np.dtype(trt.nptype(engine.get_tensor_dtype(name))))

    def _enqueue(self, n: int) -> None:
        assert self._stream is not None
        if not self._context.execute_async_v3(self._stream.handle):
            raise BackendError(
                message("TensorRT execute_async_v3", "failed", "success", "check the TensorRT log above; rebuild the engine with 'edgead build'")
            )
        if self._kernels is not None:
            t, s, a = (self._dev[k].ptr for k in ("teacher", "student", "autoencoder"))
            _, c, h, w = self._out_shapes["teacher"]
            post = self._post
            assert self._stream is not None
            kernels.device_postprocess(
                t,
                s,
                a,
                dtype=NP_DTYPES[self._io["teacher"].dtype],
                shape=(n, c, h, w),
                post=post,
                map_out=self._dev["anomaly_map"].ptr,
                score_out=self._dev["score"].ptr,
                stream=self._stream.handle,
                library=self._kernels,
            )

    def _launch(self, n: int) -> None:
        """Run the engine (and the kernels) for ``n`` images: plainly, or as a CUDA graph.

        A graph bakes in the shapes and the TensorRT scratch state of its capture, so exactly one is kept: for
        the batch size of the last captured run. Another batch size destroys it and captures anew after a warm-up
        run at that size (the warm-up computes this run's outputs). If capturing fails the backend falls back to
        plain enqueues, with one warning.
        """
        if not self._use_graph:
            self._enqueue(n)
            return
        if self._graph is not None and self._graph_n == n:
            cuda.check(cuda.runtime().cudaGraphLaunch(self._graph, self._stream_raw), "cudaGraphLaunch")
            return
        self._destroy_graph()
        self._enqueue(n)  # warm-up outside capture (TensorRT allocates lazily on the first run of a shape): this run's outputs
        self._graph = self._capture(n)
        self._graph_n = n if self._graph is not None else 0

    def _capture(self, n: int) -> Any:
        """An executable graph of one enqueue at batch ``n``, or None (and graphs off) when the stream cannot be captured."""
        rt = cuda.runtime()
        stream = self._stream_raw
        err = rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)[0]
        if int(err) != 0:
            return self._graphs_off(f"cudaStreamBeginCapture: {getattr(err, 'name', err)}")
        try:
            self._enqueue(n)
        except BaseException:
            _, partial = rt.cudaStreamEndCapture(stream)  # leave capture mode; a half-captured graph is destroyed, not leaked
            if partial is not None:
                rt.cudaGraphDestroy(partial)
            raise
        err, graph = rt.cudaStreamEndCapture(stream)
        if int(err) != 0 or graph is None:
            return self._graphs_off(f"cudaStreamEndCapture: {getattr(err, 'name', err)}")
        try:
            err, graph_exec = rt.cudaGraphInstantiate(graph, 0)
        finally:
            rt.cudaGraphDestroy(graph)  # the executable graph does not need its template
        if int(err) != 0:
            return self._graphs_off(f"cudaGraphInstantiate: {getattr(err, 'name', err)}")
        return graph_exec

    def _graphs_off(self, why: str) -> None:
        log.warning("CUDA graph capture failed (%s); running without CUDA graphs from now on", why)
        self._use_graph = False
        return None

    def _destroy_graph(self) -> None:
        if self._graph is not None:
            graph, self._graph, self._graph_n = self._graph, None, 0
            cuda.check(cuda.runtime().cudaGraphExecDestroy(graph), "cudaGraphExecDestroy")

    @property
    def _stream_raw(self) -> Any:
        assert self._stream is not None
        return self._stream.raw

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = batch.shape[0]
        if n < self.min_batch:
            padded = np.zeros((self.min_batch, *batch.shape[1:]), np.float32)
            padded[:n] = batch
            return {k: v[:n] for k, v in self._run(padded).items()}
        assert self._stream is not None
        cuda.set_device(self._device_index)  # this thread's current device may be another one
        name = self.input_name
        host_in = self._host[name]
        host_in.array[:n] = batch.astype(host_in.array.dtype, copy=False)
        cuda.copy_htod(self._dev[name], host_in, self._stream, n * int(np.prod(self.input_shape)) * host_in.array.itemsize)
        if not self._context.set_input_shape(name, (n, *self.input_shape)):
            raise BackendError(message("TensorRT batch", n, f"{self.min_batch}..{self.max_batch}", "use Detector.infer_batch, which splits batches"))
        self._launch(n)
        outputs: dict[str, np.ndarray] = {}
        for out in self.output_names:
            host = self._host[out]
            per_item = int(np.prod(host.array.shape[1:])) * host.array.itemsize
            cuda.copy_dtoh(host, self._dev[out], self._stream, n * per_item)
        self._stream.synchronize()
        for out in self.output_names:
            outputs[out] = self._host[out].array[:n].astype(np.float32, copy=True)
        return outputs

    def _release(self, reraise: bool = True) -> None:
        """Free the CUDA graph, buffers and stream, all of them even when one fails; the first failure is raised
        (``reraise``) or logged (when an earlier error is being reported)."""
        errors: list[BaseException] = []

        def attempt(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - collected, the first one surfaces below
                errors.append(exc)

        attempt(cuda.set_device, self._device_index)
        attempt(self._destroy_graph)
        for buf in list(self._host.values()):
            attempt(buf.close)
        for dbuf in list(self._dev.values()):
            attempt(dbuf.close)
        self._host.clear()
        self._dev.clear()
        if self._stream is not None:
            attempt(self._stream.close)
            self._stream = None
        if errors and reraise:
            raise errors[0]
        for exc in errors:
            log.warning("TensorRT backend release: %s", exc)

    def _close(self) -> None:
        try:
            self._release()
        finally:
            del self._context
            del self._engine
