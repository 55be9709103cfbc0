"""One job from in-memory media: what a server receives (file bytes) and sends back (mp4 bytes + info).

Servers hand over whole files as bytes; the pipeline streams from and to files, so a job lives in its
own temporary folder, removed when the job ends however it ends. Errors are
:class:`lipsync.errors.LipSyncError` of a kind (``bad_input`` for what a caller can fix: not a video,
no speech, no face, an option out of range; ``cancelled`` when the cancellation check fired); anything
else is the server's fault.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any

from lipsync import contract
from lipsync.errors import BadInput, LipSyncError
from lipsync.heap import release_free_memory
from lipsync.pipeline import LipSyncPipeline, LipSyncResult, ProgressCallback
from lipsync.progress import JobSize
from lipsync.sampling import CancelCheck


def _check(self: Any) -> None:
    contract.check(asdict(self))


if TYPE_CHECKING:

    class JobOptions:
        """:data:`JobOptions` as type checkers see it: its fields are the contract's options."""

        def __init__(self, **options: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...
else:
    JobOptions = make_dataclass(
        "JobOptions",
        [(option.name, option.type | None, field(default=option.default)) for option in contract.OPTIONS],
        namespace={
            "__post_init__": _check,
            "__doc__": "A job's options, one field per :data:`lipsync.contract.OPTIONS` "
            "entry (checked against it); ``None``: the served configuration decides.",
        },
        frozen=True,
    )
    JobOptions.__module__ = __name__


def pipeline_arguments(options: Any) -> dict[str, Any]:
    """``LipSyncPipeline.run``'s keyword arguments for ``options`` (a :data:`JobOptions`); ``version`` is the
    server's business (it picks the weights), not the pipeline's."""
    return {name: value for name, value in asdict(options).items() if name != "version"}


@dataclass(frozen=True)
class JobOutput:
    video: bytes
    """The lip-synced H.264/AAC mp4."""
    result: LipSyncResult

    def info(self) -> dict[str, Any]:
        """Frames, face-less frames and seconds per stage, as JSON-ready values."""
        return {
            "frames": self.result.frames,
            "faceless_frames": self.result.faceless_frames,
            "devices": self.result.devices,
            "seconds": self.result.seconds,
            "face": self.result.face,
        }


def run_job(
    pipeline: LipSyncPipeline,
    video: bytes,
    audio: bytes,
    options: JobOptions,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    on_plan: Callable[[JobSize], None] | None = None,
) -> JobOutput:
    """Lip-sync ``video`` (any container the decoder reads) to ``audio`` (an audio file or a video with sound);
    ``progress``, ``should_cancel`` and ``on_plan`` as in :meth:`LipSyncPipeline.run`."""
    if not video:
        raise BadInput("the video is empty")
    if not audio:
        raise BadInput("the audio is empty")
    with TemporaryDirectory(prefix="lipsync-job-") as folder:
        video_path, audio_path, output = Path(folder, "video"), Path(folder, "audio"), Path(folder, "out.mp4")
        video_path.write_bytes(video)
        audio_path.write_bytes(audio)
        try:
            result = pipeline.run(
                video_path,
                audio_path,
                output,
                **pipeline_arguments(options),
                progress=progress,
                should_cancel=should_cancel,
                on_plan=on_plan,
            )
        except LipSyncError as exc:  # say "the video", not the server's temporary path
            message = str(exc).replace(str(video_path), "the video").replace(str(audio_path), "the audio")
            raise LipSyncError(message, exc.kind) from exc
        finally:
            release_free_memory()  # a server process runs job after job: what this one freed goes back now
        return JobOutput(output.read_bytes(), result)
