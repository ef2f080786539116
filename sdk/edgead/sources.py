"""Frame sources: one interface over GigE Vision cameras (Aravis), OpenCV captures and image folders.

Every source is an iterator of :class:`Frame` (pixels ready for ``Detector.infer``, a frame id, a
host timestamp and metadata). ``read()`` returns one frame, ``None`` when nothing arrived within the
source's timeout (a triggered camera waiting for its trigger), raises :class:`EndOfStream` at the end of
a finite source and :class:`CameraLostError` when a live device went away (reopen it with ``open()``).

:class:`Acquisition` runs a source in its own thread, feeds a bounded :class:`FrameQueue`
(``"newest"`` frame wins or ``"drop-oldest"``) and reconnects with exponential backoff on camera loss.

>>> import tempfile, cv2, numpy as np
>>> d = tempfile.mkdtemp(); _ = cv2.imwrite(d + "/a.png", np.zeros((8, 8), np.uint8))
>>> with FolderSource(d) as src:
...     [(f.frame_id, f.image.shape, f.color) for f in src]
[(0, (8, 8), 'gray')]

GigE Vision needs the system package ``gir1.2-aravis-0.8`` and ``pip install 'edgead[camera]'`` (PyGObject).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .datasets import IMAGE_EXTENSIONS, image_color, list_images, read_image
from .errors import ConfigError, DataError, EdgeADError, InputError, MissingDependencyError, message

__all__ = [
    "Frame",
    "FrameSource",
    "SourceError",
    "CameraLostError",
    "EndOfStream",
    "FolderSource",
    "OpenCVSource",
    "AravisSource",
    "CameraInfo",
    "discover_gige",
    "convert_pixels",
    "PIXEL_FORMATS",
    "TRIGGER_MODES",
    "QUEUE_POLICIES",
    "FrameQueue",
    "Acquisition",
    "open_source",
]

log = logging.getLogger(__name__)

# GenICam pixel format name -> (OpenCV conversion to BGR or None, output color, dtype)
# OpenCV names Bayer patterns by the 2x2 block starting at pixel (1, 1), GenICam by the one at (0, 0):
# GenICam BayerRG8 (R at 0,0) is OpenCV's BayerBG. tests/sdk/test_sources.py checks this against a mosaic.
PIXEL_FORMATS: dict[str, tuple[int | None, str, type]] = {
    "Mono8": (None, "gray", np.uint8),
    "Mono16": (None, "gray", np.uint16),
    "BayerRG8": (cv2.COLOR_BayerBG2BGR, "bgr", np.uint8),
    "BayerGR8": (cv2.COLOR_BayerGB2BGR, "bgr", np.uint8),
    "BayerGB8": (cv2.COLOR_BayerGR2BGR, "bgr", np.uint8),
    "BayerBG8": (cv2.COLOR_BayerRG2BGR, "bgr", np.uint8),
    "RGB8": (None, "bgr", np.uint8),
    "BGR8": (None, "bgr", np.uint8),
}
TRIGGER_MODES: tuple[str, ...] = ("free", "software", "line0", "line1", "line2", "line3")
QUEUE_POLICIES: tuple[str, ...] = ("newest", "drop-oldest", "block")


class SourceError(EdgeADError):
    """A frame source cannot be opened or failed while reading."""


class CameraLostError(SourceError):
    """A live device stopped answering (unplugged, powered off, network down); reopen to go on."""


class EndOfStream(Exception):  # noqa: N818 - a signal like StopIteration, not an error
    """A finite source (video file, image folder without loop) has no more frames."""


@dataclass(frozen=True)
class Frame:
    """One acquired frame.

    ``image`` is HxW (``color="gray"``, uint8 or uint16) or HxWx3 BGR uint8, C-contiguous, ready for
    ``Detector.infer(frame.image, color=frame.color)``. ``timestamp_ns`` is host wall-clock time
    (``time.time_ns()`` scale) when the frame was received; ``meta`` holds source details
    (device timestamp, pixel format, file name, ...).
    """

    image: np.ndarray
    frame_id: int
    timestamp_ns: int
    color: str
    meta: dict[str, Any] = field(default_factory=dict)


def convert_pixels(data: bytes | np.ndarray, pixel_format: str, width: int, height: int) -> tuple[np.ndarray, str]:
    """Raw camera buffer -> (image, color) in the layout the Detector expects.

    Mono8/Mono16 stay gray (HxW), Bayer and RGB8 become BGR uint8 (HxWx3), BGR8 is used as is.

    >>> img, color = convert_pixels(bytes(range(6)), "Mono8", 3, 2)
    >>> img.tolist(), color
    ([[0, 1, 2], [3, 4, 5]], 'gray')
    """
    if pixel_format not in PIXEL_FORMATS:
        raise InputError(message("pixel format", repr(pixel_format), f"one of {', '.join(PIXEL_FORMATS)}", "set the camera's PixelFormat to a supported one"))
    code, color, dtype = PIXEL_FORMATS[pixel_format]
    channels = 3 if pixel_format in ("RGB8", "BGR8") else 1
    flat = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    need = width * height * channels * np.dtype(dtype).itemsize
    if width <= 0 or height <= 0 or flat.size < need:
        raise InputError(
            message("camera buffer", f"{flat.size} bytes for {width}x{height} {pixel_format}", f"at least {need} bytes", "check the ROI and pixel format match the stream")
        )
    pixels: np.ndarray = flat[:need].view(dtype)
    if channels == 3:
        rgb = pixels.reshape(height, width, 3)
        return (np.ascontiguousarray(rgb[:, :, ::-1]) if pixel_format == "RGB8" else rgb.copy()), color
    image: np.ndarray = pixels.reshape(height, width)
    if code is not None:
        return cv2.cvtColor(image, code), color
    return image.copy(), color


class FrameSource:
    """Base of every source: ``open``, ``read``, ``close``, iteration and context management.

    ``stats`` (a Counter) counts ``delivered`` frames, ``incomplete`` buffers, ``missed`` frames
    (gaps in the camera's frame ids) and ``timeouts``.
    """

    name = "source"
    is_live = True  # False for files and folders: nothing is lost by waiting for the consumer

    def __init__(self) -> None:
        self.stats: collections.Counter[str] = collections.Counter()
        self._next_id = 0

    @property
    def is_open(self) -> bool:
        raise NotImplementedError

    def open(self) -> None:
        raise NotImplementedError

    def read(self) -> Frame | None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _frame(self, image: np.ndarray, meta: dict[str, Any], frame_id: int | None = None, timestamp_ns: int | None = None) -> Frame:
        if frame_id is None:
            frame_id = self._next_id
        self._next_id = frame_id + 1
        self.stats["delivered"] += 1
        return Frame(np.ascontiguousarray(image), frame_id, time.time_ns() if timestamp_ns is None else timestamp_ns, image_color(image), meta)

    def __enter__(self) -> FrameSource:
        if not self.is_open:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        if not self.is_open:
            self.open()
        while True:
            try:
                frame = self.read()
            except EndOfStream:
                return
            if frame is not None:
                yield frame


# ----------------------------------------------------------------------------- image folder
class FolderSource(FrameSource):
    """Images of a folder in name order; ``loop=True`` starts over at the end; ``fps`` paces reads.

    >>> FolderSource("/nonexistent").open()
    Traceback (most recent call last):
    ...
    edgead.sources.SourceError: image folder | got '/nonexistent' (not a folder); expected a folder of png, jpg, jpeg, bmp, tif, tiff images; how to fix: check the path
    """

    name = "folder"
    is_live = False

    def __init__(self, folder: str | Path, *, loop: bool = False, fps: float | None = None) -> None:
        super().__init__()
        if fps is not None and fps <= 0:
            raise ConfigError(message("fps", fps, "a positive number or None", "omit fps to read as fast as possible"))
        self.folder = Path(folder)
        self.loop = loop
        self.fps = fps
        self._files: list[Path] = []
        self._index = 0
        self._open = False
        self._last = 0.0
        self._unreadable_run = 0  # unreadable images in a row

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        exts = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
        if not self.folder.is_dir():
            raise SourceError(message("image folder", f"'{self.folder}' (not a folder)", f"a folder of {exts} images", "check the path"))
        self._files = list_images(self.folder, required=False)
        if not self._files:
            raise SourceError(message("image folder", f"'{self.folder}' has no images", f"at least one {exts} file", "put images in the folder"))
        self._index = 0
        self._open = True

    def read(self) -> Frame | None:
        if not self._open:
            raise SourceError(message("folder source", "read() before open()", "an open source", "call open() or use it in a with block"))
        if self._index >= len(self._files):
            if not self.loop:
                raise EndOfStream
            self._index = 0
        if self.fps:
            wait = self._last + 1.0 / self.fps - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last = time.monotonic()
        path = self._files[self._index]
        self._index += 1
        try:
            image = read_image(path)  # uint8/uint16, HxW or HxWx3 BGR (alpha dropped)
        except DataError as exc:
            self.stats["unreadable"] += 1
            self._unreadable_run += 1
            if self._unreadable_run >= len(self._files):  # a whole pass without one readable image: never spin on it
                raise SourceError(
                    message("image folder", f"'{self.folder}': none of its {len(self._files)} images can be read", "at least one readable image", "replace the damaged files")
                ) from exc
            log.warning("skipping unreadable image %s (%s)", path, exc)
            return None
        self._unreadable_run = 0
        return self._frame(image, {"source": "folder", "path": str(path)})

    def close(self) -> None:
        self._open = False


# ----------------------------------------------------------------------------- OpenCV
class OpenCVSource(FrameSource):
    """cv2.VideoCapture over a USB camera index, an RTSP/HTTP URL or a video file.

    A video file ends with :class:`EndOfStream`; a live capture that stops delivering raises
    :class:`CameraLostError` so that :class:`Acquisition` reconnects.

    >>> src = OpenCVSource("/nonexistent.mp4")
    >>> src.is_live
    False
    """

    name = "opencv"

    def __init__(self, spec: int | str, *, width: int | None = None, height: int | None = None, fps: float | None = None) -> None:
        super().__init__()
        self.spec: int | str = int(spec) if isinstance(spec, str) and spec.isdigit() else spec
        self.is_live = isinstance(self.spec, int) or "://" in str(self.spec)
        self.width, self.height, self.fps = width, height, fps
        self._cap: Any = None

    @property
    def is_open(self) -> bool:
        return self._cap is not None

    def open(self) -> None:
        if not self.is_live and not Path(str(self.spec)).is_file():
            raise SourceError(message("video file", f"'{self.spec}' does not exist", "a video file, a camera index or a URL", "check the path"))
        cap = cv2.VideoCapture(self.spec)
        if not cap.isOpened():
            cap.release()
            err = CameraLostError if self.is_live else SourceError
            raise err(message("OpenCV capture", f"{self.spec!r} cannot be opened", "a readable camera, stream or video", "check the index/URL and that no other program holds the camera"))
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.width), (cv2.CAP_PROP_FRAME_HEIGHT, self.height), (cv2.CAP_PROP_FPS, self.fps)):
            if value:
                cap.set(prop, float(value))
        self._cap = cap

    def read(self) -> Frame | None:
        if self._cap is None:
            raise SourceError(message("OpenCV source", "read() before open()", "an open source", "call open() or use it in a with block"))
        ok, image = self._cap.read()
        if not ok or image is None:
            if self.is_live:
                raise CameraLostError(message("OpenCV capture", f"{self.spec!r} returned no frame", "a frame", "check the cable / stream; the loop reconnects"))
            raise EndOfStream
        meta = {"source": "opencv", "spec": str(self.spec), "position_ms": float(self._cap.get(cv2.CAP_PROP_POS_MSEC))}
        return self._frame(image, meta)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


# ----------------------------------------------------------------------------- GigE Vision (Aravis)
def _aravis() -> Any:
    try:
        import gi
    except ImportError as exc:
        raise MissingDependencyError("PyGObject", "camera", "GigE Vision camera (Aravis)") from exc
    try:
        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ValueError, ImportError) as exc:
        raise SourceError(
            message("Aravis 0.8 introspection data", "not found", "the system package gir1.2-aravis-0.8", "sudo apt-get install gir1.2-aravis-0.8 (see docs/camera.md)")
        ) from exc
    return Aravis


@dataclass(frozen=True)
class CameraInfo:
    """One discovered camera: open it with ``AravisSource(info.device_id)``."""

    device_id: str
    serial: str
    address: str
    vendor: str
    model: str
    protocol: str


def discover_gige() -> list[CameraInfo]:
    """List the GigE Vision (and USB3 Vision) cameras Aravis can see.

    >>> [c.device_id for c in discover_gige()]  # doctest: +SKIP
    ['Aravis-Fake-GV01']
    """
    arv = _aravis()
    arv.update_device_list()
    return [
        CameraInfo(
            arv.get_device_id(i) or "",
            arv.get_device_serial_nbr(i) or "",
            arv.get_device_address(i) or "",
            arv.get_device_vendor(i) or "",
            arv.get_device_model(i) or "",
            arv.get_device_protocol(i) or "",
        )
        for i in range(arv.get_n_devices())
    ]


class AravisSource(FrameSource):
    """A GigE Vision camera through Aravis, opened by device id, serial number or IP address.

    ``pixel_format`` Mono8, Mono16, Bayer{RG,GR,GB,BG}8, RGB8 or BGR8 (converted, see :func:`convert_pixels`);
    ``exposure_us``, ``gain_db``, ``frame_rate``, ``roi=(x, y, width, height)``; ``trigger`` "free" (free-run),
    "software" (each ``read`` fires a software trigger) or "line0".."line3" (hardware line);
    ``n_buffers`` stream buffers; ``timeout_s`` per read; in free-run, ``lost_after_s`` without any
    buffer means the camera is lost. Non-complete buffers are counted in ``stats["incomplete"]``
    (and by status in ``stats["status_<name>"]``) and skipped. ``packet_size``/``packet_delay_ns``
    tune GVSP; ``socket_buffer="auto"`` sizes the receive buffer to the frame (see docs/camera.md).

    >>> with AravisSource("Aravis-Fake-GV01", pixel_format="Mono8", frame_rate=25) as cam:  # doctest: +SKIP
    ...     frame = next(iter(cam))
    """

    name = "gige"

    def __init__(
        self,
        device: str | None = None,
        *,
        pixel_format: str | None = "Mono8",
        exposure_us: float | None = None,
        gain_db: float | None = None,
        frame_rate: float | None = None,
        roi: tuple[int, int, int, int] | None = None,
        trigger: str = "free",
        n_buffers: int = 8,
        timeout_s: float = 1.0,
        lost_after_s: float = 2.0,
        packet_size: int | None = None,
        packet_delay_ns: int | None = None,
        socket_buffer: str = "auto",
        packet_socket: bool = False,
    ) -> None:
        super().__init__()
        if pixel_format is not None and pixel_format not in PIXEL_FORMATS:
            raise ConfigError(message("pixel_format", repr(pixel_format), f"one of {', '.join(PIXEL_FORMATS)}", "pick a format the camera lists (arv-tool-0.8 features PixelFormat)"))
        trigger = trigger.lower()
        if trigger not in TRIGGER_MODES:
            raise ConfigError(message("trigger", repr(trigger), f"one of {', '.join(TRIGGER_MODES)}", "use free for free-run, software, or lineN for a hardware line"))
        if n_buffers < 2:
            raise ConfigError(message("n_buffers", n_buffers, "at least 2", "use 4-16 stream buffers"))
        if roi is not None and (len(roi) != 4 or min(roi) < 0 or roi[2] == 0 or roi[3] == 0):
            raise ConfigError(message("roi", roi, "(x, y, width, height) with width, height > 0", "pass e.g. roi=(0, 0, 512, 512)"))
        if socket_buffer not in ("auto", "fixed"):
            raise ConfigError(message("socket_buffer", repr(socket_buffer), "auto or fixed", "use auto"))
        if timeout_s <= 0 or lost_after_s <= 0:
            raise ConfigError(message("timeout_s / lost_after_s", (timeout_s, lost_after_s), "positive seconds", "use e.g. 1.0 and 2.0"))
        self.device = device
        self.pixel_format = pixel_format
        self.exposure_us, self.gain_db, self.frame_rate, self.roi = exposure_us, gain_db, frame_rate, roi
        self.trigger = trigger
        self.n_buffers, self.timeout_s, self.lost_after_s = n_buffers, timeout_s, lost_after_s
        self.packet_size, self.packet_delay_ns = packet_size, packet_delay_ns
        self.socket_buffer, self.packet_socket = socket_buffer, packet_socket
        self._arv: Any = None
        self._cam: Any = None
        self._stream: Any = None
        self._lost = threading.Event()
        self._last_buffer = 0.0
        self._last_camera_id: int | None = None
        self.info: CameraInfo | None = None

    @property
    def is_open(self) -> bool:
        return self._cam is not None

    def _resolve(self) -> CameraInfo:
        cameras = discover_gige()
        if not cameras:
            raise CameraLostError(message("GigE Vision discovery", "no camera found", "at least one camera", "check cable, power, IP configuration and firewall (UDP 3956); see docs/camera.md"))
        if self.device is None:
            return cameras[0]
        for cam in cameras:
            if self.device in (cam.device_id, cam.serial, cam.address):
                return cam
        found = ", ".join(f"{c.device_id} ({c.serial} @ {c.address})" for c in cameras)
        raise CameraLostError(message("camera", repr(self.device), f"an id, serial or IP of: {found}", "pass one of the listed cameras"))

    def open(self) -> None:
        arv = self._arv = _aravis()
        from gi.repository import GLib

        self.close()
        self._lost.clear()
        self.info = self._resolve()
        try:
            cam = arv.Camera.new(self.info.device_id)
        except GLib.Error as exc:
            raise CameraLostError(message("camera", f"{self.info.device_id} cannot be opened ({exc.message})", "a reachable camera not held by another program", "close other viewers; check the network")) from exc
        self._cam = cam
        try:
            self._configure(cam, arv)
            if cam.is_gv_device() and not self.packet_socket:
                cam.gv_set_stream_options(arv.GvStreamOption.PACKET_SOCKET_DISABLED)
            stream = cam.create_stream(None, None)
            if stream is None:
                raise CameraLostError(message("camera stream", "not created", "a GVSP stream", "check firewall and packet size"))
            if cam.is_gv_device():
                mode = arv.GvStreamSocketBuffer.AUTO if self.socket_buffer == "auto" else arv.GvStreamSocketBuffer.FIXED
                stream.set_property("socket-buffer", mode)
            payload = cam.get_payload()
            for _ in range(self.n_buffers):
                stream.push_buffer(arv.Buffer.new_allocate(payload))
            cam.get_device().connect("control-lost", lambda *_: self._lost.set())
            self._stream = stream
            cam.start_acquisition()
        except GLib.Error as exc:
            self.close()
            raise CameraLostError(message("camera setup", str(exc.message), "a camera accepting the settings", "check the requested pixel format, ROI, rates against the camera")) from exc
        except EdgeADError:
            self.close()
            raise
        self._last_buffer = time.monotonic()
        self._last_camera_id = None
        log.info("opened %s (%s @ %s) %s %s", self.info.device_id, self.info.serial, self.info.address, cam.get_pixel_format_as_string(), cam.get_region())

    def _configure(self, cam: Any, arv: Any) -> None:
        if self.pixel_format is not None:
            available = cam.dup_available_pixel_formats_as_strings() or []
            if self.pixel_format not in available:
                raise ConfigError(message("pixel_format", self.pixel_format, f"one this camera offers: {', '.join(available)}", "pick one of the listed formats"))
            cam.set_pixel_format_from_string(self.pixel_format)
        if self.roi is not None:
            cam.set_region(*[int(v) for v in self.roi])
        if self.exposure_us is not None:
            if cam.is_exposure_auto_available():
                cam.set_exposure_time_auto(arv.Auto.OFF)
            cam.set_exposure_time(float(self.exposure_us))
        if self.gain_db is not None:
            if cam.is_gain_auto_available():
                cam.set_gain_auto(arv.Auto.OFF)
            cam.set_gain(float(self.gain_db))
        if self.trigger == "free":
            cam.clear_triggers()
        else:
            cam.set_trigger("Software" if self.trigger == "software" else "Line" + self.trigger[-1])
        if self.frame_rate is not None:
            cam.set_frame_rate(float(self.frame_rate))  # Aravis may switch FrameStart triggering off here ...
            if self.trigger != "free":
                cam.set_trigger("Software" if self.trigger == "software" else "Line" + self.trigger[-1])  # ... so set it again
        cam.set_acquisition_mode(arv.AcquisitionMode.CONTINUOUS)
        if cam.is_gv_device():
            if self.packet_size is not None:
                cam.gv_set_packet_size(int(self.packet_size))
            if self.packet_delay_ns is not None:
                cam.gv_set_packet_delay(int(self.packet_delay_ns))

    def read(self) -> Frame | None:
        if self._cam is None or self._stream is None:
            raise SourceError(message("camera source", "read() before open()", "an open source", "call open() or use it in a with block"))
        arv = self._arv
        if self._lost.is_set():
            raise CameraLostError(message("camera", f"{self.device or 'camera'}: control lost", "a camera answering its heartbeat", "check power/cable; the loop reconnects"))
        if self.trigger == "software":
            try:
                self._cam.software_trigger()
            except Exception as exc:  # GLib.Error: the device no longer answers
                raise CameraLostError(message("camera", f"software trigger failed ({exc})", "a reachable camera", "check the camera; the loop reconnects")) from exc
        buffer = self._stream.timeout_pop_buffer(int(self.timeout_s * 1e6))
        now = time.monotonic()
        if buffer is None:
            self.stats["timeouts"] += 1
            if self._lost.is_set():
                raise CameraLostError(message("camera", f"{self.device or 'camera'}: control lost (no heartbeat answer)", "a camera answering its heartbeat", "check power/cable; the loop reconnects"))
            if self.trigger in ("free", "software") and now - self._last_buffer > self.lost_after_s:
                raise CameraLostError(message("camera", f"no buffer for {now - self._last_buffer:.1f} s", f"a frame within {self.lost_after_s} s", "check camera power/cable/network; the loop reconnects"))
            return None
        self._last_buffer = now
        try:
            camera_id = int(buffer.get_frame_id())
            if self._last_camera_id is not None:
                gap = camera_id - self._last_camera_id - 1
                if gap < 0:  # 16-bit GEV 1.x ids wrap from 65535 to 1
                    gap += 65535
                if 0 < gap < 10000:
                    self.stats["missed"] += gap
            self._last_camera_id = camera_id
            status = buffer.get_status()
            if status != arv.BufferStatus.SUCCESS:
                self.stats["incomplete"] += 1
                self.stats["status_" + status.value_nick.replace("-", "_")] += 1
                return None
            name = self._format_name(buffer.get_image_pixel_format())
            width, height = buffer.get_image_width(), buffer.get_image_height()
            image, _ = convert_pixels(buffer.get_data(), name, width, height)
            meta = {
                "source": "gige",
                "device": self.info.device_id if self.info else "",
                "camera_frame_id": camera_id,
                "device_timestamp_ns": int(buffer.get_timestamp()),
                "pixel_format": name,
            }
            return self._frame(image, meta, timestamp_ns=int(buffer.get_system_timestamp()))
        finally:
            self._stream.push_buffer(buffer)

    _FORMAT_CACHE: dict[int, str] = {}

    def _format_name(self, code: int) -> str:
        name = self._FORMAT_CACHE.get(code)
        if name is None:
            arv = self._arv
            codes = {
                arv.PIXEL_FORMAT_MONO_8: "Mono8",
                arv.PIXEL_FORMAT_MONO_16: "Mono16",
                arv.PIXEL_FORMAT_BAYER_RG_8: "BayerRG8",
                arv.PIXEL_FORMAT_BAYER_GR_8: "BayerGR8",
                arv.PIXEL_FORMAT_BAYER_GB_8: "BayerGB8",
                arv.PIXEL_FORMAT_BAYER_BG_8: "BayerBG8",
                arv.PIXEL_FORMAT_RGB_8_PACKED: "RGB8",
                arv.PIXEL_FORMAT_BGR_8_PACKED: "BGR8",
            }
            name = codes.get(code, f"0x{code:08x}")
            self._FORMAT_CACHE[code] = name
        return name

    def close(self) -> None:
        cam, self._cam = self._cam, None
        stream, self._stream = self._stream, None
        if cam is not None:
            try:
                if not self._lost.is_set():
                    cam.stop_acquisition()
            except Exception as exc:  # the camera may already be gone: closing must not fail
                log.debug("stop_acquisition failed: %s", exc)
        del stream, cam


# ----------------------------------------------------------------------------- queue and acquisition thread
class FrameQueue:
    """A bounded, thread-safe frame queue with a drop policy; ``dropped`` counts discarded frames.

    ``"newest"``: ``get`` returns the newest frame and drops the older ones (lowest latency).
    ``"drop-oldest"``: a full queue drops its oldest frame on ``put``; ``get`` is FIFO.
    ``"block"``: ``put`` waits for room (nothing dropped; for files and folders, never for live cameras).

    >>> q = FrameQueue(2, "newest")
    >>> for i in range(3): _ = q.put(i)
    >>> q.get(0.1), q.dropped
    (2, 2)
    """

    def __init__(self, maxsize: int = 4, policy: str = "newest") -> None:
        if maxsize < 1:
            raise ConfigError(message("queue size", maxsize, "at least 1", "use 1-8"))
        if policy not in QUEUE_POLICIES:
            raise ConfigError(message("queue policy", repr(policy), f"one of {', '.join(QUEUE_POLICIES)}", "use newest for lowest latency"))
        self.maxsize, self.policy = maxsize, policy
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item: Any, timeout: float | None = None) -> bool:
        """Add ``item``; False only when policy "block" found no room within ``timeout`` seconds."""
        with self._cond:
            if len(self._items) >= self.maxsize:
                if self.policy == "block":
                    if not self._cond.wait_for(lambda: len(self._items) < self.maxsize, timeout):
                        return False
                else:
                    self._items.popleft()
                    self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> Any | None:
        """Next item (see policy), or None after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) > 0, timeout):
                return None
            if self.policy == "newest":
                item = self._items.pop()
                self.dropped += len(self._items)
                self._items.clear()
            else:
                item = self._items.popleft()
            self._cond.notify_all()
            return item

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class Acquisition:
    """Run a source in a background thread into a :class:`FrameQueue`, reconnecting on camera loss.

    ``reconnects`` counts successful reopenings, ``connection`` numbers the current session (0 first),
    ``error`` keeps the last error; ``finished`` is set at the end of a finite source or after ``stop()``.
    Backoff between attempts doubles from ``backoff_s`` up to ``max_backoff_s``.

    >>> import tempfile, cv2, numpy as np
    >>> d = tempfile.mkdtemp(); _ = cv2.imwrite(d + "/a.png", np.zeros((8, 8), np.uint8))
    >>> with Acquisition(FolderSource(d), FrameQueue(4, "drop-oldest")) as acq:
    ...     acq.queue.get(5.0).frame_id
    0
    """

    def __init__(
        self,
        source: FrameSource,
        queue: FrameQueue,
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 5.0,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.source, self.queue = source, queue
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.on_event = on_event or (lambda kind, text: log.warning("%s: %s", kind, text))
        self.reconnects = 0
        self.connection = -1
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgead-acquisition", daemon=True)

    def start(self) -> Acquisition:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def __enter__(self) -> Acquisition:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        delay = self.backoff_s
        try:
            while not self._stop.is_set():
                if not self.source.is_open:
                    try:
                        self.source.open()
                    except CameraLostError as exc:
                        self.error = exc
                        self.on_event("reconnect-failed", f"{exc}; retrying in {delay:.1f} s")
                        self._stop.wait(delay)
                        delay = min(delay * 2, self.max_backoff_s)
                        continue
                    self.connection += 1
                    if self.connection > 0:
                        self.reconnects += 1
                        self.on_event("reconnected", f"connection {self.connection} after {self.reconnects} reconnect(s)")
                    delay = self.backoff_s
                try:
                    frame = self.source.read()
                except CameraLostError as exc:
                    self.error = exc
                    self.on_event("camera-lost", str(exc))
                    self.source.close()
                    continue
                except EndOfStream:
                    break
                if frame is not None:
                    frame.meta["connection"] = self.connection
                    while not self.queue.put(frame, timeout=0.1) and not self._stop.is_set():
                        pass
        except BaseException as exc:  # surfaced to the consumer through .error, never lost silently
            self.error = exc
            self.on_event("acquisition-stopped", repr(exc))
        finally:
            self.source.close()
            self.finished.set()


def open_source(spec: str, **options: Any) -> FrameSource:
    """Build a source from a string: ``gige`` / ``gige:ID-SERIAL-OR-IP``, ``folder:DIR``, or an OpenCV spec.

    An OpenCV spec is a camera index (``0``), a URL (``rtsp://...``) or a video file.
    ``options`` go to the source's constructor.

    >>> type(open_source("folder:/tmp")).__name__
    'FolderSource'
    """
    if spec == "gige" or spec.startswith("gige:"):
        return AravisSource(spec[5:] or None, **options)
    if spec.startswith("folder:"):
        return FolderSource(spec[7:], **options)
    return OpenCVSource(spec, **options)
