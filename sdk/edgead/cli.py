"""The `edgead` command: one entry point, subcommands implemented in their own modules.

Each subcommand module exposes ``main(argv: list[str] | None) -> int`` and is imported
only when that subcommand runs, so `edgead --help` stays fast and torch-free.
"""

from __future__ import annotations

import importlib
import logging
import sys

from .errors import EdgeADError, message
from .registry import check_choice

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "datagen": ("build_engines.synthetic", "write a synthetic MVTec-layout dataset with structural and logical defects"),
    "distill": ("build_engines.efficientad.distill", "distil a PDN teacher from a pretrained backbone on an image folder"),
    "train": ("build_engines.efficientad.train", "train EfficientAD (student + autoencoder) on good images and calibrate it"),
    "probe": ("build_engines.probe", "feature probe: PatchCore-style image AUROC of a feature extractor, no training"),
    "eval": ("build_engines.evaluate", "evaluate a run on a test set: AUROC, AU-PRO, F1-max, overlays"),
    "export": ("build_engines.export", "export a run to a bundle (simplified ONNX + manifest)"),
    "fidelity": ("build_engines.fidelity", "how faithfully bf16/int8 reproduce fp32 on a data set; --record lets auto use them"),
    "build": ("build_engines.trt_build", "compile a TensorRT engine into a bundle (needs TensorRT)"),
    "bench": ("build_engines.bench", "latency / throughput benchmark of a bundle (JSON output)"),
    "serve": ("edgead.serve", "serve bundles to many cameras from one box: NVIDIA Triton Inference Server (edgead[serve])"),
    "doctor": ("edgead.doctor", "what this machine can run and why: ONNX Runtime, CUDA driver/runtime, GPUs, TensorRT, kernels, a bundle's engines"),
    "demo": ("build_engines.demo", "end-to-end demo: synthetic data -> train -> eval -> export -> Detector"),
}


def _usage() -> str:
    lines = ["usage: edgead <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "run 'edgead <command> --help' for the options of one command"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    try:
        name = check_choice("command", argv[0], COMMANDS)
        module_name, _ = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name.split(".")[0] in ("torch", "onnx", "onnxsim", "tensorrt", "tqdm")):
                raise EdgeADError(
                    message(f"edgead {name}", f"missing package '{exc.name}'", "the toolchain extra", "pip install 'edgead[train]'")
                ) from exc
            raise
        return int(module.main(argv[1:]) or 0)
    except EdgeADError as exc:
        print(f"edgead: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgead: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
