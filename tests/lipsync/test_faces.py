"""Face detection (MediaPipe on the demo clip), alignment, the mouth mask and paste-back, on CPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import av
import cv2
import numpy as np
import pytest
import yaml
from support.files import DEMO_VIDEO

from lipsync.config import ConfigError
from lipsync.faces import (
    FaceAligner,
    FacePaster,
    FaceSettings,
    MediaPipeFaceDetector,
    crop_size,
    load_mask,
    render_mask_image,
    similarity_transform,
    template_points,
)
from lipsync.faces.insightface_backend import (
    InsightFaceDetector,
    points_from_106,
    select_face,
)
from lipsync.faces.settings import FACES_CONFIG


@pytest.fixture(scope="module")
def settings() -> FaceSettings:
    return FaceSettings.load()


@pytest.fixture(scope="module")
def detector(settings: FaceSettings):
    detector = MediaPipeFaceDetector(settings.mediapipe)
    yield detector
    detector.close()


@pytest.fixture(scope="module")
def demo_frames() -> list[np.ndarray]:
    with av.open(str(DEMO_VIDEO)) as container:
        return [frame.to_ndarray(format="rgb24") for _, frame in zip(range(20), container.decode(video=0))]


def _similarity(scale: float, angle_deg: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.concatenate([scale * rotation, np.array(shift, dtype=np.float64)[:, None]], axis=1)


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:, :2].T + affine[:, 2]


# --- settings -------------------------------------------------------------------------------------------


def test_settings_describe_official_geometry(settings: FaceSettings) -> None:
    assert settings.insightface.points.left_brow == (43, 48, 49, 51, 50)
    assert settings.insightface.points.right_brow == (101, 102, 103, 104, 105)
    assert settings.insightface.points.nose == (74, 77, 83, 86)
    assert settings.alignment.template == ((17.0, 20.0), (58.0, 20.0), (37.5, 40.0))
    assert settings.mask_image_path is None


def test_malformed_settings_raise_config_error(tmp_path: Path) -> None:
    raw = yaml.safe_load(FACES_CONFIG.read_text())
    del raw["alignment"]["ema_previous"]
    path = tmp_path / "faces.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="ema_previous"):
        FaceSettings.load(path)


@pytest.mark.parametrize(("resolution", "expected"), [(128, (105, 140)), (256, (210, 280)), (512, (420, 560))])
def test_crop_sizes(settings: FaceSettings, resolution: int, expected: tuple[int, int]) -> None:
    assert crop_size(resolution, settings.alignment) == expected
    assert FaceAligner(resolution, settings.alignment).crop_size == expected


def test_crop_size_rejects_fractional_crops(settings: FaceSettings) -> None:
    with pytest.raises(ValueError, match="whole pixels"):
        crop_size(200, settings.alignment)


def test_template_scales_with_resolution(settings: FaceSettings) -> None:
    np.testing.assert_allclose(template_points(256, settings.alignment), [[47.6, 56], [162.4, 56], [105, 112]])
    np.testing.assert_allclose(template_points(512, settings.alignment), 2 * template_points(256, settings.alignment))


# --- detection ------------------------------------------------------------------------------------------


def test_mediapipe_finds_the_demo_face(detector: MediaPipeFaceDetector, demo_frames: list[np.ndarray]) -> None:
    results = [detector.detect(frame) for frame in demo_frames]
    assert all(result is not None for result in results)
    for result in results:
        left, right, nose = result.points
        x1, y1, x2, y2 = result.box
        assert 0.5 <= result.score <= 1
        assert x1 < left[0] < nose[0] < right[0] < x2 and y1 <= min(left[1], right[1]) < nose[1] < y2
        brow_distance = np.linalg.norm(right - left)
        assert 60 < brow_distance < 160  # the demo face is ~240 px wide
        # The nose centre sits on the perpendicular bisector of the brows, roughly half a brow
        # distance below them (the clip's head turns a little, hence the tolerance).
        along = (right - left) / brow_distance
        offset = nose - (left + right) / 2
        assert abs(offset @ along) < 0.12 * brow_distance
        assert 0.4 * brow_distance < np.cross(along, offset) < 0.75 * brow_distance


def test_mediapipe_finds_nothing_in_blank_or_noise(detector: MediaPipeFaceDetector) -> None:
    assert detector.detect(np.zeros((360, 640, 3), np.uint8)) is None
    noise = np.random.default_rng(0).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    assert detector.detect(noise) is None


def test_detector_rejects_non_rgb_frames(detector: MediaPipeFaceDetector) -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(np.zeros((64, 64), np.uint8))


# --- InsightFace mapping (no weights needed) -----------------------------------------------------------


def test_106_point_mapping_rounds_then_averages(settings: FaceSettings) -> None:
    landmarks = np.random.default_rng(1).uniform(0, 500, (106, 2))
    landmarks[[43, 48, 49, 51, 50]] = [[10.4, 20.6], [12.4, 20.6], [14.4, 20.6], [16.4, 20.6], [18.4, 20.6]]
    landmarks[101:106] = [[50.5, 21.5], [52.5, 21.5], [54.5, 21.5], [56.5, 21.5], [58.5, 21.5]]
    landmarks[[74, 77, 83, 86]] = [[30.0, 40.0], [26.0, 44.0], [34.0, 44.0], [30.2, 47.7]]
    points = points_from_106(landmarks, settings.insightface)
    # Rounded first: 10.4 → 10, 20.6 → 21; halves go to even (50.5 → 50, 21.5 → 22).
    np.testing.assert_array_equal(points, [[14.0, 21.0], [54.0, 22.0], [30.0, 44.0]])


def test_106_point_mapping_needs_106_points(settings: FaceSettings) -> None:
    with pytest.raises(ValueError, match="106"):
        points_from_106(np.zeros((68, 2)), settings.insightface)


def test_insightface_keeps_the_largest_face_that_passes_official_filters(settings: FaceSettings) -> None:
    config = settings.insightface
    boxes = np.array(
        [
            [0, 0, 49, 100],  # too narrow (w < 50)
            [0, 0, 100, 79],  # too short (h < 80)
            [0, 0, 400, 200],  # too wide (w/h = 2)
            [0, 0, 300, 400],  # largest, but unsure
            [10, 10, 110.9, 130.9],  # 100×120 after truncation
            [0, 0, 150, 200],  # the winner
            [5, 5, 155, 205],  # same size, later in score order
        ],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.9, 0.9, 0.49, 0.9, 0.6, 0.95])
    assert select_face(boxes, scores, config) == 5
    assert select_face(boxes[:5], scores[:5], config) == 4
    assert select_face(boxes[:4], scores[:4], config) is None
    assert select_face(np.zeros((0, 4)), np.zeros(0), config) is None


@pytest.mark.skipif(importlib.util.find_spec("insightface") is not None, reason="insightface is installed")
def test_insightface_backend_explains_the_missing_extra(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match=r"lipsync-serve\[insightface\]"):
        InsightFaceDetector(tmp_path / "det_10g.onnx", tmp_path / "2d106det.onnx")


def test_insightface_backend_wiring(settings: FaceSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend's calls into insightface, against a stand-in package (no weights here)."""
    landmarks = np.zeros((106, 2))
    landmarks[[43, 48, 49, 51, 50]] = (120.2, 100.0)
    landmarks[101:106] = (180.0, 100.4)
    landmarks[[74, 77, 83, 86]] = (150.0, 140.6)
    calls: dict[str, object] = {}

    class Detector:
        taskname = "detection"

        def prepare(self, ctx_id: int, **kwargs: object) -> None:
            calls["detector"] = (ctx_id, kwargs)

        def detect(self, img: np.ndarray, max_num: int = 0, metric: str = "default"):
            boxes = np.array([[0, 0, 300, 400, 0.3], [100, 50, 250, 250, 0.9]], np.float32)
            return boxes, np.zeros((2, 5, 2), np.float32)

    class Landmarker:
        taskname = "landmark_2d_106"

        def prepare(self, ctx_id: int, **kwargs: object) -> None:
            calls["landmarker"] = ctx_id

        def get(self, img: np.ndarray, face: SimpleNamespace) -> np.ndarray:
            calls["face"] = face
            return landmarks

    def get_model(path: str, providers: list[str]):
        calls.setdefault("providers", []).append(providers)
        return Detector() if path.endswith("det_10g.onnx") else Landmarker()

    package = ModuleType("insightface")
    package.app = ModuleType("insightface.app")
    package.app.common = ModuleType("insightface.app.common")
    package.app.common.Face = lambda **fields: SimpleNamespace(**fields)
    package.model_zoo = ModuleType("insightface.model_zoo")
    package.model_zoo.get_model = get_model
    for module in (package, package.app, package.app.common, package.model_zoo):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    for name in ("det_10g.onnx", "2d106det.onnx"):
        (tmp_path / name).write_bytes(b"")

    detector = InsightFaceDetector(tmp_path / "det_10g.onnx", tmp_path / "2d106det.onnx", settings.insightface)
    result = detector.detect(np.zeros((480, 640, 3), np.uint8))

    assert calls["providers"] == [list(settings.insightface.providers)] * 2
    assert calls["detector"] == (0, {"input_size": (512, 512), "det_thresh": 0.5})
    np.testing.assert_array_equal(calls["face"].bbox, [100, 50, 250, 250])  # the unsure, larger box lost
    assert result.box == (100.0, 50.0, 250.0, 250.0) and result.score == pytest.approx(0.9)
    np.testing.assert_array_equal(result.points, [[120, 100], [180, 100], [150, 141]])


# --- alignment ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "angle", "shift"), [(0.37, 0.0, (-80.0, 12.0)), (1.7, 23.0, (40.0, -300.0))])
def test_similarity_transform_recovers_a_known_transform(
    settings: FaceSettings, scale: float, angle: float, shift: tuple[float, float]
) -> None:
    template = template_points(256, settings.alignment)
    known = _similarity(scale, angle, shift)  # frame → crop
    points = _apply(cv2.invertAffineTransform(known), template)
    affine, bias = similarity_transform(points, template)
    np.testing.assert_allclose(affine, known, atol=1e-9)
    # The bias compares normalised nose positions, so only a rotation makes it non-zero.
    assert np.allclose(bias, 0, atol=1e-12) == (angle == 0.0)


def test_similarity_transform_never_reflects(settings: FaceSettings) -> None:
    template = template_points(256, settings.alignment)
    mirrored = template * [-1, 1] + [300, 0]  # brows swapped sides: the best fit would be a reflection
    affine, _ = similarity_transform(mirrored, template)
    assert np.linalg.det(affine[:, :2]) > 0


def test_aligner_warps_points_onto_the_template(settings: FaceSettings) -> None:
    aligner = FaceAligner(256, settings.alignment)
    known = _similarity(0.2, 0.0, (-20.0, -10.0))
    points = _apply(cv2.invertAffineTransform(known), aligner.template)  # whole pixels
    np.testing.assert_allclose(points, np.round(points), atol=1e-9)

    frame = np.zeros((700, 1000, 3), np.uint8)
    for x, y in np.round(points).astype(int):
        cv2.circle(frame, (x, y), 12, (255, 255, 255), -1)
    aligned = aligner.align(frame, points + 0.3)  # sub-pixel offsets vanish: points are rounded first
    np.testing.assert_allclose(aligned.affine, known, atol=1e-9)
    assert aligned.image.shape == (256, 256, 3) and aligned.image.dtype == np.uint8
    np.testing.assert_array_equal(aligner.warp(frame, aligned.affine), aligned.image)

    crop = cv2.warpAffine(frame, aligned.affine, aligner.crop_size)
    for x, y in np.round(aligner.template).astype(int):
        assert crop[y, x].min() == 255  # each marker landed on its template point
    # Beyond the frame the crop is filled with grey 127.
    corner = aligner.align(frame, points - 3000).image
    assert (corner == 127).all()


def test_aligner_smooths_the_bias_and_resets(settings: FaceSettings) -> None:
    aligner = FaceAligner(512, settings.alignment)
    first = _apply(cv2.invertAffineTransform(_similarity(0.5, 10.0, (30.0, 5.0))), aligner.template)
    second = _apply(cv2.invertAffineTransform(_similarity(0.45, -6.0, (20.0, 15.0))), aligner.template)
    affine1, bias1 = similarity_transform(np.round(first), aligner.template)
    affine2, bias2 = similarity_transform(np.round(second), aligner.template)

    got1 = aligner.transform(first)
    np.testing.assert_allclose(got1[:, 2], affine1[:, 2] + bias1)  # first frame: bias as is
    got2 = aligner.transform(second)
    np.testing.assert_allclose(got2[:, :2], affine2[:, :2])
    np.testing.assert_allclose(got2[:, 2], affine2[:, 2] + 0.2 * bias1 + 0.8 * bias2)

    aligner.reset()
    np.testing.assert_allclose(aligner.transform(second)[:, 2], affine2[:, 2] + bias2)


# --- mask -----------------------------------------------------------------------------------------------


def test_mask_is_binary_at_render_size(settings: FaceSettings) -> None:
    mask = load_mask(256, settings)
    assert mask.shape == (256, 256) and mask.dtype == np.float32
    assert set(np.unique(mask)) == {0.0, 1.0}
    # Official's mask generates 40.7 % of the face: the lower face, minus a notch under the nose.
    assert abs((mask == 0).mean() - 0.407) < 0.005
    at = lambda fx, fy: mask[int(fy * 256), int(fx * 256)]  # noqa: E731
    assert at(0.5, 0.75) == 0 and at(0.1, 0.45) == 0 and at(0.9, 0.45) == 0  # mouth, cheeks
    assert at(0.5, 0.45) == 1 and at(0.5, 0.2) == 1 and at(0.02, 0.98) == 1  # notch, eyes, corner


@pytest.mark.parametrize("resolution", [128, 512])
def test_mask_resizes_like_official(settings: FaceSettings, resolution: int) -> None:
    mask = load_mask(resolution, settings)
    assert mask.shape == (resolution, resolution)
    assert mask.min() >= 0 and mask.max() <= 1
    expected = cv2.resize(render_mask_image(settings.mask), (resolution, resolution), interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(mask, expected / np.float32(255))


def test_mask_image_path_overrides_the_polygon(settings: FaceSettings, tmp_path: Path) -> None:
    image = np.full((64, 64, 3), 255, np.uint8)
    image[40:] = 0
    path = tmp_path / "mask.png"
    cv2.imwrite(str(path), image)
    mask = load_mask(128, dataclasses.replace(settings, mask_image_path=path))
    assert (mask[:72] == 1).all() and (mask[88:] == 0).all()
    with pytest.raises(FileNotFoundError):
        load_mask(128, dataclasses.replace(settings, mask_image_path=tmp_path / "missing.png"))


# --- paste-back -----------------------------------------------------------------------------------------


def _footprint(affine: np.ndarray, crop: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Boolean map of the frame pixels the crop covers at all (bilinear reach included)."""
    ones = np.ones(crop[::-1], np.float32)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(ones, affine, shape[1::-1], flags=flags, borderMode=cv2.BORDER_CONSTANT) > 0


@pytest.mark.parametrize(
    ("resolution", "affine"),
    [
        (256, _similarity(1.1, 12.0, (60.0, -90.0))),  # reaches past the frame's left edge
        (128, _similarity(0.3, -20.0, (-40.0, -60.0))),  # a big face: one crop pixel spans 3 frame pixels
    ],
)
def test_paste_leaves_everything_outside_the_face_untouched(
    settings: FaceSettings, resolution: int, affine: np.ndarray
) -> None:
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    aligner = FaceAligner(resolution, settings.alignment)
    paster = FacePaster(aligner.crop_size, settings.paste)
    face = rng.uniform(-1, 1, (resolution, resolution, 3)).astype(np.float32)
    out = paster.paste(frame, face, affine)

    assert out.dtype == np.uint8 and out.shape == frame.shape
    outside = ~_footprint(affine, aligner.crop_size, frame.shape)
    assert outside.any()
    np.testing.assert_array_equal(out[outside], frame[outside])
    changed = (out != frame).any(axis=-1)
    assert changed.sum() > 0.5 * (~outside).sum()
    assert changed[:, 0].any()  # pasted right up to the frame edge
    # A face entirely off the frame changes nothing.
    np.testing.assert_array_equal(paster.paste(frame, face, _similarity(1.0, 0.0, (5000.0, 0.0))), frame)


@pytest.mark.parametrize(("scale", "angle"), [(1.3, 8.0), (0.1, 0.0)])  # 0.1: a crop pixel spans 10 frame pixels
def test_paste_window_matches_whole_frame_compositing(settings: FaceSettings, scale: float, angle: float) -> None:
    """Working in the face's window gives what the formulas give on the whole frame."""
    rng = np.random.default_rng(3)
    crop = (105, 140)
    frame = rng.integers(0, 256, (1800, 1500, 3), dtype=np.uint8)
    affine = _similarity(scale, angle, (-50.0 * scale, -60.0 * scale))
    y, x = np.mgrid[0:128, 0:128] / 128
    face = np.stack([np.sin(3 * x + 1), np.cos(2 * y), x * y - 0.5], axis=-1).astype(np.float32)
    out = FacePaster(crop, settings.paste).paste(frame, face, affine)

    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    size = frame.shape[1::-1]
    resized = FacePaster(crop, settings.paste)._resize(face)
    warped = cv2.warpAffine(resized, affine, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    warped = np.clip(warped / 2 + 0.5, 0, 1) * 255
    mask = cv2.warpAffine(np.ones(crop[::-1], np.float32), affine, size, flags=flags)
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))
    w_edge = int(mask.sum(dtype=np.float64) ** 0.5) // 20
    soft = cv2.erode(mask, np.ones((2 * w_edge, 2 * w_edge), np.uint8))
    soft = cv2.GaussianBlur(soft, (2 * w_edge + 1,) * 2, 0.3 * (w_edge - 1) + 0.8)
    soft[mask == 0] = 0
    soft, mask = soft[..., None], mask[..., None]
    expected = (soft * (mask * warped) + (1 - soft) * frame.astype(np.float32)).astype(np.uint8)
    # OpenCV quantises sample positions to 1/32 pixel from each image's own origin, hence ±1.
    difference = np.abs(out.astype(np.int16) - expected)
    assert difference.max() <= 1


def test_paste_round_trips_the_aligned_face(settings: FaceSettings, detector, demo_frames) -> None:
    frame = demo_frames[0]
    aligner = FaceAligner(256, settings.alignment)
    paster = FacePaster(aligner.crop_size, settings.paste)
    aligned = aligner.align(frame, detector.detect(frame).points)
    out = paster.paste(frame, aligned.image.astype(np.float32) / 127.5 - 1, aligned.affine)

    outside = ~_footprint(aligned.affine, aligner.crop_size, frame.shape)
    np.testing.assert_array_equal(out[outside], frame[outside])
    # Inside, away from the feathered edge, the face comes back up to resampling error.
    inner = cv2.erode((~outside).astype(np.uint8), np.ones((41, 41), np.uint8)).astype(bool)
    error = np.abs(out.astype(np.int16) - frame.astype(np.int16))[inner]
    assert error.mean() < 2.0
    assert np.percentile(error, 99) < 16
