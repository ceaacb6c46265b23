"""How close EstimateCost lands to the measured cost, on the tiny models.

Starts farm on its embedded defaults, runs `farm calibrate`'s grid for a model,
fits and stores its timing model, then renders a fresh set of specs spread over the
calibrated range and compares each estimate (asked before submitting) with the cost
the render was charged. Goal: within 25%.

Run: .venv/bin/python benchmarks/estimates.py [--model ltx-video-tiny] [--calibration 24] [--trials 16]
     [--save-samples tests/data/ltx_tiny_timings.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from farm_overhead import start_farm, temporary_farm  # noqa: E402

from farm.client import FarmClient, find_api_key  # noqa: E402
from farm.jobs.store import JobStore  # noqa: E402
from farm.metering.calibrate import calibration_specs, fit_and_store, measured_samples  # noqa: E402
from farm.v1 import render_pb2 as pb  # noqa: E402


def render_all(client: FarmClient, model: str, specs: list[dict], seed_base: int) -> list[pb.Render]:
    ids = [client.submit(pb.RenderSpec(model=model, task=pb.TASK_TEXT_TO_VIDEO, prompt="estimate study",
                                       seed=seed_base + i, **fields)).id for i, fields in enumerate(specs)]
    return [client.wait(render_id, timeout=1800) for render_id in ids]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ltx-video-tiny")
    parser.add_argument("--calibration", type=int, default=24)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--max-size", type=int, default=768)
    parser.add_argument("--save-samples", type=Path)
    args = parser.parse_args()

    import os
    import signal

    home, config_path, config = temporary_farm("farm-est-")
    model = config.model(args.model)
    process, target = start_farm(config_path, home)
    try:
        with FarmClient(target, find_api_key(home)) as client:
            device_kind = {m.name: m for m in client.models().models}[args.model].device_kind
            started = time.perf_counter()
            render_all(client, args.model, calibration_specs(model, args.calibration, max_size=args.max_size), 0)
            store = JobStore(config.store_url, migrate=False)
            timing = fit_and_store(store, model, device_kind)
            print(f"calibrated on {timing.samples} renders in {time.perf_counter() - started:.0f} s: "
                  f"{json.dumps(timing.to_json())}")
            if args.save_samples:
                samples = measured_samples(store, model, device_kind)
                args.save_samples.parent.mkdir(parents=True, exist_ok=True)
                args.save_samples.write_text(json.dumps(
                    [{"spec": json.loads(spec.to_json()), "timings": timings} for spec, timings in samples], indent=1))
                print(f"saved {len(samples)} measured renders to {args.save_samples}")

            trials = calibration_specs(model, args.trials * 2, seed=12345, max_size=args.max_size)[args.trials:]
            estimates = []
            for index, fields in enumerate(trials):
                spec = pb.RenderSpec(model=args.model, task=pb.TASK_TEXT_TO_VIDEO, prompt="estimate study",
                                     seed=10_000 + index, **fields)
                estimates.append(client.estimate(spec).dollars)
            finals = render_all(client, args.model, trials, 10_000)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)

    errors = []
    print(f"{'width':>5} {'height':>6} {'frames':>6} {'steps':>5} {'estimate $':>12} {'measured $':>12} {'error':>7}")
    for fields, estimate, final in zip(trials, estimates, finals):
        measured = final.cost.total_dollars
        error = (estimate - measured) / measured
        errors.append(abs(error))
        print(f"{fields['width']:>5} {fields['height']:>6} {fields['num_frames']:>6} {fields['num_inference_steps']:>5} "
              f"{estimate:>12.9f} {measured:>12.9f} {error:>+7.1%}")
    within = sum(e <= 0.25 for e in errors) / len(errors)
    print(f"absolute error: median {statistics.median(errors):.1%}, max {max(errors):.1%}; "
          f"within 25%: {within:.0%} of {len(errors)} renders (goal: all)")


if __name__ == "__main__":
    main()
