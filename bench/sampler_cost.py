"""Node-side cost of per-request replayable samplers (darkbloom/inference/replay.py) against one shared sampler, at batch B on the random test model.

    .venv/bin/python bench/sampler_cost.py [--batch 16] [--steps 40] [--reps 5] [--size small] [--out bench/results/verify_sampler_cost.json]

Runs mlx-lm's BatchGenerator (as the engine does) over B 64-token prompts at temperature 0.7 and
times decode steps in three modes (medians and minima over repetitions: the machine may be shared), interleaved per repetition: every row shares one mlx-lm
sampler (what unseeded requests get), every row has its own ReplayableSampler (what seeded
requests get), and greedy (the floor). Reports the median ms per decode step and the overhead,
and the sampling stage alone (shared vs per-row) as a share of the shared step: end-to-end
steps on a machine shared with other work vary by more than the overhead itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from darkbloom.inference.blas import ensure_blas

ensure_blas()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", default="small")
    ap.add_argument("--stage-rounds", type=int, default=30)
    ap.add_argument("--workdir", default="/tmp/darkbloom-sampler-cost")
    ap.add_argument("--out", default="bench/results/verify_sampler_cost.json")
    args = ap.parse_args()

    import mlx_lm
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    from darkbloom.inference.replay import ReplayableSampler
    from darkbloom.inference.testmodel import make_test_model

    path = make_test_model(Path(args.workdir) / args.size, args.size, seed=0)
    model, tok = mlx_lm.load(str(path))
    vocab = model.args.vocab_size
    prompts = [[(7 * b + 13 * i) % (vocab - 10) + 5 for i in range(64)] for b in range(args.batch)]
    shared = make_sampler(0.7)
    modes = {
        "shared": lambda: [shared] * args.batch,
        "replayable": lambda: [ReplayableSampler(temperature=0.7, seed=1000 + b) for b in range(args.batch)],
        "greedy": lambda: [make_sampler(0.0)] * args.batch,
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(args.reps + 1):
        for mode, samplers in modes.items():
            gen = BatchGenerator(model, max_tokens=args.steps + 10, completion_batch_size=args.batch,
                                 prefill_batch_size=args.batch, stop_tokens=[])
            gen.insert(prompts, samplers=samplers())
            while not any(r for r in gen.next()):  # prefill, then the first tokens
                pass
            for _ in range(3):
                gen.next()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                gen.next()
            dt = (time.perf_counter() - t0) / args.steps * 1000
            gen.close()
            if rep > 0:  # the first repetition warms up
                times[mode].append(dt)
    # The sampling stage alone, as GenerationBatch runs it (one call for a shared sampler, one call
    # per row and a concatenate otherwise), on (B, V) logprobs, interleaved; medians of many rounds.
    import mlx.core as mx

    lp = mx.random.normal((args.batch, vocab)) * 3
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    mx.eval(lp)
    rows = [ReplayableSampler(temperature=0.7, seed=1000 + b) for b in range(args.batch)]
    stage = {"shared": lambda: shared(lp),
             "replayable": lambda: mx.concatenate([s(lp[e : e + 1]) for e, s in enumerate(rows)], axis=0)}
    stage_us: dict[str, list[float]] = {m: [] for m in stage}
    for _ in range(args.stage_rounds):
        for m, f in stage.items():
            t0 = time.perf_counter()
            for _ in range(20):
                mx.eval(f())
            stage_us[m].append((time.perf_counter() - t0) / 20 * 1e6)
    stage_med = {m: statistics.median(v) for m, v in stage_us.items()}
    med = {m: statistics.median(v) for m, v in times.items()}
    low = {m: min(v) for m, v in times.items()}  # least disturbed by other processes on a shared machine
    result = {"ms_per_step_min": low, "replayable_overhead_min": low["replayable"] / low["shared"] - 1.0, "batch": args.batch, "steps": args.steps, "reps": args.reps, "size": args.size, "vocab": vocab,
              "ms_per_step_median": med, "ms_per_step_all": times,
              "replayable_overhead": med["replayable"] / med["shared"] - 1.0,
              "sampling_stage_us_median": stage_med,
              # relative to the least disturbed shared step (contention only inflates step times)
              "stage_overhead_of_step": (stage_med["replayable"] - stage_med["shared"]) / 1000 / low["shared"]}
    print(f"{args.size} model (vocab {vocab}), batch {args.batch}: ms per decode step (median of {args.reps})")
    for m, v in med.items():
        print(f"  {m:<11} {v:8.2f}   all: " + " ".join(f"{x:.2f}" for x in times[m]))
    print(f"replayable vs shared: {result['replayable_overhead'] * 100:+.1f}% (medians), "
          f"{result['replayable_overhead_min'] * 100:+.1f}% (minima: {low['shared']:.2f} vs {low['replayable']:.2f} ms)")
    print(f"sampling stage alone (median of {args.stage_rounds} rounds): shared {stage_med['shared']:.0f} us, "
          f"per-row replayable {stage_med['replayable']:.0f} us: {result['stage_overhead_of_step'] * 100:+.1f}% of the fastest shared step")
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
