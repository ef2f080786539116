"""A test double of the ``tensorrt`` 10 Python API on the simulated CUDA device (``simdevice.cudart``).

The "engine" is the bundle's ONNX model: the fake builder parses it (with onnx), records every flag, profile,
precision constraint and timing-cache call, and serialises a plan = a small JSON header (IO tensors, profile,
precision, FP32 layers) + the ONNX bytes. The fake runtime deserialises such plans; ``execute_async_v3`` queues,
on the given stream, an ONNX Runtime run that reads the input from the bound device address and writes every
output to its bound address, as a real engine would. What TensorRT 10 documents is enforced:

* ``set_input_shape`` returns False for an unknown or non-input tensor and a shape outside the profile;
* ``set_tensor_address`` returns False for an unknown tensor;
* ``execute_async_v3`` returns False (and logs an error) when an input shape or any address is unset, the
  bound buffers are too small for the set shapes (an illegal address on a real GPU), or the stream does not
  belong to the current device;
* an FP16 engine computes in float16 except the layers kept FP32 (precision constraints), so a map tail left
  in FP16 shows its rounding in the scores.

Signatures follow ``tensorrt-stubs`` 10.13 (``tests/sdk/test_simdevice.py`` compares them).
"""

from __future__ import annotations

import enum
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .cudart import SimulatedRuntime

__version__ = "10.13.0.35"
_MAGIC = b"EDGEAD-SIM-PLAN\x00"


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8,
       DataType.INT64: np.int64}
_ONNX_TYPES = {1: DataType.FLOAT, 2: DataType.UINT8, 3: DataType.INT8, 6: DataType.INT32, 7: DataType.INT64, 9: DataType.BOOL, 10: DataType.HALF}


def nptype(trt_type: DataType) -> type:
    return _NP[DataType(trt_type)]


float32, float16 = DataType.FLOAT, DataType.HALF


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    OBEY_PRECISION_CONSTRAINTS = 12
    PREFER_PRECISION_CONSTRAINTS = 13


class LayerType(enum.IntEnum):
    """A subset of ``tensorrt.LayerType`` (values as in tensorrt-stubs 10.13); ONNX nodes map to them coarsely (``_LAYER_TYPES``)."""

    CONVOLUTION = 0
    ACTIVATION = 2
    POOLING = 3
    ELEMENTWISE = 9
    UNARY = 11
    SHUFFLE = 13
    REDUCE = 14
    MATRIX_MULTIPLY = 17
    CONSTANT = 19
    SHAPE = 23
    QUANTIZE = 32
    DEQUANTIZE = 33


_LAYER_TYPES = {"Conv": LayerType.CONVOLUTION, "MatMul": LayerType.MATRIX_MULTIPLY, "Gemm": LayerType.MATRIX_MULTIPLY, "QuantizeLinear": LayerType.QUANTIZE,
                "DequantizeLinear": LayerType.DEQUANTIZE, "Constant": LayerType.CONSTANT, "Relu": LayerType.ACTIVATION, "AveragePool": LayerType.POOLING,
                "Reshape": LayerType.SHUFFLE, "Transpose": LayerType.SHUFFLE, "Sqrt": LayerType.UNARY, "Shape": LayerType.SHAPE}


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class Dims(tuple):
    """Shape with -1 for dynamic axes (a tuple, as the bindings' Dims behaves for len/indexing)."""

    def __new__(cls, shape: Any = ()) -> Dims:
        return super().__new__(cls, tuple(int(v) for v in shape))


class Logger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self, min_severity: Logger.Severity = Severity.WARNING) -> None:
        self.min_severity = min_severity
        self.messages: list[tuple[int, str]] = []

    def log(self, severity: Logger.Severity, msg: str) -> None:
        self.messages.append((int(severity), msg))


class SimState:
    """What the fakes share: the simulated device, build records, failure switches."""

    def __init__(self, device: SimulatedRuntime) -> None:
        self.device = device
        self.builds: list[dict[str, Any]] = []
        self.fail_context = False  # create_execution_context returns None (out of device memory)
        self.reject_timing_cache = False  # set_timing_cache returns False (a cache from another device)
        self.fail_build = False  # build_serialized_network returns None (TensorRT found no implementation)
        self.contexts: list[IExecutionContext] = []


STATE: SimState | None = None


def _state() -> SimState:
    if STATE is None:
        raise RuntimeError("simulated TensorRT used without simdevice.install()")
    return STATE


# ----------------------------------------------------------------------------- build side
class ITensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
        self.name, self.shape, self.dtype = name, Dims(shape), dtype


class ILayer:
    """One layer per ONNX node (named after the node, ``node_of_<first output>`` when it has no name, as the ONNX
    parser names it) and one CONSTANT layer per initializer (named after it), with their input and output tensors."""

    def __init__(self, name: str, op_type: str, inputs: list[ITensor] | None = None, outputs: list[ITensor] | None = None) -> None:
        self.name, self.op_type = name, op_type
        self.type = LayerType.REDUCE if op_type.startswith("Reduce") else _LAYER_TYPES.get(op_type, LayerType.ELEMENTWISE)
        self._inputs, self._outputs = list(inputs or []), list(outputs or [ITensor(f"{name}_output", (), DataType.FLOAT)])
        self.precision = DataType.FLOAT
        self.precision_is_set = False
        self._output_types: dict[int, DataType] = {}

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "precision" and "precision" in self.__dict__:
            self.__dict__["precision_is_set"] = True
        super().__setattr__(key, value)

    def set_output_type(self, index: int, dtype: DataType) -> None:
        self._output_types[index] = dtype

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.model: Any = None
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []
        self.layers: list[ILayer] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_input(self, index: int) -> ITensor:
        return self.inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self.outputs[index]

    def get_layer(self, index: int) -> ILayer:
        return self.layers[index]


class ParserError:
    def __init__(self, text: str) -> None:
        self.text = text

    def desc(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network, self.logger = network, logger
        self.errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> ParserError:
        return self.errors[index]

    def parse_from_file(self, model: str) -> bool:
        import onnx

        from build_engines.onnx_ops import unsupported_ops

        try:
            m = onnx.load(model)
        except Exception as exc:  # noqa: BLE001 - a parser reports, never raises
            self.errors.append(ParserError(f"cannot read {model}: {exc}"))
            return False
        issues = unsupported_ops(m)
        if issues:
            self.errors += [ParserError(f"{i.node}: {i.op_type} {i.reason}") for i in issues]
            return False
        types = {1: DataType.FLOAT, 10: DataType.HALF}
        init = {i.name for i in m.graph.initializer}
        inferred = onnx.shape_inference.infer_shapes(m)
        dtypes = {vi.name: _ONNX_TYPES.get(vi.type.tensor_type.elem_type, DataType.FLOAT) for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
        dtypes.update({i.name: _ONNX_TYPES.get(i.data_type, DataType.FLOAT) for i in m.graph.initializer})

        def tensor(name: str) -> ITensor:
            return ITensor(name, (), dtypes.get(name, DataType.FLOAT))

        for vi in m.graph.input:
            if vi.name not in init:
                shape = [d.dim_value if d.dim_value else -1 for d in vi.type.tensor_type.shape.dim]
                self.network.inputs.append(ITensor(vi.name, tuple(shape), types[vi.type.tensor_type.elem_type]))
        for vi in m.graph.output:
            shape = [d.dim_value if d.dim_value else -1 for d in vi.type.tensor_type.shape.dim]
            self.network.outputs.append(ITensor(vi.name, tuple(shape), types[vi.type.tensor_type.elem_type]))
        constants = [ILayer(i.name, "Constant", [], [tensor(i.name)]) for i in m.graph.initializer]
        nodes = [ILayer(n.name or f"node_of_{n.output[0]}", n.op_type, [tensor(t) for t in n.input if t], [tensor(t) for t in n.output]) for n in m.graph.node]
        self.network.layers = constants + nodes
        self.network.model = m
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

    def set_shape(self, input: str, min: Dims, opt: Dims, max: Dims) -> None:  # noqa: A002 - the bindings' names
        self.shapes[input] = (Dims(min), Dims(opt), Dims(max))


class ITimingCache:
    def __init__(self, blob: bytes) -> None:
        self.blob = bytes(blob) or b"SIMCACHE"

    def serialize(self) -> memoryview:
        return memoryview(self.blob)


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags: set[BuilderFlag] = set()
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.cache: ITimingCache | None = None

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def get_flag(self, flag: BuilderFlag) -> bool:
        return flag in self.flags

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pools[pool] = pool_size

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        return ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if _state().reject_timing_cache and not ignore_mismatch and cache.blob != b"SIMCACHE":
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.cache


class IHostMemory(bytes):
    """Serialised plan; supports the buffer protocol (``memoryview(plan)``) as the bindings' object does."""

    @property
    def nbytes(self) -> int:
        return len(self)


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    @property
    def platform_has_fast_fp16(self) -> bool:
        return True

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        if _state().fail_build:
            self.logger.log(Logger.ERROR, "could not find any implementation for a node (simulated build failure)")
            return None
        if network.model is None or not config.profiles:
            self.logger.log(Logger.ERROR, "network not parsed or no optimisation profile for a dynamic input")
            return None
        profile = config.profiles[0]
        inp = network.inputs[0]
        if inp.name not in profile.shapes:
            self.logger.log(Logger.ERROR, f"no profile shapes for input {inp.name}")
            return None
        fp16 = BuilderFlag.FP16 in config.flags or bool(network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        obey = BuilderFlag.OBEY_PRECISION_CONSTRAINTS in config.flags
        fp32_layers = sorted(layer.name for layer in network.layers if obey and layer.precision_is_set and layer.precision == DataType.FLOAT)
        header = {
            "input": {"name": inp.name, "shape": list(inp.shape), "dtype": int(inp.dtype)},
            "outputs": [{"name": o.name, "shape": list(o.shape), "dtype": int(o.dtype)} for o in network.outputs],
            "profile": [list(s) for s in profile.shapes[inp.name]],
            "fp16": fp16,
            "int8": BuilderFlag.INT8 in config.flags,
            "fp32_layers": fp32_layers,
        }
        _state().builds.append({**header, "flags": sorted(f.name for f in config.flags), "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
                                "timing_cache": config.cache is not None, "network_flags": network.flags})
        buf = io.BytesIO()
        head = json.dumps(header).encode()
        buf.write(_MAGIC + len(head).to_bytes(8, "little") + head + network.model.SerializeToString())
        return IHostMemory(buf.getvalue())


# ----------------------------------------------------------------------------- run side
class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        data = bytes(serialized_engine)
        if not data.startswith(_MAGIC):
            self.logger.log(Logger.ERROR, "deserialization: the plan was not built by this TensorRT version")
            return None
        n = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 8], "little")
        start = len(_MAGIC) + 8
        return ICudaEngine(json.loads(data[start : start + n]), data[start + n :], self.logger)


class ICudaEngine:
    def __init__(self, header: dict[str, Any], onnx_bytes: bytes, logger: Logger) -> None:
        self.header, self.logger = header, logger
        self.device = _state().device.current_device
        self._io = [header["input"], *header["outputs"]]
        self._onnx = onnx_bytes
        self._session: Any = None

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    def get_tensor_name(self, index: int) -> str:
        return str(self._io[index]["name"])

    def _tensor(self, name: str) -> dict[str, Any]:
        for t in self._io:
            if t["name"] == name:
                return t
        raise KeyError(name)

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        try:
            return TensorIOMode.INPUT if self._tensor(name) is self._io[0] else TensorIOMode.OUTPUT
        except KeyError:
            return TensorIOMode.NONE

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self._tensor(name)["shape"])

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType(self._tensor(name)["dtype"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        if profile_index != 0 or self.get_tensor_mode(name) != TensorIOMode.INPUT:
            raise ValueError(f"no profile {profile_index} for {name}")
        return [Dims(s) for s in self.header["profile"]]

    def create_execution_context(self) -> IExecutionContext | None:
        if _state().fail_context:
            self.logger.log(Logger.ERROR, "out of device memory while creating the execution context")
            return None
        ctx = IExecutionContext(self)
        _state().contexts.append(ctx)
        return ctx

    def _session_(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            self._session = ort.InferenceSession(self._onnx, opts, providers=["CPUExecutionProvider"])
        return self._session


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.input_shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}
        self.runs: list[dict[str, Any]] = []
        # TensorRT re-plans its scratch memory when the input shape changes: a CUDA graph captured before that
        # replays kernels on stale scratch state (modelled: such a replay faults)
        self.generation = 0

    def set_input_shape(self, name: str, shape: Any) -> bool:
        if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            return False
        shape = tuple(int(v) for v in shape)
        lo, _, hi = self.engine.header["profile"]
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
            self.engine.logger.log(Logger.ERROR, f"set_input_shape: {shape} is outside the profile [{lo}, {hi}]")
            return False
        if shape != self.input_shape:
            self.generation += 1
        self.input_shape = shape
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        t = self.engine._tensor(name)
        if self.input_shape is None:
            return Dims(t["shape"])
        n = self.input_shape[0]
        return Dims([n if d == -1 else d for d in t["shape"]]) if t is not self.engine._io[0] else Dims(self.input_shape)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if self.engine.get_tensor_mode(name) == TensorIOMode.NONE:
            return False
        self.addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self.addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        sim = _state().device
        log = self.engine.logger
        if self.input_shape is None:
            log.log(Logger.ERROR, "execute_async_v3: input shape not set")
            return False
        if sim.current_device != self.engine.device:
            log.log(Logger.ERROR, f"execute_async_v3: the engine lives on GPU {self.engine.device}, the calling thread's device is {sim.current_device}")
            return False
        views = {}
        for t in self.engine._io:
            name = t["name"]
            if name not in self.addresses:
                log.log(Logger.ERROR, f"execute_async_v3: no address set for tensor {name}")
                return False
            shape = tuple(self.get_tensor_shape(name))
            try:
                views[name] = sim.array(self.addresses[name], shape, nptype(DataType(t["dtype"])))
            except IndexError as exc:
                log.log(Logger.ERROR, f"execute_async_v3: tensor {name}: {exc}")
                return False
        header, session = self.engine.header, self.engine._session_()
        inp = header["input"]["name"]
        fp16 = header["fp16"] and not header["int8"]
        fp32_tail = bool(header["fp32_layers"])
        record = {"shape": self.input_shape, "addresses": dict(self.addresses), "stream": int(stream_handle)}

        def run() -> None:
            x = np.array(views[inp], np.float32)
            if fp16:
                x = x.astype(np.float16).astype(np.float32)
            outs = session.run(None, {inp: x})
            for meta, value in zip(header["outputs"], outs, strict=True):
                if fp16 and not (fp32_tail and meta["name"] in ("anomaly_map", "score")):
                    value = value.astype(np.float16)  # an FP16 engine: the unconstrained tail loses precision
                views[meta["name"]][...] = value.astype(views[meta["name"]].dtype)

        op = run
        stream = sim.streams.get(int(stream_handle))
        if stream is not None and stream.capture is not None:  # captured into a graph: valid only for this generation
            captured = self.generation

            def op() -> None:
                if self.generation != captured:
                    raise IndexError("CUDA graph replayed after the execution context's shapes changed (stale TensorRT scratch memory)")
                run()

        err = sim.enqueue(stream_handle, op, "execute_async_v3")
        if err:
            log.log(Logger.ERROR, f"execute_async_v3: {err.name}")
            return False
        self.runs.append(record)
        return True


def write_plan_for(onnx_path: str | Path, precision: str = "fp16", max_batch: int = 16) -> bytes:
    """A plan as the fake builder would write it (for tests that need an engine without running edgead build)."""
    logger = Logger()
    builder = Builder(logger)
    network = builder.create_network(0)
    if not OnnxParser(network, logger).parse_from_file(str(onnx_path)):
        raise ValueError("unparsable ONNX for the simulated builder")
    config = builder.create_builder_config()
    if precision in ("fp16", "int8"):
        config.set_flag(BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    shape = list(inp.shape[1:])
    profile.set_shape(inp.name, Dims([1, *shape]), Dims([max_batch, *shape]), Dims([max_batch, *shape]))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    return bytes(memoryview(plan))
