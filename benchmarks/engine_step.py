"""One denoising step of full-size LTX-Video 2B and CogVideoX-5B on every backend that runs here.

The transformers (and VAEs and T5-XXL text encoders) are built from their published
configs with random weights: dense compute costs the same whatever the weights, and
nothing can be downloaded. For each model and backend it reports

- ms per step: one transformer call with classifier-free guidance (batch 2, as the
  pipelines run it), on the exact arguments the diffusers pipeline passes at that shape;
- achieved TFLOP/s: the transformer's matrix-product FLOPs, counted analytically
  (attention projections, attention scores and weighted sums, MLPs, embeddings and
  output projections; checked against torch's FlopCounterMode on the same call),
  divided by the step time;
- the fraction of the matrix-product rate measured on the same device in the same
  run (a large square matmul in the compute dtype);
- the speed-up over eager in the same run, and the relative error against eager
  (max|x - eager| / max|eager|);

plus the VAE decode of one video at that shape and the whole pipeline (prompt encode,
all denoising steps, decode, MP4 encode) per backend.

Full size needs a GPU. On a CPU-only machine it refuses, unless given --allow-cpu
with fewer --layers and a small --shape, which is a smoke test of this script and of
the backends, not a measurement worth reporting:

    .venv/bin/python benchmarks/engine_step.py --allow-cpu --layers 1 --shape 128x128x9 --steps 2

On a GPU (e.g. one H100), per model to stay within a 10-minute command:

    python benchmarks/engine_step.py --models ltx-video-2b --json ltx.json
    python benchmarks/engine_step.py --models cogvideox-5b --json cogvideox.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from farm.config import BackendConfig
from farm.engines.backends import create_backend
from farm.engines.backends.backend import (
    BackendUnavailable,
    CallSignature,
    TransformerRouter,
    as_inference_tensors,
    capture_transformer_call,
    complete_arguments,
    first_output,
    relative_error,
)
from farm.engines.backends.shapes import parse_shape

# Published configs ------------------------------------------------------------------------
# LTX-Video 2B (Lightricks/LTX-Video, transformer/config.json of the 0.9.x 2B checkpoints).
LTX_TRANSFORMER = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
    attention_head_dim=64, cross_attention_dim=2048, num_layers=28, activation_fn="gelu-approximate",
    qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
    attention_bias=True, attention_out_bias=True,
)
# The LTX-Video 0.9.0 VAE (vae/config.json): 32x spatial, 8x temporal compression, 128 latent channels.
LTX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=128, block_out_channels=(128, 256, 512, 512),
    decoder_block_out_channels=(128, 256, 512, 512), layers_per_block=(4, 3, 3, 3, 4),
    decoder_layers_per_block=(4, 3, 3, 3, 4), spatio_temporal_scaling=(True, True, True, False),
    decoder_spatio_temporal_scaling=(True, True, True, False), decoder_inject_noise=(False,) * 5,
    upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=4,
    patch_size_t=1, resnet_norm_eps=1e-6, scaling_factor=1.0, encoder_causal=True, decoder_causal=False,
)
LTX_SCHEDULER = dict(base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096, max_shift=2.05,
                     shift_terminal=0.1, use_dynamic_shifting=True)
# CogVideoX-5B (THUDM/CogVideoX-5b, transformer/config.json).
COGVIDEOX_TRANSFORMER = dict(
    num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
    freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=42, dropout=0.0, attention_bias=True,
    sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
    max_text_seq_length=226, activation_fn="gelu-approximate", timestep_activation_fn="silu",
    norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=False,
)
COGVIDEOX_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 512), latent_channels=16,
    layers_per_block=3, act_fn="silu", norm_eps=1e-6, norm_num_groups=32, temporal_compression_ratio=4,
    sample_height=480, sample_width=720, scaling_factor=0.7, force_upcast=True, use_quant_conv=False,
    use_post_quant_conv=False,
)
COGVIDEOX_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                           prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                           snr_shift_scale=1.0, timestep_spacing="trailing")
# google/t5-v1_1-xxl, the text encoder of both.
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6, is_encoder_decoder=False,
              use_cache=False, pad_token_id=0, eos_token_id=1)

BACKENDS = ("eager", "compile", "onnx", "fp8")  # fp8 last: it quantizes the transformer in place
PROMPT = "a red fox running through a snowy forest at dawn, cinematic, detailed fur, soft light"
NEGATIVE_PROMPT = "blurry, low quality"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    shape: str
    steps: int
    guidance_scale: float
    fps: int
    text_tokens: int
    vae_tiling: bool


MODELS = {
    "ltx-video-2b": ModelSpec("ltx-video-2b", "ltx-video", "768x512x121", 20, 3.0, 24, 128, False),
    # diffusers' CogVideoX examples decode with tiling: untiled, 49 frames at 720x480 need far more memory.
    "cogvideox-5b": ModelSpec("cogvideox-5b", "cogvideox", "720x480x49", 50, 6.0, 8, 226, True),
}


# FLOPs ------------------------------------------------------------------------------------


def ltx_transformer_flops(config: dict, latent_tokens: int, text_tokens: int, batch: int,
                          attention: bool = True) -> float:
    """Matrix-product FLOPs of one LTXVideoTransformer3DModel call (2 per multiply-add);
    attention=False leaves out the attention scores and weighted sums."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n, t = latent_tokens, text_tokens
    cross = config["cross_attention_dim"]
    block = (
        2 * n * d * 3 * d  # self-attention q, k, v
        + attention * 4 * n * n * d  # self-attention scores and weighted sum
        + 2 * n * d * d  # self-attention output
        + 2 * n * d * d  # cross-attention q
        + 2 * t * cross * 2 * d  # cross-attention k, v from the text
        + attention * 4 * n * t * d  # cross-attention scores and weighted sum
        + 2 * n * d * d  # cross-attention output
        + 2 * 2 * n * d * 4 * d  # MLP up and down (4x)
    )
    embeddings = (
        2 * n * config["in_channels"] * d  # proj_in
        + 2 * t * (config["caption_channels"] * d + d * d)  # caption projection
        + 2 * (256 * d + d * d + d * 6 * d)  # timestep embedding and adaLN (one timestep per sample)
        + 2 * n * d * config["out_channels"]  # proj_out
    )
    return float(batch * (config["num_layers"] * block + embeddings))


def cogvideox_transformer_flops(config: dict, latent_tokens: int, text_tokens: int, batch: int,
                                attention: bool = True) -> float:
    """Matrix-product FLOPs of one CogVideoXTransformer3DModel call (joint text-video attention);
    attention=False leaves out the attention scores and weighted sums."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    p, e = config["patch_size"], config["time_embed_dim"]
    n, t = latent_tokens, text_tokens
    s = n + t
    block = (
        2 * 2 * e * 6 * d  # the two adaLN-zero modulations from the time embedding
        + 2 * s * d * 3 * d  # q, k, v over text and video tokens together
        + attention * 4 * s * s * d  # scores and weighted sum
        + 2 * s * d * d  # output
        + 2 * 2 * s * d * 4 * d  # MLP up and down (4x)
    )
    embeddings = (
        2 * n * config["in_channels"] * p * p * d  # patch embedding (a strided conv)
        + 2 * t * config["text_embed_dim"] * d  # text projection
        + 2 * (d * e + e * e)  # timestep embedding
        + 2 * e * 2 * d  # final adaLN
        + 2 * n * d * p * p * config["out_channels"]  # proj_out
    )
    return float(batch * (config["num_layers"] * block + embeddings))


def counted_flops(call: Callable[[], Any]) -> float:
    """FLOPs torch's FlopCounterMode sees in one call (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return float(counter.get_total_flops())


# Building the models ----------------------------------------------------------------------


def build_pipeline(spec: ModelSpec, layers: int | None, device: torch.device, dtype: torch.dtype):
    """The diffusers pipeline with random weights, built directly on the device."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        AutoencoderKLLTXVideo,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    from farm.engines.tiny import build_tiny_text_encoder

    # A real T5 tokenizer needs no weights; the tiny models' one is built offline.
    _, tokenizer = build_tiny_text_encoder()
    tokenizer.model_max_length = spec.text_tokens

    def made(factory):
        torch.manual_seed(0)
        with torch.device(device):
            return factory().to(dtype).eval()

    t5 = dict(T5_XXL, num_layers=min(layers, T5_XXL["num_layers"]) if layers else T5_XXL["num_layers"])
    text_encoder = made(lambda: T5EncoderModel(T5Config(**t5)))
    if spec.family == "ltx-video":
        config = dict(LTX_TRANSFORMER, num_layers=layers or LTX_TRANSFORMER["num_layers"])
        transformer = made(lambda: LTXVideoTransformer3DModel(**config))
        vae = made(lambda: AutoencoderKLLTXVideo(**LTX_VAE))
        pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER), vae=vae,
                           text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    else:
        config = dict(COGVIDEOX_TRANSFORMER, num_layers=layers or COGVIDEOX_TRANSFORMER["num_layers"])
        transformer = made(lambda: CogVideoXTransformer3DModel(**config))
        vae = made(lambda: AutoencoderKLCogVideoX(**COGVIDEOX_VAE))
        pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                 scheduler=CogVideoXDPMScheduler(**COGVIDEOX_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    if spec.vae_tiling:
        vae.enable_tiling()
    return pipe, config


def pipeline_kwargs(spec: ModelSpec, shape, steps: int) -> dict[str, Any]:
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, width=shape.width, height=shape.height,
                  num_frames=shape.num_frames, num_inference_steps=steps, guidance_scale=spec.guidance_scale,
                  max_sequence_length=spec.text_tokens)
    if spec.family == "ltx-video":
        kwargs["frame_rate"] = spec.fps
    return kwargs


# Timing -----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device, repeats: int, warmups: int) -> tuple[list[float], Any]:
    """Seconds of each of `repeats` calls after `warmups` untimed ones, and the last result."""
    result = None
    for _ in range(warmups):
        result = call()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds, result


def matmul_rate(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """TFLOP/s of a large square matrix product in the compute dtype, on this device, now."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = timed(lambda: a @ b, device, repeats=20 if device.type == "cuda" else 5, warmups=3)
    best = min(seconds)
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * size**3 / best / 1e12}


# One model --------------------------------------------------------------------------------


def run_model(spec: ModelSpec, args, device: torch.device, dtype: torch.dtype, matmul: dict) -> dict[str, Any]:
    from farm.engines.pipeline_engine import frames_to_uint8
    from farm.postproc.encode import encode_mp4

    shape = parse_shape(args.shape or spec.shape)
    steps = args.steps or spec.steps
    print(f"\n== {spec.name} {shape.spec}, guidance {spec.guidance_scale} (batch 2), {steps} steps", flush=True)
    started = time.perf_counter()
    pipe, config = build_pipeline(spec, args.layers, device, dtype)
    transformer = pipe.transformer
    print(f"   built with random weights in {time.perf_counter() - started:.1f} s: {config['num_layers']} layers, "
          f"{sum(p.numel() for p in transformer.parameters()) / 1e9:.2f} B transformer parameters", flush=True)

    with torch.no_grad():
        arguments = capture_transformer_call(pipe, {**pipeline_kwargs(spec, shape, 2), "output_type": "latent"})
    hidden = arguments["hidden_states"]
    if spec.family == "ltx-video":
        latent_tokens = hidden.shape[1]
        count_flops = ltx_transformer_flops
    else:
        frames, _, height, width = hidden.shape[1:]
        latent_tokens = frames * (height // config["patch_size"]) * (width // config["patch_size"])
        count_flops = cogvideox_transformer_flops
    text_tokens, batch = arguments["encoder_hidden_states"].shape[1], hidden.shape[0]
    flops = count_flops(config, latent_tokens, text_tokens, batch)
    flops_without_attention = count_flops(config, latent_tokens, text_tokens, batch, attention=False)
    serving_arguments = as_inference_tensors(arguments, device)
    with torch.inference_mode():
        eager_output = first_output(transformer(**serving_arguments, return_dict=False)).clone()
        counted = counted_flops(lambda: transformer(**serving_arguments, return_dict=False))
    # FlopCounterMode knows the GPU's fused attention kernels but not the CPU's.
    comparable = flops if device.type == "cuda" else flops_without_attention
    print(f"   {latent_tokens} latent tokens; {flops / 1e12:.3f} TFLOP per step analytically "
          f"({(flops - flops_without_attention) / 1e12:.3f} of it attention scores and sums); FlopCounterMode "
          f"counted {counted / 1e12:.3f} ({counted / comparable:.4f}x the analytic count"
          f"{'' if device.type == 'cuda' else ' without attention, which it cannot see on CPU'})", flush=True)

    router = TransformerRouter(transformer)
    results: dict[str, Any] = {
        "model": spec.name, "shape": shape.spec, "batch": int(hidden.shape[0]), "layers": config["num_layers"],
        "latent_tokens": int(latent_tokens), "tflop_per_step": flops / 1e12,
        "tflop_attention": (flops - flops_without_attention) / 1e12, "tflop_counted": counted / 1e12,
        "steps": steps, "backends": {},
    }
    eager_ms = None
    for name in args.backends:
        row: dict[str, Any] = {"backend": name}
        results["backends"][name] = row
        try:
            runner, row["setup_s"], row["label"] = prepare_runner(name, args, transformer, arguments, eager_output,
                                                                  device, dtype)
        except BackendUnavailable as refusal:
            row["not_run"] = str(refusal)
            print(f"   {name:8s} not run: {refusal}", flush=True)
            continue
        call = (lambda: transformer(**serving_arguments, return_dict=False)) if runner is None else (
            lambda: runner(**serving_arguments, return_dict=False))
        with torch.inference_mode(), router.routed_to(None):
            seconds, output = timed(call, device, args.repeats, warmups=2)
        step_s = statistics.median(seconds)
        eager_ms = eager_ms or (step_s * 1e3 if name == "eager" else None)
        row.update(
            ms_per_step=step_s * 1e3,
            tflops=flops / step_s / 1e12,
            fraction_of_matmul=flops / step_s / 1e12 / matmul["tflops"],
            speedup_over_eager=(eager_ms / (step_s * 1e3)) if eager_ms else None,
            relative_error=relative_error(first_output(output), eager_output),
        )
        print(f"   {row['label']:26s} {row['ms_per_step']:10.1f} ms/step {row['tflops']:8.2f} TFLOP/s "
              f"{100 * row['fraction_of_matmul']:6.1f}% of matmul  x{row['speedup_over_eager'] or float('nan'):.2f} "
              f"vs eager  rel.err {row['relative_error']:.2e}  (setup {row['setup_s']:.1f} s)", flush=True)
        if not args.skip_pipeline:
            row["pipeline_s"] = whole_pipeline(pipe, spec, shape, steps, router, runner, device,
                                               frames_to_uint8, encode_mp4)
            print(f"   {'':26s} whole pipeline (prompt, {steps} steps, decode, MP4): {row['pipeline_s']:.2f} s",
                  flush=True)
    if not args.skip_vae:
        results["vae_decode_s"] = vae_decode_seconds(pipe, spec, shape, device, dtype)
        print(f"   VAE decode of one {shape.spec} video{' (tiled)' if spec.vae_tiling else ''}: "
              f"{results['vae_decode_s'] * 1e3:.0f} ms", flush=True)
    router.uninstall()
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"   peak GPU memory {results['peak_memory_gib']:.1f} GiB", flush=True)
    return results


def prepare_runner(name: str, args, transformer, arguments, eager_output, device, dtype):
    """(runner or None for eager, setup seconds, label); raises BackendUnavailable when it cannot run here."""
    backend = create_backend(BackendConfig(name=name, onnx_provider=args.onnx_provider), device, dtype)
    backend.check_available()
    started = time.perf_counter()
    if name == "eager":
        return None, 0.0, backend.label
    backend.prepare(transformer)
    if name in ("compile", "fp8"):
        runner = backend.compiled_forward(transformer)
        with torch.inference_mode():  # compiling: the first calls
            serving = as_inference_tensors(arguments, device)
            for _ in range(backend.warmup_calls):
                runner(**serving, return_dict=False)
        synchronize(device)
        return runner, time.perf_counter() - started, backend.label
    directory = Path(tempfile.mkdtemp(prefix=f"engine-step-{name}-"))
    backend.build(transformer, arguments, eager_output, directory)
    signature = CallSignature.of_call(complete_arguments(transformer, arguments), eager_output, backend.graph_dtype)
    runner = backend.load(transformer, signature, directory)
    return runner, time.perf_counter() - started, backend.label


def whole_pipeline(pipe, spec, shape, steps, router, runner, device, frames_to_uint8, encode_mp4) -> float:
    """Seconds from prompt to MP4 bytes with the transformer's calls on runner."""
    synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode(), router.routed_to(runner):
        frames = pipe(**pipeline_kwargs(spec, shape, steps), output_type="np",
                      generator=torch.Generator(device=device).manual_seed(0)).frames[0]
    encode_mp4(frames_to_uint8(frames), spec.fps)
    return time.perf_counter() - started


def vae_decode_seconds(pipe, spec, shape, device, dtype) -> float:
    latent_frames = (shape.num_frames - 1) // (8 if spec.family == "ltx-video" else 4) + 1
    spatial = 32 if spec.family == "ltx-video" else 8
    channels = pipe.vae.config.latent_channels
    generator = torch.Generator(device=device).manual_seed(0)
    if spec.family == "ltx-video":
        latents = torch.randn((1, channels, latent_frames, shape.height // spatial, shape.width // spatial),
                              generator=generator, device=device, dtype=dtype)
        decode = lambda: pipe.vae.decode(latents, return_dict=False)[0]  # noqa: E731
    else:
        latents = torch.randn((1, latent_frames, channels, shape.height // spatial, shape.width // spatial),
                              generator=generator, device=device, dtype=dtype)
        decode = lambda: pipe.decode_latents(latents)  # noqa: E731
    with torch.inference_mode():
        seconds, _ = timed(decode, device, repeats=1, warmups=1)
    return seconds[0]


# Entry point ------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {list(BACKENDS)}")
    parser.add_argument("--layers", type=int, help="transformer (and text encoder) depth instead of the published one")
    parser.add_argument("--shape", help="WIDTHxHEIGHTxFRAMES for every model instead of its headline shape")
    parser.add_argument("--steps", type=int, help="denoising steps of the whole-pipeline run (default 20 / 50)")
    parser.add_argument("--repeats", type=int, help="timed transformer calls per backend (median reported)")
    parser.add_argument("--onnx-provider", default="auto", choices=["auto", "tensorrt", "cuda", "cpu"])
    parser.add_argument("--skip-pipeline", action="store_true", help="time single steps only")
    parser.add_argument("--skip-vae", action="store_true", help="do not time the VAE decode")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test on CPU (needs --layers and --shape)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for model in args.models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    for backend in args.backends:
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
    # Eager first (the reference for speed-ups and errors), fp8 last (it changes the model in place).
    args.backends = [b for b in BACKENDS if b in args.backends]
    if args.shape:
        parse_shape(args.shape)
    return args


def refuse_cpu_unless_small(args) -> str | None:
    """Why this run cannot go ahead on a machine without a GPU, or None if it may."""
    if torch.cuda.is_available():
        return None
    published = min(LTX_TRANSFORMER["num_layers"], COGVIDEOX_TRANSFORMER["num_layers"])
    if not args.allow_cpu:
        return ("No GPU here. Full-size LTX-Video 2B and CogVideoX-5B steps take minutes each on a CPU and the "
                "numbers would say nothing about a render farm's GPUs. For a smoke test of this script, run with "
                "--allow-cpu --layers 1 --shape 128x128x9 --steps 2.")
    if not args.layers or args.layers >= published or not args.shape:
        return (f"--allow-cpu needs a smaller --layers (below {published}) and a small --shape "
                "(e.g. --layers 1 --shape 128x128x9): full size does not fit a CPU smoke test.")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    refusal = refuse_cpu_unless_small(args)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    import diffusers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.repeats = args.repeats or (10 if device.type == "cuda" else 3)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or 'unknown'}, {torch.get_num_threads()} threads)"
    matmul = matmul_rate(device, dtype)
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "matmul": matmul,
        "smoke_test": device.type != "cuda",
    }
    print(f"{header['date']}  {name}, {header['dtype']}  torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"matrix product {matmul['size']}^3 {matmul['dtype']}: {matmul['tflops']:.2f} TFLOP/s measured now")
    if header["smoke_test"]:
        print("SMOKE TEST on CPU with fewer layers and a small shape: not a measurement of the farm's GPUs.")
    runs = []
    for model in args.models:
        runs.append(run_model(MODELS[model], args, device, dtype, matmul))
        # The model's weights go with run_model's frame; give the memory back before the next one.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    if args.json:
        args.json.write_text(json.dumps({**header, "runs": runs}, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
