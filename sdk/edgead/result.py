"""The result of one inference: image score, anomaly map, decision and per-stage timings.

>>> r = Result(score=0.7, anomaly_map=np.zeros((4, 4), np.float32), is_anomalous=True, threshold=0.5, timings={})
>>> r.decision
'NG'
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Result"]


@dataclass(frozen=True)
class Result:
    """One frame's outcome. ``anomaly_map`` is float32 (H, W); ``timings`` are milliseconds.

    ``timings`` keys: ``preprocess``, ``inference``, ``postprocess``, ``total``; in ``infer_batch``
    they are the chunk's times divided by the frames in the chunk (amortised per frame). ``finite`` is
    False when the model produced NaN/inf; such a result is always NG (fail safe).
    """

    score: float
    anomaly_map: np.ndarray
    is_anomalous: bool
    threshold: float
    timings: dict[str, float] = field(default_factory=dict)
    finite: bool = True  # False: the model gave a NaN/inf score or map, decided NG whatever the threshold

    @property
    def decision(self) -> str:
        """``"NG"`` (anomalous: score > threshold, or a non-finite model output) or ``"OK"``."""
        return "NG" if self.is_anomalous else "OK"

    def __repr__(self) -> str:
        return f"Result({self.decision}, score={self.score:.4f}, threshold={self.threshold:.4f}, map={self.anomaly_map.shape}, total={self.timings.get('total', float('nan')):.2f} ms)"
