"""GPU memory of the UNet's CUDA graphs: how the shared pool grows with each captured call shape.

For each ``--versions`` UNet (full-size random weights in the official formats, fp16, eager or
``--compiled``) and each capture order (the batcher's window counts largest first, as
``lipsync.lifecycle.warm_up`` captures them, and smallest first), a fresh ``GraphedUNet`` captures
every shape a server replays: the exact pass (``forward``) and the fast pass (``forward_caching``,
``forward_shallow``) at each window count, with guidance. After each capture the script records what
torch has reserved beyond the weights (cached blocks returned first), so the growth per shape is the
graph pool's. For scale it also records one eager call's activation peak at the largest count.

    python scripts/bench_graph_memory.py --versions 1.5 1.6 --windows 8 4 2 1 --json docs/bench/gpu-graph-memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lipsync.config import load_config
from lipsync.models.compiled import CompiledUNet
from lipsync.models.graphed import GraphedUNet
from lipsync.models.loading import load_unet
from lipsync.testing import ensure_random_weights, unet_call_inputs
from lipsync.weights import weight_paths

GIB = 2**30


def reserved_beyond(baseline: int) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return round((torch.cuda.memory_reserved() - baseline) / GIB, 3)


def capture_in_order(unet, config: Path, order: list[int], baseline: int) -> list[dict]:
    graphed = GraphedUNet(unet)
    rows: list[dict] = [{"windows": 0, "reserved_beyond_weights_gib": reserved_beyond(baseline)}]
    for windows in order:
        sample, timestep, audio = unet_call_inputs(config, windows, unet.device, torch.float16)
        started = time.perf_counter()
        graphed(sample, timestep, audio)
        deep = graphed.forward_caching(sample, timestep, audio)[1]
        graphed.forward_shallow(sample, timestep, audio, deep)
        rows.append(
            {
                "windows": windows,
                "capture_s": round(time.perf_counter() - started, 1),
                "graphs": graphed.captured,
                "reserved_beyond_weights_gib": reserved_beyond(baseline),
            }
        )
        print(f"  {windows} windows: {rows[-1]}", file=sys.stderr)
    graphed.release()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", nargs="+", choices=["1.5", "1.6"], default=["1.5"])
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 4, 2, 1], help="window counts, largest first")
    parser.add_argument("--compiled", action="store_true", help="capture the compiled UNet (minutes of compilation)")
    parser.add_argument("--checkpoints", type=Path, default=Path("/tmp/lipsync-bench-weights"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "versions": {},
    }
    largest_first = sorted(args.windows, reverse=True)
    for version in args.versions:
        ensure_random_weights(version, args.checkpoints)
        paths = weight_paths(version, args.checkpoints)
        settings = load_config(paths.unet_config)
        unet = load_unet(paths.unet_config, paths.unet, device, torch.float16)
        model = CompiledUNet(unet, settings["data"]["num_frames"]) if args.compiled else unet
        baseline = torch.cuda.memory_reserved()
        result: dict = {"weights_gib": round(torch.cuda.memory_allocated() / GIB, 3)}
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            unet(*unet_call_inputs(paths.unet_config, largest_first[0], device, torch.float16))
        result["eager_call_peak_beyond_weights_gib"] = round(
            (torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()) / GIB, 3
        )
        for name, order in (("largest_first", largest_first), ("smallest_first", largest_first[::-1])):
            print(f"{version} {name}", file=sys.stderr)
            result[name] = capture_in_order(model, paths.unet_config, order, baseline)
        report["versions"][version] = result
        del model, unet
        torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
