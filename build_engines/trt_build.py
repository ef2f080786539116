"""Compile a bundle's ONNX graph into a TensorRT 10 engine (plan) on the target device.

A plan is specific to the GPU (compute capability) and the TensorRT version that built it,
so build on the machine that runs it (Jetson included), then the bundle records it:

    edgead build BUNDLE [--variant merged|raw|merged_int8] [--precision fp16|fp32|int8]
                        [--max-batch 16] [--opt-batch N] [--workspace-mb 2048] [--timing-cache PATH]

The pure parts (argument checks, optimisation-profile shapes, file naming, manifest entries)
are separate from the thin TensorRT calls so that they are tested on machines without a GPU.
TensorRT is imported lazily; without it ``MissingDependencyError`` names the ``tensorrt`` extra.

>>> meta = build_engine("bundle/model_merged.onnx", "bundle/merged.engine", precision="fp16")  # doctest: +SKIP
>>> meta.max_batch
16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgead.backends.cuda import DeviceInfo, device_info  # the GPU a plan is built for
from edgead.backends.tensorrt import import_tensorrt as _import_tensorrt
from edgead.errors import BackendError, ConfigError, message
from edgead.registry import check_choice

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "BUILD_PRECISIONS",
    "BuildSettings",
    "EngineMeta",
    "DeviceInfo",
    "check_build_args",
    "profile_shapes",
    "engine_file_name",
    "engine_entry",
    "check_variant_precision",
    "check_int8_graph",
    "import_tensorrt",
    "device_info",
    "build_engine",
    "build_into_bundle",
    "main",
]

log = logging.getLogger(__name__)

BUILD_PRECISIONS: tuple[str, ...] = ("fp16", "fp32", "int8")
DEFAULT_WORKSPACE_MB = 2048
MAX_BATCH_LIMIT = 256


@dataclass(frozen=True)
class BuildSettings:
    """Validated build arguments."""

    precision: str
    max_batch: int
    opt_batch: int
    workspace_mb: int


@dataclass(frozen=True)
class EngineMeta:
    """What ``build_engine`` produced."""

    path: Path
    precision: str
    tensorrt_version: str
    compute_capability: str
    device_name: str
    max_batch: int
    opt_batch: int
    bytes: int
    build_seconds: float
    fp32_layers: int = 0


def check_build_args(precision: str, max_batch: int, opt_batch: int | None = None, workspace_mb: int = DEFAULT_WORKSPACE_MB) -> BuildSettings:
    """Validate the build options; ``opt_batch`` defaults to ``max_batch`` (the throughput case).

    >>> check_build_args("FP16", 16)
    BuildSettings(precision='fp16', max_batch=16, opt_batch=16, workspace_mb=2048)
    """
    precision = check_choice("precision", precision, BUILD_PRECISIONS)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ConfigError(message("max_batch", max_batch, f"an integer in 1..{MAX_BATCH_LIMIT}", "pass --max-batch 16"))
    opt = max_batch if opt_batch is None else opt_batch
    if isinstance(opt, bool) or not isinstance(opt, int) or not 1 <= opt <= max_batch:
        raise ConfigError(message("opt_batch", opt_batch, f"an integer in 1..max_batch ({max_batch})", "omit --opt-batch or pass a value <= --max-batch"))
    if isinstance(workspace_mb, bool) or not isinstance(workspace_mb, int) or workspace_mb < 16:
        raise ConfigError(message("workspace_mb", workspace_mb, "an integer >= 16 (MiB)", "pass --workspace-mb 2048"))
    return BuildSettings(precision, max_batch, opt, workspace_mb)


def profile_shapes(image_size: int, max_batch: int, opt_batch: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) NCHW shapes of the optimisation profile for the ``image`` input.

    >>> profile_shapes(256, 16, 4)
    ((1, 3, 256, 256), (4, 3, 256, 256), (16, 3, 256, 256))
    """
    if not 1 <= opt_batch <= max_batch:
        raise ConfigError(message("batch range", (opt_batch, max_batch), "1 <= opt_batch <= max_batch", "check --opt-batch / --max-batch"))
    return (1, 3, image_size, image_size), (opt_batch, 3, image_size, image_size), (max_batch, 3, image_size, image_size)


def engine_file_name(variant: str, precision: str, compute_capability: str, tensorrt_version: str) -> str:
    """File name of a plan in the bundle: ``{variant}_{precision}_sm{cc}_trt{version}.engine``.

    >>> engine_file_name("merged", "fp16", "8.7", "10.3.0.30")
    'merged_fp16_sm87_trt10.3.0.30.engine'
    """
    cc = compute_capability.replace(".", "")
    if not cc.isdigit():
        raise ConfigError(message("compute capability", repr(compute_capability), "'major.minor' like '8.7'", "check the GPU driver / cuda-python"))
    return f"{variant}_{precision}_sm{cc}_trt{tensorrt_version}.engine"


def check_variant_precision(variant: str, precision: str, available: list[str] | tuple[str, ...]) -> str:
    """INT8 engines compile the QDQ graph ``merged_int8``; fp16/fp32 compile ``merged`` or ``raw``."""
    if variant not in available:
        raise ConfigError(message("variant", repr(variant), f"one of the bundle's variants {sorted(available)}", "pass --variant merged (or re-export with that variant)"))
    if precision == "int8" and variant != "merged_int8":
        raise ConfigError(message("precision int8", f"variant '{variant}'", "variant 'merged_int8' (INT8 QDQ graph)", "re-export with 'edgead export RUN --out BUNDLE --int8 --overwrite' and pass --variant merged_int8"))
    if variant == "merged_int8" and precision != "int8":
        raise ConfigError(message("variant merged_int8", f"precision '{precision}'", "precision 'int8'", "pass --precision int8"))
    return variant


def check_int8_graph(onnx_path: str | Path) -> int:
    """Refuse a QDQ graph TensorRT cannot build: every Quantize/DequantizeLinear zero point must be INT8 and 0.

    Returns the number of QDQ nodes. ONNX Runtime-targeted INT8 exports (U8 activations) fail here.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    constants = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        raise ConfigError(message("INT8 graph", f"{Path(onnx_path).name} without QuantizeLinear/DequantizeLinear nodes", "an INT8 QDQ graph", "re-export with 'edgead export RUN --out BUNDLE --int8 --int8-target tensorrt --overwrite'"))
    for node in qdq:
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if not zp_name:
            continue  # absent zero point = 0 (uint8 by default only for QuantizeLinear without zero point: type from y_scale)
        tensor = inits.get(zp_name) or constants.get(zp_name)
        zp = numpy_helper.to_array(tensor) if tensor is not None else None
        if zp is None or zp.dtype != np.int8 or np.any(zp != 0):
            got = "unknown" if zp is None else f"{zp.dtype} zero point {zp.ravel()[:1].tolist()}"
            raise ConfigError(
                message("INT8 graph for TensorRT", f"{node.op_type} '{node.name}' with {got}", "signed INT8 with zero point 0 (symmetric)", "re-export with 'edgead export RUN --out BUNDLE --int8 --int8-target tensorrt --overwrite'")
            )
    return len(qdq)


def engine_entry(meta: EngineMeta, variant: str, built_at: str | None = None) -> Any:
    """The manifest entry (``edgead.bundle.EngineEntry``) of a plan built by ``build_engine``."""
    from edgead.bundle import EngineEntry

    return EngineEntry(
        file=meta.path.name,
        variant=variant,
        precision=meta.precision,
        tensorrt_version=meta.tensorrt_version,
        compute_capability=meta.compute_capability,
        device_name=meta.device_name,
        max_batch=meta.max_batch,
        built_at=built_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        fp32_layers=meta.fp32_layers,
    )


# --- thin TensorRT / CUDA layer -----------------------------------------------------------------


def import_tensorrt() -> Any:
    """Import TensorRT with its builder, or raise MissingDependencyError naming the ``tensorrt`` extra."""
    return _import_tensorrt("building a TensorRT engine", needs="Builder")


def _parse_onnx(trt_mod: Any, builder: trt.Builder, logger: trt.ILogger, onnx_path: Path) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    # TensorRT 10: networks are always explicit-batch; EXPLICIT_BATCH is deprecated and ignored, so pass no flag.
    network = builder.create_network(0)
    parser: trt.OnnxParser = trt_mod.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(message("TensorRT ONNX parser", f"{onnx_path.name}: " + " | ".join(errors or ["unknown error"]), "a graph TensorRT 10 parses", "re-export with opset 17; check build_engines.onnx_ops.unsupported_ops"))
    return network, parser


# The map tail is what the exported graphs compute at their top level, outside their networks: PyTorch names those
# ONNX nodes "/Op" or "/Op_N" (the ONNX parser names a node's layers after it, "/Op_N_12" for extra ones), and every
# node of a network submodule "/module/..." (EfficientAD's raw networks, the backbone grid, UniAD's transformer).
# Nodes onnxsim made by fusing (UniAD's Linear layers) have no name: the parser calls them "node_of_<output>", and
# they are network layers too.
_TAIL_NAME = re.compile(r"/[^/]+")
_IN_NETWORK = re.compile(r"/[^/]+/")


def map_tail_layers(trt_mod: Any, network: trt.INetworkDefinition) -> list[trt.ILayer]:
    """The layers of the anomaly-map tail: floating-point layers with top-level PyTorch node names (never a
    quantize / dequantize or shape layer), plus the constants and shuffles outside any network that feed only them
    (the memory bank, the quantile constants, the parser's broadcast reshapes of them)."""
    lt = trt_mod.LayerType
    layers = [network.get_layer(i) for i in range(network.num_layers)]

    def floating(layer: trt.ILayer) -> bool:
        return all(layer.get_output(k).dtype in (trt_mod.float32, trt_mod.float16) for k in range(layer.num_outputs))

    tail = {i for i, layer in enumerate(layers)
            if _TAIL_NAME.fullmatch(layer.name) and layer.type not in (lt.QUANTIZE, lt.DEQUANTIZE, lt.SHAPE) and floating(layer)}
    readers: dict[str, set[int]] = {}
    for i, layer in enumerate(layers):
        for k in range(layer.num_inputs):
            t = layer.get_input(k)
            if t is not None:
                readers.setdefault(t.name, set()).add(i)
    for i in reversed(range(len(layers))):  # the parser adds layers in topological order
        layer = layers[i]
        if i in tail or layer.type not in (lt.CONSTANT, lt.SHUFFLE) or _IN_NETWORK.match(layer.name) or not floating(layer):
            continue
        outs = [readers.get(layer.get_output(k).name, set()) for k in range(layer.num_outputs)]
        if all(o and o <= tail for o in outs):
            tail.add(i)
    return [layers[i] for i in sorted(tail)]


def keep_map_tail_fp32(trt_mod: Any, network: trt.INetworkDefinition, config: trt.IBuilderConfig) -> int:
    """Hold the anomaly-map tail of a merged graph in FP32 and make TensorRT obey it; returns the layer count.

    With FP16 enabled TensorRT may run any layer in FP16. The tail (EfficientAD: squared differences, channel means
    over 384 channels, quantile affines, pad, max; UniAD: the feature-reconstruction distance and pooling; PatchCore:
    the standardisation and the distance GEMM ``|f|^2 - 2 f.b + |b|^2`` against the bank, whose terms of ~256 cancel)
    must not: squares of strong anomalies overflow FP16 (65504) and the rounding (~1e-3 relative) sits right at the
    decision threshold. The tail's layers (``map_tail_layers``) get ``precision = float32`` and FP32 outputs, with
    ``OBEY_PRECISION_CONSTRAINTS``; the networks stay free. (TensorRT 10.12+ prefers strongly typed networks;
    precision constraints still build on 10.3, JetPack 6's version.) A raw graph has no tail: 0 layers.
    """
    tail = map_tail_layers(trt_mod, network)
    outputs = {network.get_output(k).name for k in range(network.num_outputs)}
    if "score" in outputs:  # a merged graph: the layers writing its map and score must be in the tail
        held = {layer.get_output(k).name for layer in tail for k in range(layer.num_outputs)}
        if not {"anomaly_map", "score"} <= held:
            raise BackendError(message("FP32 map tail", f"{len(tail)} layers, not those writing anomaly_map and score",
                                       "the graph's map tail named at its top level (/Op_N), as EdgeAD's exporters write it",
                                       "re-export the bundle with 'edgead export RUN --out BUNDLE --overwrite', or build with --precision fp32"))
    if not tail:
        return 0
    for layer in tail:
        layer.precision = trt_mod.float32
        for k in range(layer.num_outputs):
            layer.set_output_type(k, trt_mod.float32)
    config.set_flag(trt_mod.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return len(tail)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str = "fp16",
    max_batch: int = 16,
    opt_batch: int | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
) -> EngineMeta:
    """Build a TensorRT plan from an ONNX file with a dynamic batch profile 1 / opt / max; write it pure.

    >>> build_engine("b/model_merged.onnx", "b/merged_fp16.engine", precision="fp16", max_batch=8)  # doctest: +SKIP
    """
    settings = check_build_args(precision, max_batch, opt_batch, workspace_mb)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ConfigError(message("ONNX file", str(onnx_path), "an existing .onnx file", "export first: edgead export RUN --out BUNDLE"))
    trt_mod = import_tensorrt()
    dev = device_info()
    logger: trt.ILogger = trt_mod.Logger(trt_mod.Logger.WARNING)
    builder: trt.Builder = trt_mod.Builder(logger)
    network, _parser = _parse_onnx(trt_mod, builder, logger, onnx_path)
    if network.num_inputs != 1:  # before get_input(0): a graph without inputs must not crash here
        raise BackendError(message("ONNX inputs", network.num_inputs, "one input (N,3,S,S) with a dynamic N", "export with build_engines.export"))
    inp: trt.ITensor = network.get_input(0)
    image_size = int(inp.shape[-1])
    if image_size <= 0:
        raise BackendError(message("ONNX input shape", str(inp.shape), "(N,3,S,S) with a static S", "export with build_engines.export"))
    config: trt.IBuilderConfig = builder.create_builder_config()
    config.set_memory_pool_limit(trt_mod.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if settings.precision in ("fp16", "int8"):
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast FP16; building anyway as requested")
        config.set_flag(trt_mod.BuilderFlag.FP16)
    if settings.precision == "int8":
        config.set_flag(trt_mod.BuilderFlag.INT8)  # explicit quantisation: scales come from the QDQ nodes
    fp32_layers = keep_map_tail_fp32(trt_mod, network, config) if settings.precision in ("fp16", "int8") else 0
    profile: trt.IOptimizationProfile = builder.create_optimization_profile()
    lo, opt, hi = profile_shapes(image_size, settings.max_batch, settings.opt_batch)
    profile.set_shape(inp.name, trt_mod.Dims(lo), trt_mod.Dims(opt), trt_mod.Dims(hi))
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache: trt.ITimingCache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False):  # a cache from another GPU / TensorRT: start a fresh one, keep building
        log.warning("timing cache %s does not match this GPU / TensorRT; building with a fresh timing cache (it replaces the file)", cache_path)
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, False):
            raise BackendError(message("TensorRT timing cache", "a fresh cache was refused", "an accepted timing cache", "build without --timing-cache"))
    t0 = time.perf_counter()
    plan: trt.IHostMemory | None = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise BackendError(message("TensorRT build", f"{onnx_path.name} at {settings.precision}", "a serialised engine", "read the TensorRT log above; try --workspace-mb 4096 or --precision fp32"))
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(memoryview(plan))  # the plan exactly as TensorRT serialised it: no header
    tmp.replace(engine_path)
    if cache_path is not None:
        final_cache = config.get_timing_cache()
        if final_cache is None:  # the engine is built and written: a missing cache only costs the next build time
            log.warning("TensorRT returned no timing cache; %s not updated", cache_path)
        else:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(memoryview(final_cache.serialize())))
    meta = EngineMeta(
        path=engine_path,
        precision=settings.precision,
        tensorrt_version=str(trt_mod.__version__),
        compute_capability=dev.compute_capability,
        device_name=dev.name,
        max_batch=settings.max_batch,
        opt_batch=settings.opt_batch,
        bytes=engine_path.stat().st_size,
        build_seconds=seconds,
        fp32_layers=fp32_layers,
    )
    log.info("built %s (%s, %.1f MB) for %s sm%s with TensorRT %s in %.1f s", engine_path, meta.precision, meta.bytes / 1e6, dev.name, dev.compute_capability, meta.tensorrt_version, seconds)
    return meta


def build_into_bundle(
    bundle: str | Path,
    *,
    variant: str = "merged",
    precision: str = "fp16",
    max_batch: int = 16,
    opt_batch: int | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
) -> EngineMeta:
    """Build a plan for one variant of a bundle and record it in the manifest (``edgead.bundle.add_engine``)."""
    import tempfile

    from edgead.bundle import add_engine, load_bundle

    check_build_args(precision, max_batch, opt_batch, workspace_mb)
    loaded = load_bundle(bundle)
    check_variant_precision(variant, check_choice("precision", precision, BUILD_PRECISIONS), tuple(loaded.manifest.variants))
    if precision.lower() == "int8":
        check_int8_graph(loaded.onnx_path(variant))
    trt_mod = import_tensorrt()
    dev = device_info()
    name = engine_file_name(variant, precision.lower(), dev.compute_capability, str(trt_mod.__version__))
    with tempfile.TemporaryDirectory(prefix="edgead-build-") as tmp:
        meta = build_engine(loaded.onnx_path(variant), Path(tmp) / name, precision=precision, max_batch=max_batch, opt_batch=opt_batch, workspace_mb=workspace_mb, timing_cache=timing_cache)
        add_engine(loaded.root, meta.path, engine_entry(meta, variant))
    return EngineMeta(**{**meta.__dict__, "path": Path(loaded.root) / name})


def main(argv: list[str] | None = None) -> int:
    """``edgead build BUNDLE [--variant merged] [--precision fp16] [--max-batch 16] [--timing-cache PATH]``."""
    parser = argparse.ArgumentParser(prog="edgead build", description="compile a TensorRT engine for this GPU into a bundle")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--variant", default="merged", help="merged (default), raw, or merged_int8 (with --precision int8)")
    parser.add_argument("--precision", default="fp16", help="fp16 (default), fp32 or int8")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--opt-batch", type=int, default=None, help="batch size TensorRT tunes for (default: --max-batch)")
    parser.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB)
    parser.add_argument("--timing-cache", type=Path, default=None, help="reuse / update a TensorRT timing cache file")
    args = parser.parse_args(argv)
    meta = build_into_bundle(
        args.bundle,
        variant=args.variant,
        precision=args.precision,
        max_batch=args.max_batch,
        opt_batch=args.opt_batch,
        workspace_mb=args.workspace_mb,
        timing_cache=args.timing_cache,
    )
    print(f"{meta.path} ({meta.precision}, max batch {meta.max_batch}, {meta.device_name} sm{meta.compute_capability}, TensorRT {meta.tensorrt_version})")
    return 0
