"""The analysis pass, streamed: per-frame face alignments published while generation consumes them.

A job's first pass decodes the video, detects the face in every frame and keeps each frame's smoothed
alignment. Generation only ever needs the alignments of the frames it is about to generate, so the
analysis runs on its own thread and the generation pass starts on the first windows while later
frames are still being detected: the GPU no longer idles through the whole analysis.

Frames without a face borrow the alignment of the nearest frame with one (the later one on a tie).
The answer for frame ``i`` is final as soon as a face has been found at or after ``i`` or the
analysis has ended, so a streamed job pastes exactly what a job analysed up front would.

A job that chooses its face by a box or by who speaks (:mod:`lipsync.faces.selection`) needs every
face of every frame before it can choose, so its alignments are published only once all frames are
analysed; the default (the largest face per frame) streams.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from lipsync.audio import load_audio
from lipsync.contract import FaceChoice
from lipsync.errors import BadInput
from lipsync.faces import FaceAligner, FaceLandmarks
from lipsync.faces.selection import FaceUsed, select_faces, speech_envelope, thumbnail
from lipsync.faces.settings import SelectionSettings
from lipsync.media import VideoInfo, VideoReader
from lipsync.sampling import CancelCheck, JobCancelled
from lipsync.timing import StageTimer


class NoFaceError(BadInput):
    """No frame of the video shows a face the detector accepts."""


class AnalysisStopped(Exception):
    """The consumer of a :class:`FaceTrack` gave up (the job failed elsewhere); the analysis ends early."""


class FaceTrack:
    """Alignments of the analysed frames, appended by the analysis thread, read by generation.

    :meth:`wait_for` blocks until a frame's alignment is final; an error of the analysis (unreadable
    video, cancellation, no face anywhere) is raised there, in the reading thread.
    """

    def __init__(self, video_name: str) -> None:
        self.video_name = video_name
        self._affines: list[np.ndarray | None] = []
        self._found: list[int] = []
        self._done = False
        self._stopped = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self.used: FaceUsed | None = None
        """Which face was synced and how sure the choice is; set before the analysis ends."""

    @property
    def frames(self) -> int | None:
        """The number of analysed frames once the analysis has ended, else ``None``."""
        with self._changed:
            return len(self._affines) if self._done else None

    def extend(self, affines: list[np.ndarray | None]) -> None:
        """Publish the next frames' alignments (``None`` = no face); raises once the reader stopped."""
        with self._changed:
            if self._stopped:
                raise AnalysisStopped
            for affine in affines:
                if affine is not None:
                    self._found.append(len(self._affines))
                self._affines.append(affine)
            self._changed.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        """The analysis ended, normally or with ``error``."""
        with self._changed:
            if error is None and not self._found:
                error = NoFaceError(f"no face was found in any of the {len(self._affines)} frames of {self.video_name}")
            self._done, self._error = True, error
            self._changed.notify_all()

    def stop(self) -> None:
        """Tell the analysis thread to end at its next :meth:`extend`."""
        with self._changed:
            self._stopped = True

    def wait_for(self, frame: int) -> None:
        """Block until frame ``frame``'s alignment is final or the analysis has ended."""
        with self._changed:
            self._changed.wait_for(lambda: self._done or (self._found and self._found[-1] >= frame))
            if self._error is not None:
                raise self._error

    def wait_until_done(self) -> int:
        """Block until the analysis has ended; returns the number of frames."""
        with self._changed:
            self._changed.wait_for(lambda: self._done)
            if self._error is not None:
                raise self._error
            return len(self._affines)

    def alignment(self, frame: int) -> tuple[np.ndarray, bool]:
        """``(frame→crop affine, whether the frame has its own face)``; call :meth:`wait_for` first."""
        with self._changed:
            affine = self._affines[frame]
            if affine is not None:
                return affine, True
            after = bisect.bisect_right(self._found, frame)
            candidates = [self._found[index] for index in (after, after - 1) if 0 <= index < len(self._found)]
            nearest = self._affines[min(candidates, key=lambda candidate: abs(candidate - frame))]
            assert nearest is not None  # _found lists frames that have their own face
            return nearest, False


@dataclass(frozen=True)
class Choosing:
    """How a job that does not take the largest face chooses one (:mod:`lipsync.faces.selection`)."""

    choice: str
    face_box: str | None
    detect_all: Callable[[np.ndarray], list[FaceLandmarks]]
    settings: SelectionSettings
    sample_rate: int
    """Of the video's audio envelope (``active_speaker``)."""
    fps: int


def analyse(
    video: Path,
    max_frames: int,
    detect: Callable[[np.ndarray], FaceLandmarks | None],
    aligner: FaceAligner,
    track: FaceTrack,
    timer: StageTimer,
    *,
    threads: int,
    chunk: int,
    on_progress: Callable[[float], None],
    should_cancel: CancelCheck | None,
    choosing: Choosing | None = None,
) -> None:
    """Decode up to ``max_frames`` frames, detect a face in each (on ``threads`` threads, ``chunk``
    frames at a time) and publish their alignments to ``track``; with ``choosing``, detect every face
    and publish the chosen one's once all frames are seen. Never raises: errors go to ``track``."""
    try:
        with VideoReader(video) as reader, ThreadPoolExecutor(threads) as pool:
            expected = max(1, min(max_frames, reader.info.frames_at(reader.fps)))
            frames = timed(islice(iter(reader), max_frames), timer, "decode")
            analysed = 0
            everyone: list[list[FaceLandmarks]] = []
            thumbnails: list[np.ndarray] = []
            while batch := list(islice(frames, chunk)):
                if choosing is None:
                    with timer.stage("detect_align", sync=False):
                        faces = list(pool.map(detect, batch))
                    if track.used is None:
                        first = next((face for face in faces if face is not None), None)
                        track.used = None if first is None else FaceUsed(FaceChoice.LARGEST.value, first.box, 1.0)
                    track.extend([None if face is None else aligner.transform(face.points) for face in faces])
                else:
                    with timer.stage("detect_align", sync=False):
                        everyone.extend(pool.map(choosing.detect_all, batch))
                        thumbnails.extend(thumbnail(frame, choosing.settings) for frame in batch)
                analysed += len(batch)
                if should_cancel is not None and should_cancel():
                    raise JobCancelled("the job was cancelled")
                on_progress(min(1.0, analysed / expected))
            if choosing is not None:
                envelope = None
                if choosing.choice == FaceChoice.ACTIVE_SPEAKER.value:
                    waveform = load_audio(video, choosing.sample_rate)
                    envelope = speech_envelope(waveform, choosing.sample_rate, choosing.fps, len(everyone))
                selection = select_faces(
                    choosing.choice, choosing.face_box, everyone, thumbnails, envelope, choosing.settings
                )
                track.used = selection.used
                track.extend([None if face is None else aligner.transform(face.points) for face in selection.faces])
    except AnalysisStopped:
        track.finish()
    except BaseException as error:  # noqa: BLE001 - handed to the generation thread, which raises it
        track.finish(error)
    else:
        track.finish()


def probe(video: Path) -> VideoInfo:
    """The video's stream facts (size, rate), read before the analysis starts."""
    with VideoReader(video) as reader:
        return reader.info


def timed(frames: Iterator[np.ndarray], timer: StageTimer, stage: str) -> Iterator[np.ndarray]:
    """``frames``, with the time spent producing each one added to ``stage``."""
    iterator = iter(frames)
    while True:
        with timer.stage(stage, sync=False):
            frame = next(iterator, None)
        if frame is None:
            return
        yield frame
