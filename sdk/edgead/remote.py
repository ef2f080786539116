"""``RemoteDetector``: the ``Detector`` API against a model served by ``edgead serve`` (Triton Inference Server).

Frames go over the wire as the camera delivered them (uint8 / uint16, any size; pre-processing runs on the server)
and the reply is the same ``Result`` a local ``Detector`` gives. The anomaly map comes back at model resolution by
default (small); ``map_size="frame"`` or ``(h, w)`` asks the server for that size instead.

    >>> det = RemoteDetector("http://gpu-box:8000", "station3")  # doctest: +SKIP
    >>> det.infer(frame).decision  # doctest: +SKIP
    'OK'

HTTP (``http://host:8000``, the default scheme) or gRPC (``grpc://host:8001``). A failed call is retried with
exponential backoff when the failure can pass (server unreachable or restarting, queue full, timeout); then it
raises ``RemoteError`` whose ``kind`` says which: ``unreachable``, ``timeout``, ``overloaded``, ``unknown_model``,
``rejected`` (the server refused this frame: its message says why) or ``protocol``.

Each thread gets its own client connection (tritonclient's HTTP client is gevent-based and must stay on the thread
that made it), so one ``RemoteDetector`` can serve several camera threads.
"""

from __future__ import annotations

import http.client
import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .errors import ConfigError, EdgeADError, InputError, MissingDependencyError, message
from .preprocess import check_frame
from .registry import COLORS, check_choice
from .result import Result

__all__ = ["RemoteDetector", "RemoteError", "wire_map_size"]

log = logging.getLogger(__name__)

KINDS = ("unreachable", "timeout", "overloaded", "unknown_model", "rejected", "protocol")
_REPLY = ("score", "threshold", "anomalous", "finite", "anomaly_map", "server_ms", "batch_size", "error")
_RETRYABLE = ("unreachable", "timeout", "overloaded")


class RemoteError(EdgeADError):
    """A call to the inference server failed; ``kind`` is one of ``KINDS``, ``retryable`` whether waiting may help."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind

    @property
    def retryable(self) -> bool:
        return self.kind in _RETRYABLE


def wire_map_size(map_size: object) -> tuple[int, int]:
    """The ``map_size`` request input: (0, 0) model resolution, (-1, -1) the frame's size, else (h, w).

    >>> wire_map_size("model"), wire_map_size("frame"), wire_map_size((120, 160))
    ((0, 0), (-1, -1), (120, 160))
    """
    from .detector import _check_map_size

    size = _check_map_size(map_size)
    return (0, 0) if size == "model" else (-1, -1) if size == "frame" else size  # type: ignore[return-value]


def _parse_url(url: str) -> tuple[str, str]:
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(message("server url", repr(url), "http://HOST:PORT or grpc://HOST:PORT", "pass e.g. http://127.0.0.1:8000"))
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "grpc") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(message("server url", repr(url), "http://HOST:PORT or grpc://HOST:PORT", "pass e.g. http://127.0.0.1:8000"))
    port = parts.port or (8000 if parts.scheme == "http" else 8001)
    return parts.scheme, f"{parts.hostname}:{port}"


class RemoteDetector:
    """Score frames on an ``edgead serve`` model; same ``infer`` / ``infer_batch`` / ``Result`` as ``Detector``.

    ``threshold`` overrides the served bundle's threshold on this client; ``product`` picks the product of a
    multi-product (UniAD) bundle. ``timeout_s`` bounds each attempt; ``retries`` more attempts follow a retryable
    failure, ``backoff_s`` apart, doubling up to ``max_backoff_s``. The server and model are checked here, so a wrong
    URL or model name fails at construction with the models the server does serve.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        version: int | None = None,
        threshold: float | None = None,
        product: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        max_backoff_s: float = 2.0,
        map_size: str | tuple[int, int] = "model",
    ) -> None:
        self._protocol, self._address = _parse_url(url)
        if not isinstance(model, str) or not model:
            raise ConfigError(message("model", repr(model), "the served model's name", "see the names 'edgead serve' prints"))
        for name, value, low in (("timeout_s", timeout_s, 0.01), ("backoff_s", backoff_s, 0.0), ("max_backoff_s", max_backoff_s, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                raise ConfigError(message(name, repr(value), f"a number >= {low}", f"pass {name}=..."))
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 100:
            raise ConfigError(message("retries", repr(retries), "an int in 0..100", "pass retries=3"))
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not math.isfinite(float(threshold))):
            raise ConfigError(message("threshold", repr(threshold), "a finite number or None", "pass threshold=None to use the bundle's"))
        self._model = model
        self._version = "" if version is None else str(int(version))
        self._threshold = None if threshold is None else float(threshold)
        self._product = product
        self._timeout = float(timeout_s)
        self._retries = retries
        self._backoff = float(backoff_s)
        self._max_backoff = float(max_backoff_s)
        self._map_size = wire_map_size(map_size)
        self._clients: dict[int, Any] = {}  # thread id (0: the shared gRPC client) -> client
        self._clients_lock = threading.Lock()
        self._closed = False
        self._module = self._import_client()
        try:
            self.max_batch = self._retrying(self._check_model)
        except BaseException:
            self.close()  # the connection opened for the check is closed on this thread, not left to the GC
            raise

    # ------------------------------------------------------------------ connection
    def _import_client(self) -> Any:
        try:
            if self._protocol == "grpc":
                import tritonclient.grpc as module
            else:
                import tritonclient.http as module
            from tritonclient.utils import InferenceServerException
        except ImportError as exc:
            raise MissingDependencyError(f"tritonclient[{self._protocol}]", "remote", "RemoteDetector") from exc
        self._server_exception = InferenceServerException
        return module

    def _client_key(self) -> int:
        return 0 if self._protocol == "grpc" else threading.get_ident()

    def _client(self) -> Any:
        """This thread's HTTP connection (gevent-based: it stays on its thread), or the shared gRPC client."""
        key = self._client_key()
        with self._clients_lock:
            if self._closed:
                raise ConfigError(message("RemoteDetector", "a closed detector", "an open one", "create a new RemoteDetector"))
            client = self._clients.get(key)
            if client is None:
                if self._protocol == "grpc":
                    client = self._module.InferenceServerClient(self._address)
                else:
                    client = self._module.InferenceServerClient(self._address, connection_timeout=self._timeout, network_timeout=self._timeout)
                    alive = {t.ident for t in threading.enumerate()}
                    for ident in [k for k in self._clients if k not in alive]:  # threads that ended leave their connection
                        _close_quietly(self._clients.pop(ident))
                self._clients[key] = client
        return client

    def _drop_client(self) -> None:
        """Forget this thread's connection (a restarted server leaves it dead); the next call opens a new one."""
        with self._clients_lock:
            client = self._clients.pop(self._client_key(), None)
        if client is not None:
            _close_quietly(client)

    def _call(self, client: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """A client call bounded by ``timeout_s`` (gRPC: a deadline; HTTP: the connection's network timeout)."""
        if self._protocol == "grpc":
            kwargs["client_timeout"] = self._timeout
        return getattr(client, method)(*args, **kwargs)

    def _check_model(self) -> int:
        client = self._client()
        if not self._call(client, "is_server_live"):
            raise RemoteError("unreachable", self._where("server is not live"))
        if not self._call(client, "is_model_ready", self._model, self._version):
            try:  # known but not ready (loading, or no such version) vs not served at all
                self._call(client, "get_model_metadata", self._model)
            except self._server_exception as exc:
                if _status(exc) in ("400", "404", "StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT") or "unknown model" in str(exc).lower():
                    raise self._unknown_model() from exc
                raise
            if self._version:
                raise RemoteError(
                    "unknown_model", message(f"model '{self._model}' on {self._url}", f"version {self._version}", "a served version", "drop version= (the server serves one version per model)")
                )
            raise RemoteError("unreachable", self._where(f"model '{self._model}' is not ready (still loading?)"))
        config = self._call(client, "get_model_config", self._model, self._version)
        config = config.get("config", config) if isinstance(config, dict) else _grpc_config(config)
        return max(1, int(config.get("max_batch_size", 1) or 1))

    def _unknown_model(self) -> RemoteError:
        return RemoteError(
            "unknown_model",
            message(f"model on {self._url}", repr(self._model), "a model this server serves", "pass a name 'edgead serve' printed at start-up (the bundle folder's name unless --name)"),
        )

    @property
    def _url(self) -> str:
        return f"{self._protocol}://{self._address}"

    def _where(self, what: str) -> str:
        return message(f"inference server {self._url}", what, "a running 'edgead serve' with this model", "start the server or check --server / the network")

    # ------------------------------------------------------------------ calls
    def _retrying(self, call: Any, *args: Any) -> Any:
        delay = min(self._backoff, self._max_backoff)
        for attempt in range(self._retries + 1):
            try:
                return call(*args)
            except EdgeADError as exc:
                if not isinstance(exc, RemoteError):
                    raise
                err = exc
            except Exception as exc:  # noqa: BLE001 - every client failure is classified; unknown ones become 'protocol'
                err = self._classify(exc)
                err.__cause__ = exc
            if err.kind in ("unreachable", "timeout"):
                self._drop_client()
            if not err.retryable or attempt == self._retries:
                raise err
            wait = delay * random.uniform(0.5, 1.0)  # jitter: K cameras do not retry in lockstep after a restart
            log.warning("%s (attempt %d of %d); retrying in %.2f s", err, attempt + 1, self._retries + 1, wait)
            time.sleep(wait)
            delay = min(self._max_backoff, delay * 2 if delay else self._backoff)
        raise AssertionError("unreachable")  # pragma: no cover

    def _classify(self, exc: BaseException) -> RemoteError:
        """A client failure as a RemoteError: by Triton's status for server replies, by type for the transport."""
        if isinstance(exc, self._server_exception):
            status, text = _status(exc), (exc.message() or str(exc))
            low = text.lower()
            if "maximum queue size" in low:
                return RemoteError(
                    "overloaded",
                    message(f"model '{self._model}' on {self._url}", "queue full (request rejected)", "a server with capacity", "fewer cameras per server, more --instances, or a larger --queue-limit"),
                )
            if status in ("504", "StatusCode.DEADLINE_EXCEEDED"):
                return RemoteError("timeout", self._where(f"no reply within {self._timeout:g} s"))
            if status in ("503", "StatusCode.UNAVAILABLE"):
                return RemoteError("unreachable", self._where(f"unavailable ({_short(text)})"))
            if status in ("404", "StatusCode.NOT_FOUND") or "unknown model" in low:
                return self._unknown_model()
            return RemoteError("protocol", message(f"request to {self._url}", f"status {status}: {_short(text)}", "a valid request", "check the frame and the server log"))
        if isinstance(exc, TimeoutError):
            return RemoteError("timeout", self._where(f"no reply within {self._timeout:g} s"))
        if isinstance(exc, (OSError, http.client.HTTPException)):  # refused, reset, closed mid-reply
            return RemoteError("unreachable", self._where(f"connection failed ({type(exc).__name__}: {_short(str(exc)) or 'no reply'})"))
        return RemoteError("protocol", message(f"request to {self._url}", f"{type(exc).__name__}: {_short(str(exc))}", "a valid reply", "check the server log"))

    def _request(self, frames: np.ndarray, color: str, product: str | None, map_size: tuple[int, int]) -> dict[str, np.ndarray]:
        m = self._module
        n = frames.shape[0]
        key = "frame_u8" if frames.dtype == np.uint8 else "frame_u16"
        tensors = [(key, frames), ("color", np.full((n, 1), color.encode(), np.object_)), ("map_size", np.tile(np.asarray(map_size, np.int32), (n, 1)))]
        if product is not None:
            tensors.append(("product", np.full((n, 1), product.encode(), np.object_)))
        inputs = []
        for name, array in tensors:
            dtype = "BYTES" if array.dtype == np.object_ else {np.uint8: "UINT8", np.uint16: "UINT16", np.int32: "INT32"}[array.dtype.type]
            t = m.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            inputs.append(t)
        outputs = [m.InferRequestedOutput(k) for k in _REPLY]
        reply = self._call(self._client(), "infer", self._model, inputs, model_version=self._version, outputs=outputs)
        out = {k: reply.as_numpy(k) for k in _REPLY}
        bad = [k for k, v in out.items() if v is None or len(v) != n]
        if bad or out["anomaly_map"].ndim != 3:
            raise RemoteError("protocol", message(f"reply of {self._url}/{self._model}", f"outputs {bad or 'anomaly_map'} missing or not {n} rows", "the edgead serve contract", "serve the model with the same EdgeAD version"))
        return out

    # ------------------------------------------------------------------ the Detector API
    @property
    def model(self) -> str:
        return self._model

    @property
    def device(self) -> str:
        return f"remote {self._url}/{self._model}"

    @property
    def backend(self) -> str:
        """``"remote"``: the model runs on an inference server (its backend is the server's choice)."""
        return "remote"

    @property
    def threshold(self) -> float | None:
        """The client-side threshold override, or None (the served bundle's threshold decides)."""
        return self._threshold

    def infer(self, frame: np.ndarray, color: str = "bgr", map_size: str | tuple[int, int] | None = None, product: str | None = None) -> Result:
        """Score one frame on the server (HxW or HxWxC uint8/uint16)."""
        return self.infer_batch([frame], color, map_size, product)[0]

    def infer_batch(
        self, frames: Sequence[np.ndarray], color: str = "bgr", map_size: str | tuple[int, int] | None = None, product: str | None = None
    ) -> list[Result]:
        """Score several frames; frames of one size and type go in one request (at most the model's max batch)."""
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frames = list(frames)
        if not isinstance(frames, Sequence) or isinstance(frames, (str, bytes)) or len(frames) == 0:
            raise InputError(message("frames", type(frames).__name__, "a non-empty list of frames", "pass a list of numpy arrays"))
        color = check_choice("color", color, COLORS)
        size = self._map_size if map_size is None else wire_map_size(map_size)
        product = product if product is not None else self._product
        wire = [_wire_frame(f, color) for f in frames]
        results: list[Result | None] = [None] * len(wire)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, f in enumerate(wire):
            groups.setdefault((f.shape, f.dtype.str), []).append(i)
        for idx in groups.values():
            for k in range(0, len(idx), self.max_batch):
                chunk = idx[k : k + self.max_batch]
                t0 = time.perf_counter()
                out = self._retrying(self._request, np.stack([wire[i] for i in chunk]), color, product, size)
                total = (time.perf_counter() - t0) * 1e3 / len(chunk)
                for j, i in enumerate(chunk):
                    results[i] = self._result(out, j, total, f"frame {i}" if len(wire) > 1 else "frame")
        return results  # type: ignore[return-value]

    def _result(self, out: dict[str, np.ndarray], j: int, total_ms: float, which: str) -> Result:
        error = out["error"].reshape(len(out["error"]), -1)[j, 0]
        error = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
        if error:  # the server refused this frame; the message names what was wrong with it
            raise RemoteError("rejected", f"{which} refused by {self._url}/{self._model}: {error}")
        score = float(out["score"][j].reshape(-1)[0])
        finite = bool(out["finite"][j].reshape(-1)[0])
        threshold = float(out["threshold"][j].reshape(-1)[0]) if self._threshold is None else self._threshold
        anomalous = bool(out["anomalous"][j].reshape(-1)[0]) if self._threshold is None else not (finite and score <= threshold)
        server_ms = float(out["server_ms"][j].reshape(-1)[0])
        timings = {"total": total_ms, "server": server_ms, "network": max(0.0, total_ms - server_ms), "batch": float(out["batch_size"][j].reshape(-1)[0])}
        return Result(score, np.ascontiguousarray(out["anomaly_map"][j], np.float32), anomalous, threshold, timings, finite)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close every connection this detector opened; idempotent. Later calls raise."""
        with self._clients_lock:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            _close_quietly(c)

    def __enter__(self) -> RemoteDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteDetector {self._url} model={self._model} timeout={self._timeout:g}s retries={self._retries}>"


def _wire_frame(frame: object, color: str) -> np.ndarray:
    """A frame as it crosses the wire: (H, W, C) uint8/uint16; refused here as a local Detector would refuse it."""
    f = check_frame(frame, color)
    return np.ascontiguousarray(f[:, :, None] if f.ndim == 2 else f)


def _status(exc: Any) -> str:
    status = exc.status() if hasattr(exc, "status") else None
    return str(status) if status is not None else ""


def _short(text: str, n: int = 300) -> str:
    """First line of a server message, bounded (a server traceback does not belong in a camera's log line)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= n else first[: n - 3] + "..."


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a connection to a dead server (or from another thread) may fail; it is dropped
        pass


def _grpc_config(config: Any) -> dict[str, Any]:
    cfg = getattr(config, "config", config)
    return {"max_batch_size": getattr(cfg, "max_batch_size", 1)}
