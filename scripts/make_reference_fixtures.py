"""Write parity fixtures produced by the *official* LatentSync code (tests/fixtures/reference/).

Nothing from the official repository is copied here: this script imports its modules at run time
from a separate checkout (``--latentsync-repo``) and runs them on CPU in fp32, with weights set by
``lipsync.tiny.random_parameters_`` (values depend only on seed, key name and shape, so our own
modules with the same key names get identical weights without committing checkpoints).

Run it in a scratch environment that can import the official modules (see the README written next
to the fixtures for the exact versions), e.g.::

    <scratch-venv>/bin/python scripts/make_reference_fixtures.py --latentsync-repo <LatentSync checkout>

Cases (one safetensors file each, plus ``metadata.json``):
  unet_f16.safetensors, unet_f5.safetensors   one UNet forward (16 and 5 frames)
  audio_demo.safetensors                      whisper features + per-frame chunks of the demo audio
  audio_long.safetensors                      features of the demo audio tiled to 67.2 s (3 windows)
  ddim_cfg.safetensors                        the official 20-step DDIM + CFG loop on one window
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import types
import wave
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "reference"
DEMO_AUDIO = REPO_ROOT / "tests" / "fixtures" / "demo1_audio.wav"

UNET_CONFIG = REPO_ROOT / "configs" / "unet" / "tiny.yaml"
WHISPER_DIMS = REPO_ROOT / "configs" / "tiny" / "whisper_dims.json"
VAE_CONFIG = REPO_ROOT / "configs" / "tiny" / "vae_config.json"
SCHEDULER_CONFIG = REPO_ROOT / "configs" / "scheduler_config.json"

WEIGHT_SEED = 0
LONG_AUDIO_TILES = 7  # 7 x 9.6 s = 67.2 s -> three 30 s whisper windows (3000 + 3000 + 720 mel frames)


# --------------------------------------------------------------------------------------------------
# Stand-ins for official modules whose module-level imports cannot load here (torchvision, decord,
# kornia, insightface, cv2, soundfile). None of their functions is on the paths exercised below,
# except the few that the pipeline calls around its denoising loop, which are replaced by the
# deterministic fakes defined in `run_ddim_case`.
# --------------------------------------------------------------------------------------------------


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _unavailable(*_args, **_kwargs):
    raise RuntimeError("stand-in: not available in the reference environment")


def install_stand_ins() -> None:
    # diffusers/transformers probe for torchvision/cv2 with find_spec, lazily: resolve everything the
    # official modules use while the real (absent) packages are visible.
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, ModelMixin  # noqa: F401
    from diffusers.models.attention import AdaLayerNorm, FeedForward  # noqa: F401
    from transformers import PreTrainedModel  # noqa: F401

    def zero_rank_log(logger, message: str) -> None:
        logger.info(message)

    _stub(
        "latentsync.utils.util",
        zero_rank_log=zero_rank_log,
        read_video=_unavailable,
        read_audio=_unavailable,
        write_video=_unavailable,
        check_ffmpeg_installed=lambda: None,
    )
    _stub(
        "latentsync.utils.image_processor",
        ImageProcessor=_unavailable,
        load_fixed_mask=_unavailable,
    )
    transforms = _stub("torchvision.transforms", InterpolationMode=types.SimpleNamespace(BICUBIC=None))
    _stub("torchvision", transforms=transforms)
    for name in ("cv2", "soundfile"):
        try:
            __import__(name)
        except ImportError:
            _stub(name, write=_unavailable)


THIRD_PARTY_STAND_INS = ("torchvision", "torchvision.transforms", "cv2", "soundfile")


def import_official(repo: Path) -> types.SimpleNamespace:
    sys.path.insert(0, str(repo))
    install_stand_ins()
    from latentsync.models.unet import UNet3DConditionModel
    from latentsync.pipelines import lipsync_pipeline
    from latentsync.whisper.audio2feature import Audio2Feature

    for name in THIRD_PARTY_STAND_INS:  # the official modules hold their references; hide them again
        if isinstance(sys.modules.get(name), types.ModuleType) and sys.modules[name].__spec__ is None:
            del sys.modules[name]
    return types.SimpleNamespace(
        UNet3DConditionModel=UNet3DConditionModel, Audio2Feature=Audio2Feature, pipeline_module=lipsync_pipeline
    )


def import_random_parameters():
    sys.path.insert(0, str(REPO_ROOT))
    from lipsync.tiny import random_parameters_

    return random_parameters_


def git_commit(repo: Path) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def fp16_exact_randn(shape, generator: torch.Generator) -> torch.Tensor:
    """Seeded N(0,1) values rounded to fp16, so storing them as fp16 is lossless (halves the fixture size)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).half()


def state_dict_summary(module: torch.nn.Module) -> dict:
    sd = module.state_dict()
    listing = "\n".join(f"{k} {list(v.shape)}" for k, v in sorted(sd.items()))
    return {
        "num_state_dict_keys": len(sd),
        "num_parameters": sum(p.numel() for p in module.parameters()),
        "num_parameter_tensors": sum(1 for _ in module.parameters()),
        "num_buffers": sum(1 for _ in module.buffers()),
        "num_buffer_elements": sum(b.numel() for b in module.buffers()),
        "sorted_keys_shapes_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "sorted_keys_shapes_format": "sha256 of '\\n'.join(f'{key} {list(shape)}') over sorted state_dict keys",
    }


# --------------------------------------------------------------------------------------------------
# a. UNet forward
# --------------------------------------------------------------------------------------------------


def build_unet(official, random_parameters_):
    model_cfg = yaml.safe_load(UNET_CONFIG.read_text())["model"]
    # The official loader is `from_pretrained(config, ckpt_path)` = from_config + load_state_dict;
    # with no checkpoint it is exactly from_config.
    unet = official.UNet3DConditionModel.from_config(model_cfg)
    random_parameters_(unet, WEIGHT_SEED)
    return unet.float().eval(), model_cfg


@torch.no_grad()
def run_unet_case(unet, frames: int, timestep: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = fp16_exact_randn((2, 13, frames, 16, 16), g)
    ehs = fp16_exact_randn((2 * frames, 50, 64), g)
    t = torch.tensor(timestep, dtype=torch.int64)  # 0-dim int64, like an entry of scheduler.timesteps
    out = unet(sample.float(), t, encoder_hidden_states=ehs.float()).sample
    return {"sample": sample, "timestep": t, "encoder_hidden_states": ehs, "out": out.contiguous()}


# --------------------------------------------------------------------------------------------------
# b. Audio2Feature
# --------------------------------------------------------------------------------------------------


def write_tiny_whisper(path: Path, dims: dict, random_parameters_) -> None:
    import whisper  # openai-whisper (PyPI), only to build a checkpoint in the OpenAI format

    model = whisper.model.Whisper(whisper.model.ModelDimensions(**dims))
    random_parameters_(model, WEIGHT_SEED)
    torch.save({"dims": dims, "model_state_dict": model.state_dict()}, path)


def read_wav_s16(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getframerate() == 16000 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def write_wav_s16(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples.astype("<i2").tobytes())


def check_against_pip_whisper(ckpt: Path, wav: Path, features: torch.Tensor) -> dict:
    """Recompute window 0 with PyPI openai-whisper to record which encoder outputs the official code keeps."""
    import whisper

    ck = torch.load(ckpt, weights_only=True)
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**ck["dims"]))
    model.load_state_dict(ck["model_state_dict"])
    model.eval()
    enc = model.encoder
    mel = whisper.log_mel_spectrogram(whisper.load_audio(str(wav)))  # whole clip, no 30 s padding
    n_valid = min(mel.shape[-1], 3000)
    seg = whisper.pad_or_trim(mel[:, :3000], 3000)[None]
    with torch.no_grad():
        x = torch.nn.functional.gelu(enc.conv1(seg))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.positional_embedding
        layers = [x]
        for block in enc.blocks:
            x = block(x)
            layers.append(x)
        post = enc.ln_post(x)
    stacked = torch.stack(layers, dim=2)[0, : n_valid // 2]  # (positions, 5, C)
    n = min(stacked.shape[0], features.shape[0])
    return {
        "pip_whisper_mel_frames": int(mel.shape[-1]),
        "max_abs_diff_vs_[pos_emb,block1..4]_no_ln_post": float((stacked[:n] - features[:n]).abs().max()),
        "max_abs_diff_layer4_vs_ln_post_output": float((post[0, :n] - features[:n, 4]).abs().max()),
    }


def run_audio_cases(official, random_parameters_, tmp: Path) -> tuple[dict, dict, dict]:
    dims = json.loads(WHISPER_DIMS.read_text())
    ckpt = tmp / "tiny_whisper_seed0.pt"
    write_tiny_whisper(ckpt, dims, random_parameters_)
    a2f = official.Audio2Feature(model_path=str(ckpt), device="cpu", num_frames=16, audio_feat_length=[2, 2])
    a2f.model.eval()

    # Demo audio.
    with torch.no_grad():
        feats = a2f.audio2feat(str(DEMO_AUDIO))
    chunks = a2f.feature2chunks(feature_array=feats, fps=25)
    n = len(chunks)
    pick = [0, 1, 2, n // 2, n - 3, n - 2, n - 1]
    windows = [a2f.get_sliced_feature(feature_array=feats, vid_idx=i, fps=25)[1] for i in pick]
    for i, j in enumerate(pick):
        assert torch.equal(chunks[j], a2f.get_sliced_feature(feature_array=feats, vid_idx=j, fps=25)[0])
    demo = {
        "features": feats.float().contiguous(),
        "num_chunks": torch.tensor(n, dtype=torch.int64),
        "chunk_indices": torch.tensor(pick, dtype=torch.int64),
        "chunks": torch.stack([chunks[i] for i in pick]).float().contiguous(),
        "chunk_feature_rows": torch.tensor(windows, dtype=torch.int64),
    }
    demo_samples = read_wav_s16(DEMO_AUDIO)
    demo_meta = {
        "audio": str(DEMO_AUDIO.relative_to(REPO_ROOT)),
        "audio_samples": int(demo_samples.size),
        "T": int(feats.shape[0]),
        "num_chunks": n,
        "features_dtype_from_official": str(feats.dtype),
        **check_against_pip_whisper(ckpt, DEMO_AUDIO, feats.float()),
    }

    # Long audio crossing the 30 s window boundaries.
    long_samples = np.tile(demo_samples, LONG_AUDIO_TILES)
    long_wav = tmp / "demo1_audio_x7.wav"
    write_wav_s16(long_wav, long_samples)
    with torch.no_grad():
        lfeats = a2f.audio2feat(str(long_wav))
    lchunks = a2f.feature2chunks(feature_array=lfeats, fps=25)
    T = lfeats.shape[0]
    long = {
        "T": torch.tensor(T, dtype=torch.int64),
        "num_chunks": torch.tensor(len(lchunks), dtype=torch.int64),
        "rows_1480_1520": lfeats[1480:1520].float().contiguous(),
        "rows_2980_3020": lfeats[2980:3020].float().contiguous(),
        "rows_last_20": lfeats[T - 20 :].float().contiguous(),
        "rows_last_20_start": torch.tensor(T - 20, dtype=torch.int64),
        "last_chunk": lchunks[-1].float().contiguous(),
    }
    long_meta = {
        "audio": f"np.tile(int16 samples of {DEMO_AUDIO.name}, {LONG_AUDIO_TILES}) written as 16 kHz mono s16 wav",
        "audio_samples": int(long_samples.size),
        "T": int(T),
        "num_chunks": len(lchunks),
    }
    return demo, long, {"whisper_dims": dims, "demo": demo_meta, "long": long_meta}


# --------------------------------------------------------------------------------------------------
# c. DDIM + CFG loop, driven through the official LipsyncPipeline.__call__
# --------------------------------------------------------------------------------------------------


def synthetic_mask(resolution: int) -> torch.Tensor:
    """(3, R, R) mask, 1 = keep, 0 = region to generate (a lower-centre rectangle)."""
    mask = torch.ones(3, resolution, resolution)
    r = resolution / 128
    mask[:, int(72 * r) : int(120 * r), int(32 * r) : int(96 * r)] = 0
    return mask


def run_ddim_case(official, unet, random_parameters_, repo: Path, tmp: Path) -> tuple[dict, dict]:
    from diffusers import AutoencoderKL, DDIMScheduler

    pm = official.pipeline_module
    frames, resolution, steps, guidance, seed = 16, 128, 20, 1.5, 1247

    vae_cfg = json.loads(VAE_CONFIG.read_text())
    vae = AutoencoderKL.from_config(vae_cfg)
    random_parameters_(vae, WEIGHT_SEED)
    vae = vae.float().eval()
    vae.config.scaling_factor = 0.18215  # as the official inference script sets them
    vae.config.shift_factor = 0

    scheduler = DDIMScheduler.from_pretrained(str(repo / "configs"))
    ours = DDIMScheduler.from_config(json.loads(SCHEDULER_CONFIG.read_text()))
    sched_diff = {k: (v, ours.config.get(k)) for k, v in scheduler.config.items() if ours.config.get(k) != v}

    g_inputs = torch.Generator().manual_seed(seed + 1)
    audio_chunks = fp16_exact_randn((frames, 50, 64), g_inputs)
    faces = torch.rand((frames, 3, resolution, resolution), generator=g_inputs) * 2 - 1
    mask3 = synthetic_mask(resolution)

    class FakeAudioEncoder:  # returns the seeded per-frame chunks instead of reading a file
        def audio2feat(self, _path):
            return None

        def feature2chunks(self, feature_array, fps):
            return [c.float() for c in audio_chunks]

    class FakeImageProcessor:  # the aligned faces are given directly (already in [-1, 1])
        def __init__(self, *_a, **_k):
            pass

        def prepare_masks_and_masked_images(self, images, affine_transform=False):
            images = images.float()
            return images, images * mask3, mask3[0:1].expand(images.shape[0], 1, -1, -1).clone()

    pm.ImageProcessor = FakeImageProcessor
    pm.load_fixed_mask = lambda *_a, **_k: mask3
    pm.read_audio = lambda _p: torch.zeros(16000)
    pm.read_video = lambda _p, use_decord=False: np.zeros((frames, 8, 8, 3), np.uint8)
    pm.write_video = lambda *_a, **_k: None
    pm.sf = types.SimpleNamespace(write=lambda *_a, **_k: None)
    pm.subprocess = types.SimpleNamespace(run=lambda *_a, **_k: None)

    pipe = pm.LipsyncPipeline(vae=vae, audio_encoder=FakeAudioEncoder(), unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    rec: dict = {}

    pipe.loop_video = lambda chunks, video: (video, faces, [[0, 0, 8, 8]] * frames, [None] * frames)
    pipe.restore_video = lambda f, video, boxes, mats: np.zeros((f.shape[0], 8, 8, 3), np.uint8)

    def wrap(name):
        original = getattr(pipe, name)

        def wrapped(*a, **k):
            out = original(*a, **k)
            rec[name] = out
            return out

        setattr(pipe, name, wrapped)

    for name in ("prepare_latents", "prepare_mask_latents", "prepare_image_latents"):
        wrap(name)
    original_decode = pipe.decode_latents

    def decode_latents(latents):
        rec["final_latents"] = latents.clone()
        return original_decode(latents)

    pipe.decode_latents = decode_latents
    steps_seen = []

    def callback(j, t, latents):
        steps_seen.append(int(t))
        if j == 0:
            rec["latents_after_step1"] = latents.clone()

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pipe(
            video_path="unused.mp4",
            audio_path="unused.wav",
            video_out_path=str(tmp / "unused_out.mp4"),
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            weight_dtype=torch.float32,
            height=resolution,
            width=resolution,
            temp_dir=str(tmp / "pipeline_temp"),
            generator=generator,
            callback=callback,
            callback_steps=1,
        )

    all_latents = rec["prepare_latents"]
    mask_lat, masked_lat = rec["prepare_mask_latents"]
    ref_lat = rec["prepare_image_latents"]
    for x in (mask_lat, masked_lat, ref_lat):
        assert x.shape[0] == 2 and torch.equal(x[0], x[1])  # CFG duplicates, identical halves
    init_noise = all_latents[:, :, :1]
    assert torch.equal(all_latents, init_noise.repeat(1, 1, frames, 1, 1))

    # Independent re-computation of the loop from the captured inputs (checks the formula we report).
    ac = scheduler.alphas_cumprod
    x = all_latents.clone()
    ehs = torch.cat([torch.zeros_like(audio_chunks), audio_chunks]).float()
    latents_step1 = None
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = torch.cat([torch.cat([x, x]), mask_lat, masked_lat, ref_lat], dim=1)
            e_u, e_a = unet(inp, t, encoder_hidden_states=ehs).sample.chunk(2)
            eps = e_u + guidance * (e_a - e_u)
            prev = int(t) - 1000 // steps
            a_t = ac[int(t)]
            a_prev = ac[prev] if prev >= 0 else ac[0]
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            if latents_step1 is None:
                latents_step1 = x.clone()
    recompute_err = float((x - rec["final_latents"]).abs().max())

    tensors = {
        "init_noise": init_noise.contiguous(),
        "mask_latents": mask_lat[:1].contiguous(),
        "masked_image_latents": masked_lat[:1].contiguous(),
        "ref_latents": ref_lat[:1].contiguous(),
        "audio_embeds": audio_chunks,
        "timesteps": scheduler.timesteps.clone().to(torch.int64),
        "latents_after_step1": rec["latents_after_step1"].contiguous(),
        "final_latents": rec["final_latents"].contiguous(),
    }
    meta = {
        "frames": frames,
        "resolution_px": resolution,
        "latent_hw": resolution // 8,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "eta": 0.0,
        "generator_seed": seed,
        "input_seed": seed + 1,
        "timesteps_seen_by_callback": steps_seen,
        "scheduler_config_official": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        "scheduler_config_differences_official_vs_ours": {k: list(v) for k, v in sched_diff.items()},
        "tiny_vae_config": vae_cfg,
        "vae_scaling_factor": 0.18215,
        "vae_shift_factor": 0,
        "independent_recompute_max_abs_diff_final": recompute_err,
        "independent_recompute_max_abs_diff_step1": float(
            (latents_step1 - rec["latents_after_step1"]).abs().max()
        ),
    }
    return tensors, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latentsync-repo", type=Path, required=True, help="checkout of bytedance/LatentSync")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--commit", help="official commit to record when the checkout has no .git")
    args = parser.parse_args(argv)

    start = time.time()
    torch.manual_seed(0)
    repo = args.latentsync_repo.resolve()
    official = import_official(repo)
    random_parameters_ = import_random_parameters()
    args.out.mkdir(parents=True, exist_ok=True)

    import diffusers
    import transformers
    import whisper

    meta: dict = {
        "official_repo": "https://github.com/bytedance/LatentSync",
        "official_commit": args.commit or git_commit(repo),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "openai-whisper": getattr(whisper, "__version__", "?"),
        },
        "weight_seed": WEIGHT_SEED,
        "dtype": "float32 (inputs stored as float16 are fp16-exact values; cast with .float())",
    }

    unet, model_cfg = build_unet(official, random_parameters_)
    meta["unet"] = {"config": str(UNET_CONFIG.relative_to(REPO_ROOT)), **state_dict_summary(unet)}
    for name, frames, timestep, seed in (("unet_f16", 16, 951, 100), ("unet_f5", 5, 1, 101)):
        tensors = run_unet_case(unet, frames, timestep, seed)
        save_file(tensors, str(args.out / f"{name}.safetensors"))
        meta[name] = {
            "input_seed": seed,
            "out_abs_mean": float(tensors["out"].abs().mean()),
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
        }

    with tempfile.TemporaryDirectory() as tmp:
        demo, long, audio_meta = run_audio_cases(official, random_parameters_, Path(tmp))
        save_file(demo, str(args.out / "audio_demo.safetensors"))
        save_file(long, str(args.out / "audio_long.safetensors"))
        meta["audio"] = audio_meta
        ddim, ddim_meta = run_ddim_case(official, unet, random_parameters_, repo, Path(tmp))
        save_file(ddim, str(args.out / "ddim_cfg.safetensors"))
        meta["ddim_cfg"] = ddim_meta

    meta["elapsed_s"] = round(time.time() - start, 1)
    (args.out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(json.dumps(meta, indent=2))
    print(f"wrote {args.out} ({total / 1e6:.2f} MB) in {meta['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
