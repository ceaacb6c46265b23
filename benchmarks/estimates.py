"""How close EstimateCost lands to the measured cost, on the tiny models.

Starts farm on its embedded defaults, warms its engine up with one render (not
used), runs `farm calibrate`'s grid for a model, fits and stores its timing model
from those calibration renders only (the grid, then 10 renders asking for
interpolation, upscaling and colour matching), then renders 16 fresh specs drawn
uniformly over the calibrated range and 7 that each ask for one kind of
post-processing, and compares each estimate (asked through the gateway before the
render is submitted) with the cost the render was charged. Goal: within 25%.

Renders run one at a time (each submitted when the one before finished), in
calibration and in trials alike: on this 2-core machine the engine and the
post-processing replicas share the cores, so a render submitted behind another one
runs beside that one's post-processing, and what it is charged depends on its
neighbour more than on its spec. --batched submits each set at once instead.

Run: .venv/bin/python benchmarks/estimates.py [--model ltx-video-tiny] [--calibration 40] [--trials 16]
     [--postprocess-trials 7] [--batched] [--save-samples tests/data/ltx_tiny_timings_b.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from farm_overhead import start_farm, temporary_farm  # noqa: E402

from farm.cli.commands import calibration_spec  # noqa: E402
from farm.client import FarmClient, find_api_key  # noqa: E402
from farm.jobs.estimates import fit_and_store, measured_samples  # noqa: E402
from farm.jobs.store import JobStore  # noqa: E402
from farm.planning.calibrate import (  # noqa: E402
    calibration_specs,
    postprocess_calibration_specs,
    uniform_specs,
)
from farm.v1 import render_pb2 as pb  # noqa: E402

TRIAL_SEED = 10_000  # trial renders' seeds start here; calibration renders' are below
WARM_UP_SEED = 99_999


MODELS: dict = {}  # name -> ModelConfig of the farm under study


def spec_of(model: str, fields: dict, seed: int) -> pb.RenderSpec:
    """A render of the model as `farm calibrate` makes one (its first task, a first frame
    for image-to-video, no text for an image-only family)."""
    return calibration_spec(MODELS[model], fields, seed, "estimate study")


def render_all(client: FarmClient, model: str, specs: list[dict], seed_base: int, batched: bool,
               before_submit=None) -> list[pb.Render]:
    """Renders the specs, one at a time unless batched; before_submit(index) runs
    before each submit (the estimate is asked there)."""
    ids, finals = [], []
    for index, fields in enumerate(specs):
        if before_submit is not None:
            before_submit(index)
        ids.append(client.submit(spec_of(model, fields, seed_base + index)).id)
        if not batched:
            finals.append(client.wait(ids[-1], timeout=1800))
    return finals if not batched else [client.wait(render_id, timeout=1800) for render_id in ids]


def postprocess_trials(model, count: int, seed: int) -> list[dict]:
    """Spec fields for `count` renders that each ask for one kind of post-processing,
    drawn uniformly (sizes up to 384 px and 49 frames: a 4x upscale of more would take
    minutes to encode on this machine)."""
    chooser = random.Random(seed)
    multiple = model.limits.size_multiple
    limits = model.limits
    sizes = list(range(max(multiple, limits.min_size), min(384, limits.max_width, limits.max_height) + 1, multiple))
    frames = [f for f in range(limits.min_frames, min(49, limits.max_frames) + 1, limits.frame_step)]
    options = [{"interpolation_factor": 2}, {"interpolation_factor": 3}, {"interpolation_factor": 4},
               {"upscale_factor": 2}, {"upscale_factor": 3}, {"upscale_factor": 4},
               {"color_reference": {"statistics": {"mean": [60.0, 2.0, 6.0], "std": [15.0, 4.0, 6.0]}}}]
    return [dict(width=chooser.choice(sizes), height=chooser.choice(sizes), num_frames=chooser.choice(frames),
                 num_inference_steps=chooser.randint(2, 20), postprocess=options[index % len(options)])
            for index in range(count)]


def wait_for_stored_model(client: FarmClient, name: str, model, timing, probe) -> None:
    """Waits until the gateway estimates with the model just stored: it keeps the timing
    model it read (or, with none stored, fitted itself from the renders so far) for a
    while, and the trials must be estimated by the calibrated one."""
    expected = sum(timing.phase_seconds(probe, model).values())
    fields = dict(width=probe.width, height=probe.height, num_frames=probe.num_frames,
                  num_inference_steps=probe.num_inference_steps)
    deadline = time.monotonic() + 120
    while True:
        answer = client.estimate(spec_of(name, fields, probe.seed)).device_seconds
        if abs(answer - expected) <= 1e-6 * expected:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the gateway still estimates {answer:.4f} s, not the stored model's {expected:.4f} s")
        time.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ltx-video-tiny")
    parser.add_argument("--calibration", type=int, default=40)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--postprocess-trials", type=int, default=7,
                        help="trial renders that ask for interpolation, upscaling or colour matching")
    parser.add_argument("--max-size", type=int, default=768)
    parser.add_argument("--batched", action="store_true", help="submit each set of renders at once")
    parser.add_argument("--save-samples", type=Path,
                        help="write the calibration and trial renders' specs and timings here")
    args = parser.parse_args()

    import signal

    home, config_path, config = temporary_farm("farm-est-")
    model = MODELS[args.model] = config.model(args.model)
    trials = uniform_specs(model, args.trials, seed=12345, max_size=args.max_size)
    trials += postprocess_trials(model, args.postprocess_trials, seed=54321)
    loads = [os.getloadavg()[0]]
    process, target = start_farm(config_path, home)
    try:
        with FarmClient(target, find_api_key(home)) as client:
            device_kind = {m.name: m for m in client.models().models}[args.model].device_kind
            client.wait(client.submit(spec_of(args.model, dict(width=256, height=256, num_frames=17,
                                                               num_inference_steps=4), WARM_UP_SEED)).id)
            started = time.perf_counter()
            grid = (calibration_specs(model, args.calibration, max_size=args.max_size)
                    + postprocess_calibration_specs(model, max_size=args.max_size))
            render_all(client, args.model, grid, 0, args.batched)
            loads.append(os.getloadavg()[0])
            store = JobStore(config.store_url, migrate=False)
            calibration = [(spec, timings) for spec, timings in measured_samples(store, model, device_kind)
                           if spec.seed < TRIAL_SEED]
            timing = fit_and_store(store, model, device_kind, calibration, config.postproc.chunk_frames)
            print(f"calibrated on {timing.samples} renders in {time.perf_counter() - started:.0f} s: "
                  f"{json.dumps(timing.to_json())}", flush=True)
            wait_for_stored_model(client, args.model, model, timing,
                                  next(spec for spec, _ in calibration if spec.postprocess is None))

            estimates = []

            def estimate(index: int) -> None:
                estimates.append(client.estimate(spec_of(args.model, trials[index], TRIAL_SEED + index)).dollars)

            if args.batched:  # every estimate before the first trial is submitted
                for index in range(len(trials)):
                    estimate(index)
            finals = render_all(client, args.model, trials, TRIAL_SEED, args.batched,
                                None if args.batched else estimate)
            loads.append(os.getloadavg()[0])
            if args.save_samples:
                recorded = [dict(role="calibration" if spec.seed < TRIAL_SEED else "trial",
                                 spec=json.loads(spec.to_json()), timings=[list(t) for t in timings])
                            for spec, timings in reversed(measured_samples(store, model, device_kind))
                            if spec.seed != WARM_UP_SEED]
                args.save_samples.parent.mkdir(parents=True, exist_ok=True)
                args.save_samples.write_text(json.dumps(recorded, indent=1))
                print(f"saved {len(recorded)} measured renders to {args.save_samples}")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)

    errors: dict[str, list[float]] = {"plain": [], "post-processed": []}
    print(f"{'width':>5} {'height':>6} {'frames':>6} {'steps':>5} {'post-processing':>24} {'estimate $':>12} "
          f"{'measured $':>12} {'error':>7}")
    for fields, estimate_dollars, final in zip(trials, estimates, finals):
        measured = final.cost.total_dollars
        error = (estimate_dollars - measured) / measured
        post = fields.get("postprocess")
        errors["post-processed" if post else "plain"].append(abs(error))
        asked = ",".join(key if isinstance(value, dict) else f"{key}={value}" for key, value in (post or {}).items())
        print(f"{fields['width']:>5} {fields['height']:>6} {fields['num_frames']:>6} {fields['num_inference_steps']:>5} "
              f"{asked or '-':>24} {estimate_dollars:>12.9f} {measured:>12.9f} {error:>+7.1%}")
    for kind, values in errors.items():
        if values:
            within = sum(e <= 0.25 for e in values)
            print(f"{kind} renders: absolute error median {statistics.median(values):.1%}, max {max(values):.1%}; "
                  f"within 25%: {within} of {len(values)} (goal: all)")
    print(f"1-minute load average at start, after calibration, after trials: {', '.join(f'{x:.1f}' for x in loads)}")


if __name__ == "__main__":
    main()
