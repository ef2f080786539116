"""Benchmark: report structure, percentiles, FLOP count vs an independent count, torch baseline, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from build_engines.bench import count_flops, gemm_gflops, main, percentiles, run_bench
from build_engines.efficientad.models import EfficientAD, conv_flops
from build_engines.export import export_bundle
from build_engines.synthetic import make_image
from edgead.errors import ConfigError
from edgead.postprocess import EfficientADPost, QuantileAffine

SIZE = 128
POST = EfficientADPost(QuantileAffine(0.8, 2.5), QuantileAffine(0.3, 1.1), pad=4)


@pytest.fixture(scope="module")
def run_and_bundle(tmp_path_factory: pytest.TempPathFactory, make_run: Callable[..., Path]) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench")
    run = make_run(root / "run", SIZE, quantiles=(0.8, 2.5, 0.3, 1.1))
    good = root / "good"
    good.mkdir()
    for i in range(3):
        cv2.imwrite(str(good / f"{i}.png"), make_image(i, SIZE)[0])
    return run, export_bundle(run, root / "bundle", variants=("merged",), int8_calibration=good, int8_images=3)


def test_percentiles() -> None:
    p = percentiles(list(range(1, 101)))
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1) and p["p99"] == pytest.approx(99.01)
    assert p["n"] == 100 and p["min"] == 1 and p["max"] == 100
    with pytest.raises(ConfigError):
        percentiles([])


def test_flop_count_matches_torch_hooks(run_and_bundle: tuple[Path, Path]) -> None:
    _, bundle = run_and_bundle
    torch.manual_seed(0)
    ref = conv_flops(EfficientAD("s", SIZE).eval(), torch.zeros(1, 3, SIZE, SIZE))  # 75.9 GFLOP at 256: test_models
    got = count_flops(bundle / "model_merged.onnx")
    assert got["conv_flops"] == pytest.approx(ref, rel=1e-9)
    assert got["matmul_flops"] == 0


def test_gemm_rate_is_positive_and_consistent() -> None:
    g = gemm_gflops(n=256, repeats=2, threads=1)
    assert g["gflops"] > 0.1 and g["gflops"] >= g["median_gflops"] * 0.999
    assert g["best_s"] * g["gflops"] * 1e9 == pytest.approx(2 * 256**3)


def _quick_argv(bundle: Path, run: Path, out: Path, *extra: str) -> list[str]:
    """``edgead bench`` arguments for a short run on ONNX Runtime, with the torch baseline, JSON to ``out``."""
    quick = ["--backend", "onnxruntime", "--warmup", "1", "--batch", "2", "--batch-runs", "1", "--threads", "1", "--torch-runs", "2"]
    return [str(bundle), *quick, "--torch-baseline", str(run), "--json", str(out), *extra]


def test_run_bench_report(run_and_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    run, bundle = run_and_bundle
    out = tmp_path / "bench.json"
    assert main(_quick_argv(bundle, run, out, "--runs", "5")) == 0
    r = json.loads(out.read_text())
    lat = r["latency_ms"]
    assert lat["n"] == 5 and lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["config"]["backend"] == "onnxruntime" and r["config"]["variant"] == "merged" and r["config"]["batch"] == 2
    st = r["stages_ms_p50"]
    assert all(st[k] > 0 for k in ("preprocess", "inference", "postprocess"))
    assert st["inference"] <= st["total"] <= lat["p50"] * 3
    assert r["throughput_ips"] > 0 and r["achieved_gflops"] == pytest.approx(r["model_flops"]["total_flops"] * r["throughput_ips"] / 1e9)
    assert r["torch_baseline"]["latency_ms"]["n"] == 2 and r["speedup_vs_torch"]["throughput"] > 0
    assert r["gemm"]["gflops"] > 0 and 0 < r["fraction_of_gemm"]
    assert r["machine"]["versions"]["onnxruntime"]


def test_compare_backends_and_precisions_in_one_run(run_and_bundle: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, bundle = run_and_bundle
    out = tmp_path / "cmp.json"
    argv = _quick_argv(bundle, run, out, "--backend", "onnxruntime,openvino", "--precision", "fp32,bf16,int8", "--runs", "3")
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["skipped"] == {"onnxruntime/bf16": "bf16 runs on OpenVINO"}
    assert r["compare"] == list(r["results"]) == ["onnxruntime/fp32", "onnxruntime/int8", "openvino/fp32", "openvino/bf16", "openvino/int8"]
    res = r["results"]
    assert (res["onnxruntime/fp32"]["config"]["variant"], res["onnxruntime/int8"]["config"]["variant"]) == ("merged", "merged_int8")
    assert [res[k]["config"]["backend"] for k in ("openvino/fp32", "openvino/bf16", "openvino/int8")] == ["openvino"] * 3
    assert res["onnxruntime/fp32"]["model_flops"]["int8_conv_flops"] == 0 and res["openvino/int8"]["model_flops"]["int8_conv_flops"] > 0
    # one baseline and one GEMM, shared: every pair's ratios are against the same numbers; the BF16 GEMM beside them
    baseline, gemm = res["onnxruntime/fp32"]["torch_baseline"], res["onnxruntime/fp32"]["gemm"]
    for one in res.values():
        assert one["torch_baseline"] == baseline and one["gemm"] == gemm
        assert one["speedup_vs_torch"]["throughput"] == pytest.approx(one["throughput_ips"] / baseline["throughput_ips"])
        assert one["fraction_of_gemm"] == pytest.approx(one["achieved_gflops"] / gemm["gflops"])
    assert r["gemm_bf16"]["dtype"] == "bfloat16" and r["gemm_bf16"]["gflops"] > 0
    assert "onnxruntime/bf16: skipped (bf16 runs on OpenVINO)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="to compare"):
        main([str(bundle), "--precision", "fp32,fp32"])
    with pytest.raises(ConfigError, match="precision"):
        main([str(bundle), "--precision", "fp32,int4"])


def test_an_unwritable_report_path_is_refused_before_the_benchmark(run_and_bundle: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import build_engines.bench as bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("benchmarked although the report cannot be written"))
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    for bad in (tmp_path / "a_dir", tmp_path / "a_file" / "report.json"):
        with pytest.raises(ConfigError, match="--json"):
            main([str(run_and_bundle[1]), "--json", str(bad)])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"runs": 0}, "runs"), ({"batch": -1}, "batch"), ({"warmup": -1}, "warmup"), ({"backend": "cuda"}, "backend"), ({"threads": 0}, "threads")],
)
def test_run_bench_refuses_bad_arguments(run_and_bundle: tuple[Path, Path], kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        run_bench(run_and_bundle[1], gemm=False, **kwargs)  # type: ignore[arg-type]


def test_synthetic_frame_is_deterministic_uint8() -> None:
    from build_engines.bench import synthetic_frame

    a, b = synthetic_frame(64), synthetic_frame(64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3) and np.array_equal(a, b)
