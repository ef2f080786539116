"""Frame sources without hardware: pixel conversion, folder and video sources, queue policies, reconnects.

The GigE Vision path against the Aravis fake camera is tested in tests/samples/test_camera_loop.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.errors import ConfigError, EdgeADError, InputError, MissingDependencyError
from edgead.sources import (
    Acquisition,
    AravisSource,
    CameraLostError,
    EndOfStream,
    FolderSource,
    Frame,
    FrameQueue,
    FrameSource,
    OpenCVSource,
    SourceError,
    convert_pixels,
    open_source,
)

# ----------------------------------------------------------------------------- pixel formats
# GenICam Bayer names give the colours of the 2x2 block at the top-left pixel (0,0),(0,1),(1,0),(1,1).
GENICAM_BAYER = {"BayerRG8": "RGGB", "BayerGR8": "GRBG", "BayerGB8": "GBRG", "BayerBG8": "BGGR"}
BGR_INDEX = {"B": 0, "G": 1, "R": 2}


def mosaic(bgr: np.ndarray, pattern: str) -> np.ndarray:
    """Sample a BGR image the way a sensor with the given 2x2 colour filter would (independent of OpenCV)."""
    out = np.zeros(bgr.shape[:2], np.uint8)
    for k, colour in enumerate(pattern):
        dy, dx = divmod(k, 2)
        out[dy::2, dx::2] = bgr[dy::2, dx::2, BGR_INDEX[colour]]
    return out


@pytest.mark.parametrize("fmt", sorted(GENICAM_BAYER))
@pytest.mark.parametrize("bgr", [(30, 120, 220), (200, 90, 10)])
def test_bayer_formats_demosaic_to_the_true_colour(fmt: str, bgr: tuple[int, int, int]) -> None:
    h, w = 12, 16
    truth = np.empty((h, w, 3), np.uint8)
    truth[:] = bgr
    raw = mosaic(truth, GENICAM_BAYER[fmt])
    image, color = convert_pixels(raw.tobytes(), fmt, w, h)
    assert color == "bgr" and image.dtype == np.uint8 and image.shape == (h, w, 3)
    # interior pixels (demosaicing borders are approximations)
    np.testing.assert_allclose(image[2:-2, 2:-2].reshape(-1, 3), np.tile(bgr, ((h - 4) * (w - 4), 1)), atol=1)


def test_mono8_and_mono16_keep_values_and_dtype() -> None:
    rng = np.random.default_rng(0)
    m8 = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    img, color = convert_pixels(m8.tobytes(), "Mono8", 7, 5)
    assert color == "gray" and img.dtype == np.uint8
    np.testing.assert_array_equal(img, m8)
    m16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    img16, color16 = convert_pixels(m16.astype("<u2").tobytes(), "Mono16", 7, 5)
    assert color16 == "gray" and img16.dtype == np.uint16 and img16.flags.c_contiguous
    np.testing.assert_array_equal(img16, m16)


def test_rgb8_is_reversed_to_bgr_and_bgr8_is_kept() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    img, color = convert_pixels(rgb.tobytes(), "RGB8", 6, 4)
    assert color == "bgr" and img.flags.c_contiguous
    np.testing.assert_array_equal(img[:, :, 0], rgb[:, :, 2])
    np.testing.assert_array_equal(img[:, :, 2], rgb[:, :, 0])
    same, _ = convert_pixels(rgb.tobytes(), "BGR8", 6, 4)
    np.testing.assert_array_equal(same, rgb)


def test_convert_refuses_short_buffers_and_unknown_formats() -> None:
    with pytest.raises(InputError, match="camera buffer"):
        convert_pixels(bytes(10), "Mono8", 4, 4)
    with pytest.raises(InputError, match="pixel format"):
        convert_pixels(bytes(16), "YUV422", 4, 4)


# ----------------------------------------------------------------------------- folder source
def _write(folder: Path, name: str, image: np.ndarray) -> None:
    assert cv2.imwrite(str(folder / name), image)


def test_folder_source_reads_sorted_with_ids_colors_and_loop(tmp_path: Path) -> None:
    _write(tmp_path, "b.png", np.full((8, 8, 3), 2, np.uint8))
    _write(tmp_path, "a.png", np.full((8, 8), 1, np.uint8))
    _write(tmp_path, "c.png", np.full((8, 8), 3000, np.uint16))
    (tmp_path / "notes.txt").write_text("not an image")
    frames = list(FolderSource(tmp_path))
    assert [f.meta["path"].rsplit("/", 1)[-1] for f in frames] == ["a.png", "b.png", "c.png"]
    assert [f.frame_id for f in frames] == [0, 1, 2]
    assert [f.color for f in frames] == ["gray", "bgr", "gray"]
    assert frames[2].image.dtype == np.uint16 and int(frames[2].image[0, 0]) == 3000
    assert all(abs(f.timestamp_ns - time.time_ns()) < 60e9 for f in frames)

    src = FolderSource(tmp_path, loop=True)
    src.open()
    looped = [src.read() for _ in range(7)]
    assert [int(f.image.reshape(-1)[0]) for f in looped if f is not None] == [1, 2, 3000, 1, 2, 3000, 1]
    assert [f.frame_id for f in looped if f is not None] == list(range(7))


def test_folder_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a folder"):
        FolderSource(tmp_path / "missing").open()
    with pytest.raises(SourceError, match="has no images"):
        FolderSource(tmp_path).open()
    with pytest.raises(SourceError, match="before open"):
        FolderSource(tmp_path).read()
    with pytest.raises(ConfigError, match="fps"):
        FolderSource(tmp_path, fps=0)


def test_folder_source_skips_and_counts_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png")
    _write(tmp_path, "b.png", np.zeros((4, 4), np.uint8))
    src = FolderSource(tmp_path)
    frames = list(src)
    assert len(frames) == 1 and src.stats["unreadable"] == 1 and src.stats["delivered"] == 1


def test_folder_source_paces_to_fps(tmp_path: Path) -> None:
    for i in range(4):
        _write(tmp_path, f"{i}.png", np.zeros((4, 4), np.uint8))
    t0 = time.monotonic()
    assert len(list(FolderSource(tmp_path, fps=20))) == 4
    assert time.monotonic() - t0 >= 3 / 20 * 0.9


# ----------------------------------------------------------------------------- OpenCV source
def test_opencv_source_reads_a_video_file_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    assert writer.isOpened()
    for i in range(5):
        writer.write(np.full((24, 32, 3), 40 * i, np.uint8))
    writer.release()
    src = OpenCVSource(str(path))
    assert not src.is_live
    frames = list(src)
    assert len(frames) == 5
    assert all(f.image.shape == (24, 32, 3) and f.color == "bgr" for f in frames)
    assert [round(float(f.image.mean()) / 40) for f in frames] == [0, 1, 2, 3, 4]
    with pytest.raises(EndOfStream):
        src.read()
    src.close()


def test_opencv_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        OpenCVSource(str(tmp_path / "none.mp4")).open()
    assert OpenCVSource("rtsp://127.0.0.1:1/x").is_live and OpenCVSource("3").is_live and OpenCVSource("3").spec == 3


# ----------------------------------------------------------------------------- Aravis (no camera needed)
@pytest.mark.parametrize(
    "kwargs, what",
    [
        ({"pixel_format": "YUV422"}, "pixel_format"),
        ({"trigger": "line9"}, "trigger"),
        ({"n_buffers": 1}, "n_buffers"),
        ({"roi": (0, 0, 0, 10)}, "roi"),
        ({"socket_buffer": "huge"}, "socket_buffer"),
        ({"timeout_s": 0}, "timeout_s"),
    ],
)
def test_aravis_source_validates_options_before_touching_the_network(kwargs: dict, what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        AravisSource("cam", **kwargs)


def test_aravis_without_pygobject_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gi", None)
    with pytest.raises(MissingDependencyError, match=r"edgead\[camera\]"):
        AravisSource("cam").open()


def test_open_source_dispatch(tmp_path: Path) -> None:
    assert isinstance(open_source("gige"), AravisSource) and open_source("gige").device is None
    assert open_source("gige:192.168.1.20").device == "192.168.1.20"
    assert isinstance(open_source(f"folder:{tmp_path}"), FolderSource)
    assert isinstance(open_source("0"), OpenCVSource)


# ----------------------------------------------------------------------------- queue policies
def test_newest_policy_returns_latest_and_counts_drops() -> None:
    q = FrameQueue(3, "newest")
    for i in range(5):
        q.put(i)
    assert q.dropped == 2  # 0 and 1 fell off the full queue
    assert q.get(0.1) == 4 and q.dropped == 4 and len(q) == 0
    assert q.get(0.05) is None


def test_drop_oldest_policy_is_fifo_and_bounded() -> None:
    q = FrameQueue(3, "drop-oldest")
    for i in range(5):
        q.put(i)
    assert [q.get(0.1) for _ in range(3)] == [2, 3, 4] and q.dropped == 2


def test_block_policy_waits_for_room_and_drops_nothing() -> None:
    q = FrameQueue(2, "block")
    assert q.put(0) and q.put(1)
    t0 = time.monotonic()
    assert not q.put(2, timeout=0.1) and time.monotonic() - t0 >= 0.09
    assert q.get(0.1) == 0 and q.put(2, timeout=0.1)
    assert [q.get(0.1), q.get(0.1)] == [1, 2] and q.dropped == 0


def test_acquisition_with_block_policy_delivers_every_frame_of_a_folder(tmp_path: Path) -> None:
    for i in range(12):
        _write(tmp_path, f"{i:02d}.png", np.full((4, 4), i, np.uint8))
    q = FrameQueue(2, "block")
    with Acquisition(FolderSource(tmp_path), q, on_event=lambda *_: None):
        got = []
        while len(got) < 12:
            frame = q.get(5.0)
            assert frame is not None
            got.append(int(frame.image[0, 0]))
            time.sleep(0.005)  # a slow consumer
    assert got == list(range(12)) and q.dropped == 0


def test_queue_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="queue policy"):
        FrameQueue(2, "newst")
    with pytest.raises(ConfigError, match="queue size"):
        FrameQueue(0)


# ----------------------------------------------------------------------------- acquisition thread
class FlakySource(FrameSource):
    """Delivers frames; loses the camera after `lose_after` frames, then refuses `failed_opens` reopenings."""

    def __init__(self, total: int, lose_after: int, failed_opens: int) -> None:
        super().__init__()
        self.total, self.lose_after, self.failed_opens = total, lose_after, failed_opens
        self.opened = False
        self.open_calls = 0
        self.lost_once = False

    @property
    def is_open(self) -> bool:
        return self.opened

    def open(self) -> None:
        self.open_calls += 1
        if self.lost_once and self.failed_opens > 0:
            self.failed_opens -= 1
            raise CameraLostError("camera | got unreachable; expected a camera; how to fix: wait")
        self.opened = True

    def read(self) -> Frame | None:
        if self._next_id >= self.total:
            raise EndOfStream
        if self._next_id == self.lose_after and not self.lost_once:
            self.lost_once = True
            raise CameraLostError("camera | got lost; expected frames; how to fix: reconnect")
        time.sleep(0.001)
        return self._frame(np.zeros((4, 4), np.uint8), {})

    def close(self) -> None:
        self.opened = False


def test_acquisition_reconnects_with_backoff_and_keeps_counting() -> None:
    src = FlakySource(total=20, lose_after=8, failed_opens=2)
    events: list[str] = []
    q = FrameQueue(100, "drop-oldest")
    acq = Acquisition(src, q, backoff_s=0.01, max_backoff_s=0.02, on_event=lambda kind, _text: events.append(kind))
    acq.start()
    assert acq.finished.wait(5.0)
    acq.stop()
    frames = [q.get(0.01) for _ in range(len(q))]
    assert [f.frame_id for f in frames] == list(range(20))
    assert [f.meta["connection"] for f in frames] == [0] * 8 + [1] * 12
    assert acq.reconnects == 1 and src.open_calls == 4
    assert events == ["camera-lost", "reconnect-failed", "reconnect-failed", "reconnected"]
    assert not src.is_open


def test_acquisition_surfaces_a_broken_source_instead_of_hanging(tmp_path: Path) -> None:
    acq = Acquisition(FolderSource(tmp_path), FrameQueue(2), on_event=lambda *_: None).start()
    assert acq.finished.wait(5.0)
    assert isinstance(acq.error, EdgeADError) and "has no images" in str(acq.error)


def test_acquisition_stop_interrupts_backoff() -> None:
    src = FlakySource(total=10, lose_after=0, failed_opens=10**6)
    acq = Acquisition(src, FrameQueue(2), backoff_s=10.0, on_event=lambda *_: None).start()
    time.sleep(0.1)
    t0 = time.monotonic()
    acq.stop()
    assert acq.finished.is_set() and time.monotonic() - t0 < 2.0


def test_unreachable_live_stream_is_camera_loss_and_acquisition_keeps_retrying() -> None:
    src = OpenCVSource("rtsp://127.0.0.1:9/none")  # port 9 (discard) refuses at once on loopback
    with pytest.raises(CameraLostError, match="cannot be opened"):
        src.open()
    events: list[str] = []
    acq = Acquisition(src, FrameQueue(2), backoff_s=0.05, max_backoff_s=0.1, on_event=lambda kind, _t: events.append(kind)).start()
    deadline = time.monotonic() + 10
    while events.count("reconnect-failed") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    acq.stop()
    assert events.count("reconnect-failed") >= 2 and acq.finished.is_set()
    assert isinstance(acq.error, CameraLostError) and acq.connection == -1
