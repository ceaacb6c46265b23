"""One denoising step of a full-size video transformer on 1 GPU and split over N GPUs
(diffusers' context parallelism, as `farm.engines.parallel` enables it).

The transformer is built from its published config with random weights in bf16 on each
GPU (dense compute costs the same whatever the weights; rank 0's weights are broadcast so
every rank holds the same model), and called on the arguments its diffusers pipeline
passes at that shape:

- ltx-video-2b (benchmarks/engine_step.py's LTX_TRANSFORMER, 32 heads): one call at
  batch 2 per step (the pipeline batches classifier-free guidance), 128 text tokens with
  a prompt mask (30 real tokens);
- wan-14b (farm/families/wan.py's PUBLISHED_TRANSFORMER, 40 heads): two calls at batch 1
  per step (the pipeline's conditional and unconditional calls), 512 text tokens.

For each it prints the median step time on 1 GPU (every rank runs the whole model on its
own GPU; rank 0's time), the median step time over N GPUs, the speed-up, the relative
difference of the two outputs (max|parallel - single| / max|single|; bf16 has 8 bits of
mantissa, so about 1e-2 is rounding) and each rank's peak memory.

Ulysses needs the heads divisible by N and the tokens divisible by N (video tokens:
frames' latents x (height / 32) x (width / 32) for LTX-Video, / 16 for Wan; text tokens too
for LTX-Video, whose plan splits them). Ring is refused for LTX-Video (its plan splits the
prompt mask, which diffusers' ring attention does not rotate with the keys).

On a GPU node (e.g. 2 or 4 H100), well within a 10-minute command:

    python benchmarks/parallel_step.py --model ltx-video-2b --gpus 2
    python benchmarks/parallel_step.py --model wan-14b --gpus 4 --json wan.json

A smoke test of the script on the CPU (gloo, float32, 1 layer, a tiny shape; its times
mean nothing):

    .venv/bin/python benchmarks/parallel_step.py --allow-cpu --layers 1 --shape 64x64x9 --gpus 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # farm, when run from anywhere


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    shape: str  # the published model's headline WIDTHxHEIGHTxFRAMES
    spatial: int  # pixels per latent token side (VAE compression x patch)
    temporal: int  # frames per latent frame (VAE)
    text_tokens: int
    batch: int  # batch of one transformer call
    calls_per_step: int
    fps: int


MODELS = {
    "ltx-video-2b": ModelSpec("ltx-video-2b", "768x512x121", 32, 8, 128, 2, 1, 24),
    "wan-14b": ModelSpec("wan-14b", "832x480x81", 16, 4, 512, 1, 2, 16),
}
PROMPT_TOKENS = 30  # real tokens of the LTX-Video prompt mask; the rest is padding


def published_config(name: str) -> dict[str, Any]:
    if name == "ltx-video-2b":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from engine_step import LTX_TRANSFORMER

        return dict(LTX_TRANSFORMER)
    from farm.families.wan import PUBLISHED_TRANSFORMER

    return dict(PUBLISHED_TRANSFORMER)


def transformer_class(name: str):
    from diffusers import LTXVideoTransformer3DModel, WanTransformer3DModel

    return LTXVideoTransformer3DModel if name == "ltx-video-2b" else WanTransformer3DModel


def parse_shape(text: str) -> tuple[int, int, int]:
    width, height, frames = (int(part) for part in text.lower().split("x"))
    return width, height, frames


def call_arguments(spec: ModelSpec, config: dict, shape: tuple[int, int, int], device: torch.device,
                   dtype: torch.dtype) -> dict[str, Any]:
    """The arguments of one transformer call, the same on every rank (a seeded CPU generator)."""
    width, height, frames = shape
    latent_frames = (frames - 1) // spec.temporal + 1
    generator = torch.Generator().manual_seed(1)

    def random(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    timestep = torch.full((spec.batch,), 500.0, device=device)
    if spec.name == "ltx-video-2b":
        tokens = latent_frames * (height // spec.spatial) * (width // spec.spatial)
        mask = torch.zeros(spec.batch, spec.text_tokens, device=device, dtype=dtype)
        mask[:, :PROMPT_TOKENS] = 1
        return dict(hidden_states=random(spec.batch, tokens, config["in_channels"]),
                    encoder_hidden_states=random(spec.batch, spec.text_tokens, config["caption_channels"]),
                    timestep=timestep, encoder_attention_mask=mask, num_frames=latent_frames,
                    height=height // spec.spatial, width=width // spec.spatial,
                    rope_interpolation_scale=(spec.temporal / spec.fps, spec.spatial, spec.spatial),
                    return_dict=False)
    vae_spatial = spec.spatial // config["patch_size"][1]
    return dict(hidden_states=random(spec.batch, config["in_channels"], latent_frames, height // vae_spatial,
                                     width // vae_spatial),
                timestep=timestep, encoder_hidden_states=random(spec.batch, spec.text_tokens, config["text_dim"]),
                return_dict=False)


def video_tokens(spec: ModelSpec, shape: tuple[int, int, int]) -> int:
    width, height, frames = shape
    return ((frames - 1) // spec.temporal + 1) * (height // spec.spatial) * (width // spec.spatial)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(transformer, arguments: dict, spec: ModelSpec, device: torch.device, repeats: int, warmups: int,
              together: bool) -> tuple[float, torch.Tensor]:
    """Median seconds of one denoising step (its transformer calls), and the last output."""
    import torch.distributed as dist

    times = []
    for index in range(warmups + repeats):
        if together:
            dist.barrier()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(spec.calls_per_step):
            output = transformer(**arguments)[0]
        synchronize(device)
        if index >= warmups:
            times.append(time.perf_counter() - start)
    return statistics.median(times), output


def run_rank(rank: int, args: argparse.Namespace, init_method: str, results_path: str) -> None:
    import torch.distributed as dist

    from farm.engines.parallel import enable_context_parallel

    on_gpu = not args.allow_cpu
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=init_method, rank=rank,
                            world_size=args.gpus, timeout=datetime.timedelta(minutes=10))
    spec = MODELS[args.model]
    config = published_config(args.model)
    if args.layers:
        config["num_layers"] = args.layers
    shape = parse_shape(args.shape or spec.shape)

    built = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the compute dtype: a 14B model never exists in float32
    try:
        with torch.device(device):
            torch.manual_seed(0)
            transformer = transformer_class(args.model)(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for tensor in [*transformer.parameters(), *transformer.buffers()]:
            dist.broadcast(tensor.data, src=0)  # one model on every rank
    built = time.perf_counter() - built
    parameters = sum(p.numel() for p in transformer.parameters())
    arguments = call_arguments(spec, config, shape, device, dtype)

    with torch.inference_mode():
        single_s, single = time_step(transformer, arguments, spec, device, args.repeats, args.warmups, together=False)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        enable_context_parallel(transformer, args.gpus, args.mode, args.attention_backend)
        parallel_s, parallel = time_step(transformer, arguments, spec, device, args.repeats, args.warmups,
                                         together=True)
    error = float((parallel.float() - single.float()).abs().max() / single.float().abs().max())
    peak = torch.cuda.max_memory_allocated(device) if on_gpu else None
    peaks = [None] * args.gpus
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        result = {
            "model": args.model, "shape": "x".join(map(str, shape)), "video_tokens": video_tokens(spec, shape),
            "text_tokens": spec.text_tokens, "layers": config["num_layers"], "parameters": parameters,
            "batch": spec.batch, "calls_per_step": spec.calls_per_step, "gpus": args.gpus, "mode": args.mode,
            "attention_backend": args.attention_backend or "default", "dtype": str(dtype).removeprefix("torch."),
            "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (smoke test)",
            "build_s": round(built, 2), "step_ms_1": round(single_s * 1e3, 2),
            f"step_ms_{args.gpus}": round(parallel_s * 1e3, 2), "speedup": round(single_s / parallel_s, 3),
            "relative_error": error, "peak_memory_gib_per_rank_parallel":
                [None if p is None else round(p / 2**30, 2) for p in peaks],
            "torch": torch.__version__,
        }
        Path(results_path).write_text(json.dumps(result))
    dist.destroy_process_group()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--model", default="ltx-video-2b", choices=sorted(MODELS))
    parser.add_argument("--gpus", type=int, default=2, help="ranks to split the step over (default 2)")
    parser.add_argument("--mode", default="ulysses", choices=["ulysses", "ring"])
    parser.add_argument("--attention-backend", help="diffusers attention backend (default: farm's for the mode)")
    parser.add_argument("--shape", help="WIDTHxHEIGHTxFRAMES instead of the model's headline shape")
    parser.add_argument("--layers", type=int, help="transformer depth instead of the published one")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test on CPU with gloo (needs --layers, --shape)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    args = parse_args(argv)
    if args.gpus < 2:
        print("--gpus must be at least 2 (the 1-GPU time is measured beside it)", file=sys.stderr)
        return 2
    if args.allow_cpu:
        if not (args.layers and args.shape):
            print("--allow-cpu needs --layers and --shape (a full-size model on CPU would take hours)", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"needs {args.gpus} CUDA GPUs, found {found} (--allow-cpu for a smoke test)", file=sys.stderr)
        return 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = Path(os.environ.get("TMPDIR", "/tmp")) / f"parallel_step-{os.getpid()}.json"
    mp.spawn(run_rank, args=(args, f"tcp://127.0.0.1:{port}", str(results)), nprocs=args.gpus, join=True)
    result = json.loads(results.read_text())
    results.unlink()
    gpus = result["gpus"]
    print(f"{result['model']} {result['shape']} ({result['video_tokens']} video + {result['text_tokens']} text tokens, "
          f"{result['layers']} layers, {result['parameters'] / 1e9:.2f}B parameters, {result['dtype']}) "
          f"on {result['device']}, {result['mode']} ({result['attention_backend']} attention):")
    print(f"  step on 1 device:  {result['step_ms_1']:10.2f} ms")
    print(f"  step on {gpus} devices: {result[f'step_ms_{gpus}']:10.2f} ms   speed-up {result['speedup']:.2f}x "
          f"(ideal {gpus}x)")
    print(f"  relative difference of the outputs: {result['relative_error']:.2e}")
    print(f"  peak memory per rank, parallel (GiB): {result['peak_memory_gib_per_rank_parallel']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
