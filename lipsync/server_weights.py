"""The weight set a Triton model loads: a named version that must be present, or the tiny demo weights,
written on first use. Apart from :mod:`lipsync.weights` because writing the tiny weights needs
:mod:`lipsync.tiny` (torch and the model code), which itself builds on :mod:`lipsync.weights`."""

from __future__ import annotations

import fcntl
from pathlib import Path

from lipsync.weights import (
    WeightPaths,
    chosen_version,
    missing,
    present_weights,
    weight_paths,
)


def weights_for(choice: str, root: str | Path | None = None) -> tuple[str, WeightPaths]:
    """The weight set a server loads: ``(version name, paths)``.

    ``choice`` is a version name from the weights config ("1.5", "1.6", "tiny") or "auto"
    (:func:`chosen_version`). Tiny weights are written on first use; a named real version must be
    present (``WeightsError`` otherwise).
    """
    choice = chosen_version(choice, root)
    if choice != "tiny":
        return choice, present_weights(choice, root)
    tiny_root = root if root is None else Path(root) / "tiny"
    paths = weight_paths(choice, tiny_root)
    if not missing(paths):
        return choice, paths
    # Several server processes may start at once (a model's instances, the generation model): one writes,
    # the others wait for it and then find the files complete.
    paths.unet.parent.mkdir(parents=True, exist_ok=True)
    with open(paths.unet.parent / ".writing", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if missing(paths):
            from lipsync.tiny import (
                write_tiny_weights,  # torch and the model code, only when they are written
            )

            write_tiny_weights(tiny_root)
    return choice, paths
