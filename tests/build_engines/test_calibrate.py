"""Calibration: quantile fit over all validation pixels, threshold methods, error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from build_engines.calibrate import calibrate, fit_quantiles, fit_threshold, parse_threshold_method
from build_engines.efficientad.models import EfficientAD
from edgead.errors import ConfigError, DataError

torch.set_num_threads(1)


def _sorted_quantile(values: np.ndarray, q: float) -> float:
    v = np.sort(values.astype(np.float64).ravel())
    pos = q * (v.size - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def test_fit_quantiles_pools_all_pixels_of_all_images() -> None:
    rng = np.random.default_rng(0)
    local = rng.gamma(2.0, size=(3, 6, 6)).astype(np.float32)
    glob = rng.gamma(1.0, size=(3, 6, 6)).astype(np.float32) * 0.01
    local[2] *= 5  # one image with larger values: per-image quantiles would differ from pooled ones
    st, ae = fit_quantiles(local, glob, 0.9, 0.995)
    assert st.qa == pytest.approx(_sorted_quantile(local, 0.9), rel=1e-9)
    assert st.qb == pytest.approx(_sorted_quantile(local, 0.995), rel=1e-9)
    assert ae.qa == pytest.approx(_sorted_quantile(glob, 0.9), rel=1e-9)
    assert ae.qb == pytest.approx(_sorted_quantile(glob, 0.995), rel=1e-9)
    assert st.qa != pytest.approx(np.mean([_sorted_quantile(m, 0.9) for m in local]))


def test_fit_quantiles_errors() -> None:
    flat = np.ones((2, 4, 4), np.float32)
    with pytest.raises(DataError, match="q_b > q_a"):
        fit_quantiles(flat, np.random.default_rng(0).random((2, 4, 4)))
    with pytest.raises(ConfigError, match="0 < qa < qb < 1"):
        fit_quantiles(np.random.default_rng(0).random((1, 4, 4)), np.random.default_rng(1).random((1, 4, 4)), qa=0.99, qb=0.9)
    bad = np.random.default_rng(0).random((1, 4, 4))
    bad[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="finite"):
        fit_quantiles(bad, bad)


def test_threshold_methods() -> None:
    scores = np.array([0.3, 0.1, 0.7, 0.2, 0.5])
    thr, how = fit_threshold(scores, "max")
    assert thr == 0.7 and how == "max of 5 validation-good image scores"
    thr, how = fit_threshold(scores, "quantile:0.5")
    assert thr == pytest.approx(0.3) and "quantile 0.5" in how and "5 validation" in how
    thr, _ = fit_threshold(scores, "quantile:0.9")
    assert thr == pytest.approx(_sorted_quantile(scores, 0.9))
    assert parse_threshold_method(" MAX ") == ("max", None)


@pytest.mark.parametrize("method", ["median", "quantile:1.5", "quantile:x", "quantile:0"])
def test_bad_threshold_method(method: str) -> None:
    with pytest.raises(ConfigError, match="threshold method"):
        fit_threshold([0.1, 0.2], method)


def test_threshold_needs_scores() -> None:
    with pytest.raises(DataError):
        fit_threshold([], "max")


def test_calibrate_matches_independent_computation() -> None:
    torch.manual_seed(0)
    model = EfficientAD("s", 128)
    with torch.no_grad():  # non-trivial teacher normalisation
        model.teacher_mean.uniform_(-0.1, 0.1)
        model.teacher_std.uniform_(0.5, 2.0)
    images = np.random.default_rng(0).normal(size=(3, 3, 128, 128)).astype(np.float32)
    model.train()
    cal = calibrate(model, images, threshold_method="quantile:0.5", batch_size=2)
    assert model.training  # the caller's mode is restored
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(images)
        t = ((model.teacher(x) - model.teacher_mean) / model.teacher_std).double()
        s = model.student(x).double()
        a = model.autoencoder(x).double()
    local = ((t - s[:, :384]) ** 2).mean(1).numpy()
    glob = ((a - s[:, 384:]) ** 2).mean(1).numpy()
    assert cal.qa_st == pytest.approx(_sorted_quantile(local, 0.9), rel=1e-5)
    assert cal.qb_ae == pytest.approx(_sorted_quantile(glob, 0.995), rel=1e-5)
    merged = 0.05 * (local - cal.qa_st) / (cal.qb_st - cal.qa_st) + 0.05 * (glob - cal.qa_ae) / (cal.qb_ae - cal.qa_ae)
    scores = merged.reshape(3, -1).max(1)  # edge padding adds no value
    assert cal.threshold == pytest.approx(float(np.median(scores)), rel=1e-4)
    assert cal.validation_images == 3 and "quantile 0.5" in cal.threshold_method


def test_calibrate_refuses_empty_validation_set() -> None:
    with pytest.raises(DataError, match="at least one"):
        calibrate(EfficientAD("s", 128), np.zeros((0, 3, 128, 128), np.float32))


def test_sigma_rule_and_per_image_scores() -> None:
    from build_engines.calibrate import frame_scores, parse_threshold_method

    v = np.array([0.1, 0.2, 0.4, 0.3])
    thr, how = fit_threshold(v, "sigma:3")
    assert thr == pytest.approx(v.mean() + 3 * v.std()) and "mean + 3 std of 4" in how
    assert parse_threshold_method("SIGMA:2.5") == ("sigma", 2.5)
    for bad in ("sigma:-1", "sigma:x", "quantile:1", "median"):
        with pytest.raises(ConfigError, match="threshold method"):
            parse_threshold_method(bad)
    assert frame_scores(np.array([0.1, 0.5, 0.2, -0.3]), np.array([0, 0, 2, 1])).tolist() == [0.5, -0.3, 0.2]
    with pytest.raises(ConfigError, match="groups"):
        frame_scores(np.zeros(3), np.zeros(2, int))


def test_model_maps_are_the_maps_of_the_whole_outputs_batch_by_batch() -> None:
    """Calibration keeps only the one-channel maps per batch (a tiled set has hundreds of tiles); the result must not
    depend on the batch size and must equal the maps of the full teacher/student/autoencoder outputs."""
    import torch

    from build_engines.calibrate import model_maps
    from build_engines.efficientad.models import EfficientAD
    from edgead.postprocess import efficientad_maps

    torch.manual_seed(0)
    model = EfficientAD("s", 128).eval()
    x = np.random.default_rng(0).standard_normal((5, 3, 128, 128)).astype(np.float32)
    with torch.no_grad():
        t, s, a = (o.numpy() for o in model(torch.from_numpy(x)))
    ref_local, ref_glob = efficientad_maps(t, s, a)
    for batch in (1, 2, 5):
        local, glob = model_maps(model, x, batch_size=batch)
        np.testing.assert_allclose(local, ref_local, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(glob, ref_glob, rtol=1e-5, atol=1e-6)


def test_the_default_threshold_rule_is_the_documented_one() -> None:
    from build_engines.calibrate import DEFAULT_THRESHOLD
    from build_engines.efficientad.train import TrainConfig
    from build_engines.uniad.train import UniADConfig

    assert DEFAULT_THRESHOLD == "sigma:4"
    assert TrainConfig(data="d", out="o").threshold_method == DEFAULT_THRESHOLD
    assert UniADConfig(data=["d"], out="o").threshold_method == DEFAULT_THRESHOLD
