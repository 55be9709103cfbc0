"""Speed-path pieces of the UNet: the frame-pooled GroupNorm and opt-in compilation (``CompiledUNet``).

Compilation is checked with the ``aot_eager`` backend: the same graph capture with a symbolic batch
size that Inductor compiles on the GPU, without minutes of C++ code generation on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from support.clips import demo_frames, speech, write_video, write_wav
from support.files import TINY_UNET_CONFIG
from torch import nn
from torch._dynamo.utils import counters

from lipsync.config import ConfigError, read_yaml
from lipsync.lifecycle import compile_unet, is_compiled, start_compiling, warm_up
from lipsync.models import build_unet
from lipsync.models.compiled import CompiledUNet
from lipsync.models.resnet import FramePooledGroupNorm


def _pooled_and_reference(dtype: torch.dtype, fuse_silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Our norm on ``(B·F, C, H, W)`` vs ``nn.GroupNorm`` on the official 5-D layout, in fp64."""
    windows, frames, channels, height, width = 3, 5, 64, 6, 7
    generator = torch.Generator().manual_seed(0)
    norm = FramePooledGroupNorm(8, channels, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=generator))
        norm.bias.copy_(torch.randn(channels, generator=generator))
    # An offset per channel makes the mean matter (pooling errors would show).
    folded = torch.randn(windows * frames, channels, height, width, generator=generator) * 2 + torch.randn(channels, 1, 1, generator=generator) * 3
    official = nn.GroupNorm(8, channels, eps=1e-5).double()
    official.load_state_dict(norm.state_dict())
    five_d = folded.double().view(windows, frames, channels, height, width).transpose(1, 2)
    reference = official(five_d).transpose(1, 2).reshape(folded.shape)
    if fuse_silu:
        reference = F.silu(reference)
    with torch.no_grad():
        ours = norm.to(dtype)(folded.to(dtype), frames, fuse_silu=fuse_silu)
    return ours, reference


@pytest.mark.parametrize("fuse_silu", [False, True])
def test_pooled_group_norm_equals_group_norm_on_the_five_dimensional_layout(fuse_silu: bool) -> None:
    ours, reference = _pooled_and_reference(torch.float32, fuse_silu)
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert ((ours.double() - reference).norm() / reference.norm()).item() < 1e-6


def test_pooled_group_norm_keeps_bf16_within_its_rounding() -> None:
    ours, reference = _pooled_and_reference(torch.bfloat16, fuse_silu=True)
    assert ours.dtype == torch.bfloat16
    assert ((ours.double() - reference).norm() / reference.norm()).item() < 1e-2


FRAMES = 16
"""Window length the compiled UNet is built for."""


def _inputs(batch: int, generator: torch.Generator, frames: int = FRAMES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random tiny-UNet inputs for ``batch`` rows of ``frames`` frames at 16×16 latents."""
    sample = torch.randn(batch, 13, frames, 16, 16, generator=generator)
    audio = torch.randn(batch * frames, 50, 64, generator=generator)
    return sample, torch.tensor(501), audio


@pytest.fixture(scope="module")
def random_small_unet(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """A two-level cut of the tiny UNet (a third of its compile time on 2 cores), every weight random
    (zero-initialised motion outputs would hide errors). It keeps all block kinds, the motion modules
    and the upsampler (whose diffusers original branches at 64 frames)."""
    config = read_yaml(TINY_UNET_CONFIG, "UNet config")
    config["model"].update(
        block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
        up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"], layers_per_block=1, motion_module_resolutions=[1, 2],
    )
    path = tmp_path_factory.mktemp("unet") / "two_levels.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    unet = build_unet(path).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return unet


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@torch.no_grad()
def test_compiled_unet_equals_eager_at_every_batch_size_from_one_compilation(random_small_unet) -> None:
    """One window with guidance (2 rows), several windows (4, 6 rows) and the cap share one compilation."""
    compiled = CompiledUNet(random_small_unet, frames=FRAMES, backend="aot_eager")
    generator = torch.Generator().manual_seed(0)
    graphs_before = counters["stats"]["unique_graphs"]
    for batch in (2, 4, 6, 8):
        sample, timestep, audio = _inputs(batch, generator)
        assert _relative(compiled(sample, timestep, audio), random_small_unet(sample, timestep, audio)) < 1e-5
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    assert compiled.dtype == random_small_unet.dtype and compiled.device == random_small_unet.device


@torch.no_grad()
def test_compiled_feature_caching_passes_equal_eager(random_small_unet) -> None:
    compiled = CompiledUNet(random_small_unet, frames=FRAMES, backend="aot_eager")
    sample, timestep, audio = _inputs(2, torch.Generator().manual_seed(1))
    noise, deep = compiled.forward_caching(sample, timestep, audio)
    eager_noise, eager_deep = random_small_unet.forward_caching(sample, timestep, audio)
    assert _relative(noise, eager_noise) < 1e-5 and _relative(deep, eager_deep) < 1e-5
    shallow = compiled.forward_shallow(sample, torch.tensor(481), audio, deep)
    assert _relative(shallow, random_small_unet.forward_shallow(sample, torch.tensor(481), audio, eager_deep)) < 1e-5


@pytest.mark.parametrize(("batch", "frames"), [(2, 5), (1, FRAMES)], ids=["shorter-window", "one-row"])
@torch.no_grad()
def test_compiled_unet_runs_uncovered_calls_eagerly_without_compiling(random_small_unet, batch: int, frames: int) -> None:
    """A clip's shorter last window, or one window without guidance, must not cost a compilation mid-job."""
    compiled = CompiledUNet(random_small_unet, frames=FRAMES, backend="aot_eager")
    graphs_before = counters["stats"]["unique_graphs"]
    sample, timestep, audio = _inputs(batch, torch.Generator().manual_seed(2), frames=frames)
    assert not compiled.covers(sample)
    assert torch.equal(compiled(sample, timestep, audio), random_small_unet(sample, timestep, audio))
    assert counters["stats"]["unique_graphs"] == graphs_before


def test_compiling_leaves_the_module_and_its_keys_alone(random_small_unet) -> None:
    keys = list(random_small_unet.state_dict())
    compiled = CompiledUNet(random_small_unet, frames=FRAMES)
    assert compiled.unet is random_small_unet
    assert list(random_small_unet.state_dict()) == keys


def test_pipeline_holds_a_compiled_unet_when_the_settings_say_so_and_serves_the_eager_one_first(tiny_weights) -> None:
    from lipsync.pipeline import LipSyncPipeline, PipelineSettings

    pipeline = LipSyncPipeline.from_weights(tiny_weights, settings=PipelineSettings.load(compile_unet=True))
    replica = pipeline.replicas[0]
    assert isinstance(replica.compiled, CompiledUNet) and replica.compiled.unet is replica.denoiser.unet
    assert not is_compiled(pipeline)
    plain = LipSyncPipeline.from_weights(tiny_weights)
    assert plain.replicas[0].compiled is None and is_compiled(plain)


class _CaptureFlag:
    """A noise predictor with ``GraphedUNet``'s ``capturing`` switch, recording it at every call."""

    def __init__(self, inner) -> None:
        self.inner, self.capturing, self.seen = inner, True, []
        self.dtype, self.device = inner.dtype, inner.device

    def __call__(self, sample, timestep, audio):
        self.seen.append(self.capturing)
        return self.inner(sample, timestep, audio)


def _compiling_pipeline(tiny_weights, unet, **kwargs):
    """A tiny pipeline on ``unet`` whose replica compiles it with Dynamo's ``eager`` backend: the real
    switch and graph capture, no code generation (the compiled maths are the tests above)."""
    from dataclasses import replace

    from lipsync.pipeline import LipSyncPipeline

    pipeline = LipSyncPipeline.from_weights(tiny_weights, **kwargs)
    replica = pipeline.replicas[0]
    serving = replica.denoiser.unet = _CaptureFlag(unet)
    compiled = CompiledUNet(unet, frames=FRAMES, backend="eager")
    pipeline.replicas[0] = replace(replica, compiled=compiled)
    return pipeline, serving, compiled


def test_jobs_run_on_the_eager_unet_without_new_captures_while_it_compiles_and_on_the_compiled_one_after(
    tiny_weights, random_small_unet, tmp_path
) -> None:
    """``start_compiling`` compiles every mode's passes beside running jobs, then switches the denoiser."""
    from lipsync.batching import BatchingSettings

    video = write_video(tmp_path / "one-window.mp4", demo_frames(FRAMES))
    audio = write_wav(tmp_path / "one-window.wav", speech(FRAMES / 25))
    pipeline, serving, compiled = _compiling_pipeline(
        tiny_weights, random_small_unet, windows_per_call=1, batching=BatchingSettings(4, 1.0)
    )
    lines: list[str] = []
    graphs_before = counters["stats"]["unique_graphs"]
    try:
        thread = start_compiling(pipeline, log=lines.append)
        while thread.is_alive() and not serving.seen:
            pipeline.run(video, audio, tmp_path / "during.mp4", inference_steps=1)
        thread.join(timeout=600)
        assert not thread.is_alive() and "compiled UNet serving on cpu" in lines[-1]
        assert lines[0] == "lipsync: compiling the UNet in the background on cpu"
        assert [line.split(", ")[1] for line in lines[1:-1]] == ["exact", "fast"]
        assert counters["stats"]["unique_graphs"] - graphs_before == 2  # the full pass (exact and fast) and the shallow one
        assert False in serving.seen  # calls beside the compilation were told not to capture
        assert serving.capturing  # and may again once it is done
        calls = len(serving.seen)
        pipeline.run(video, audio, tmp_path / "after.mp4", inference_steps=1)
        assert len(serving.seen) == calls and pipeline.denoiser.unet is compiled and is_compiled(pipeline)
        compile_unet(pipeline)  # nothing left to compile
        assert counters["stats"]["unique_graphs"] - graphs_before == 2
    finally:
        pipeline.close()


def test_a_failed_compilation_is_logged_and_the_eager_unet_keeps_serving(tiny_weights, random_small_unet) -> None:
    from dataclasses import replace

    pipeline, serving, _ = _compiling_pipeline(tiny_weights, random_small_unet)
    def failing_backend(graph, example_inputs):
        raise RuntimeError("the compiler gave up")

    broken = CompiledUNet(serving.inner, frames=FRAMES, backend=failing_backend)
    pipeline.replicas[0] = replace(pipeline.replicas[0], compiled=broken)
    lines: list[str] = []
    start_compiling(pipeline, log=lines.append).join(timeout=120)
    assert "compiling the UNet failed" in lines[-1] and pipeline.denoiser.unet is serving and serving.capturing


def test_compilation_defaults_to_cuda_only() -> None:
    from lipsync.pipeline import PipelineSettings

    settings = PipelineSettings.load()
    assert settings.compile_unet == "auto"
    assert settings.compiles_on(torch.device("cuda")) and not settings.compiles_on(torch.device("cpu"))


def test_compile_flag_must_be_a_boolean_or_auto() -> None:
    from lipsync.pipeline import PipelineSettings

    with pytest.raises(ConfigError, match="compile_unet"):
        PipelineSettings.load(compile_unet="yes")


class _CallRecorder:
    """A noise predictor that records the batch rows of every call to the one it wraps."""

    def __init__(self, inner) -> None:
        self.inner, self.rows = inner, []
        self.dtype, self.device = inner.dtype, inner.device

    def __call__(self, sample, timestep, audio):
        self.rows.append(sample.shape[0])
        return self.inner(sample, timestep, audio)


def test_warm_up_reaches_one_job_and_the_batchers_cap_with_guidance(tiny_weights, random_small_unet) -> None:
    """Both compiled batch ranges, one job's call and the batcher's largest call are ready before serving
    (on the cheaper cut of the UNet: warm-up only calls it)."""
    from lipsync.batching import BatchingSettings
    from lipsync.pipeline import LipSyncPipeline

    pipeline = LipSyncPipeline.from_weights(
        tiny_weights, windows_per_call=2, batching=BatchingSettings(max_windows=4, max_delay_ms=0)
    )
    try:
        recorder = pipeline.denoiser.unet = _CallRecorder(random_small_unet)
        lines: list[str] = []
        warm_up(pipeline, log=lines.append)
        assert set(recorder.rows) == {2, 4, 8}  # 1, 2 and 4 windows, each twice for guidance
        assert len(lines) == 3
    finally:
        pipeline.close()


class _MemoryCapped(_CallRecorder):
    """A UNet behind a memory cap: a call of more than ``max_rows`` batch rows runs out of memory."""

    def __init__(self, inner, max_rows: int) -> None:
        super().__init__(inner)
        self.max_rows = max_rows

    def __call__(self, sample, timestep, audio):
        if sample.shape[0] > self.max_rows:
            self.rows.append(sample.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in cap)")
        return super().__call__(sample, timestep, audio)


def test_a_warm_up_shape_over_the_memory_cap_makes_the_batcher_take_smaller_calls(tiny_weights, random_small_unet) -> None:
    """A server under a cap starts and serves with the calls that fit, rather than failing its warm-up
    (on the cheaper cut of the UNet: warm-up only calls it)."""
    from lipsync.batching import BatchingSettings
    from lipsync.pipeline import LipSyncPipeline

    pipeline = LipSyncPipeline.from_weights(
        tiny_weights, windows_per_call=2, batching=BatchingSettings(max_windows=4, max_delay_ms=0)
    )
    try:
        capped = pipeline.denoiser.unet = _MemoryCapped(random_small_unet, max_rows=4)  # 2 windows, guided
        lines: list[str] = []
        warm_up(pipeline, log=lines.append)
        assert pipeline.denoiser.max_windows == 2
        assert capped.rows.count(8) == 1 and set(capped.rows) == {8, 4, 2}  # 4 windows tried once, then 2 and 1
        assert "4 window(s) per UNet call do not fit in GPU memory; calls take at most 2" in lines[0]
        assert len(lines) == 3
    finally:
        pipeline.close()


@pytest.mark.parametrize("output_size", [None, (9, 11)])
@pytest.mark.parametrize("channels_last", [False, True])
@torch.no_grad()
def test_upsampler_equals_diffusers_upsample2d_for_every_batch_size(output_size, channels_last: bool) -> None:
    """Our upsampler drops diffusers' batch-size branch (a compile guard) and computes the same: bit for bit
    on the contiguous activations of eager mode, within rounding on another layout (the convolution may
    pick another algorithm)."""
    from diffusers.models.upsampling import Upsample2D

    from lipsync.models.blocks import Upsample

    ours, theirs = Upsample(8, use_conv=True, out_channels=8), Upsample2D(8, use_conv=True, out_channels=8)
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for frames in (32, 64):  # below and at diffusers' branch
        hidden = torch.randn(frames, 8, 5, 6, generator=torch.Generator().manual_seed(frames))
        if channels_last:
            hidden = hidden.to(memory_format=torch.channels_last)
        expected = theirs(hidden, output_size=output_size)
        if channels_last:
            torch.testing.assert_close(ours(hidden, output_size=output_size), expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(ours(hidden, output_size=output_size), expected)
