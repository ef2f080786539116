"""The NumPy post-processing reference against independent formulations (torch, cv2)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgead.errors import ConfigError, InputError
from edgead.postprocess import EfficientADPost, QuantileAffine, efficientad_maps, efficientad_postprocess, image_scores, resize_bilinear


def _outputs(rng: np.random.Generator, n: int = 2, c: int = 5, h: int = 7, w: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = rng.normal(size=(n, c, h, w)).astype(np.float32)
    s = rng.normal(size=(n, 2 * c, h, w)).astype(np.float32)
    a = rng.normal(size=(n, c, h, w)).astype(np.float32)
    return t, s, a


def test_maps_match_explicit_loops() -> None:
    rng = np.random.default_rng(0)
    t, s, a = _outputs(rng)
    local, glob = efficientad_maps(t, s, a)
    n, c, h, w = t.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                exp_l = sum((float(t[i, k, y, x]) - float(s[i, k, y, x])) ** 2 for k in range(c)) / c
                exp_g = sum((float(a[i, k, y, x]) - float(s[i, c + k, y, x])) ** 2 for k in range(c)) / c
                assert local[i, y, x] == pytest.approx(exp_l, rel=1e-6)
                assert glob[i, y, x] == pytest.approx(exp_g, rel=1e-6)


def test_quantile_affine_sends_qa_to_0_and_qb_to_01() -> None:
    q = QuantileAffine(2.0, 6.0)
    np.testing.assert_allclose(q.apply(np.array([2.0, 6.0, 4.0])), [0.0, 0.1, 0.05])


@pytest.mark.parametrize("pad", [0, 4])
def test_merged_map_padding_and_score(pad: int) -> None:
    rng = np.random.default_rng(1)
    t, s, a = _outputs(rng)
    post = EfficientADPost(QuantileAffine(0.5, 2.5), QuantileAffine(1.0, 3.0), pad)
    maps, scores = efficientad_postprocess(t, s, a, post)
    local, glob = efficientad_maps(t, s, a)
    inner = 0.5 * 0.1 * (local - 0.5) / 2.0 + 0.5 * 0.1 * (glob - 1.0) / 2.0
    assert maps.shape == (2, 7 + 2 * pad, 9 + 2 * pad)
    np.testing.assert_allclose(maps[:, pad : pad + 7, pad : pad + 9], inner, rtol=1e-5, atol=1e-7)
    for y in range(maps.shape[1]):  # edge padding: every border cell repeats the nearest computed cell
        for x in range(maps.shape[2]):
            iy, ix = min(max(y - pad, 0), 6), min(max(x - pad, 0), 8)
            np.testing.assert_allclose(maps[:, y, x], inner[:, iy, ix], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores, inner.reshape(2, -1).max(1), rtol=1e-5)  # the band never adds a value


@pytest.mark.parametrize(("h", "w", "oh", "ow"), [(64, 64, 256, 256), (7, 9, 13, 5), (64, 64, 261, 640), (5, 5, 5, 5)])
def test_resize_matches_cv2_inter_linear(h: int, w: int, oh: int, ow: int) -> None:
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(2, h, w)).astype(np.float32)
    out = resize_bilinear(maps, oh, ow)
    for i in range(2):
        ref = cv2.resize(maps[i], (ow, oh), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-5)


def test_resize_matches_torch_align_corners_false() -> None:
    import torch  # pinned in the dev environment: missing is a failure, not a skip

    rng = np.random.default_rng(3)
    maps = rng.normal(size=(3, 64, 64)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(200, 333), mode="bilinear", align_corners=False)[:, 0].numpy()
    # torch computes source coordinates in float32, so allow for that rounding (values are O(1))
    np.testing.assert_allclose(resize_bilinear(maps, 200, 333), ref, rtol=0, atol=5e-5)


def test_image_scores_is_per_image_max() -> None:
    maps = np.array([[[-3.0, -1.0]], [[2.0, 5.0]]], np.float32)
    np.testing.assert_array_equal(image_scores(maps), [-1.0, 5.0])


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="qb > qa"):
        QuantileAffine(1.0, 1.0)
    with pytest.raises(ConfigError, match="pad"):
        EfficientADPost(QuantileAffine(0, 1), QuantileAffine(0, 1), -1)
    rng = np.random.default_rng(4)
    t, s, a = _outputs(rng)
    with pytest.raises(InputError, match="student"):
        efficientad_maps(t, s[:, :5], a)
    with pytest.raises(InputError, match="NCHW"):
        efficientad_maps(t[0], s, a)
    with pytest.raises(InputError, match="output size"):
        resize_bilinear(np.zeros((1, 2, 2), np.float32), 0, 3)
