"""Calibrate the spot-check verdict (darkbloom/api/trust/verify.py) on the bundled SmolLM2.

    .venv/bin/python bench/calibrate_verify.py [--prompts 300] [--per-prompt 2] [--max-tokens 24]
                                               [--cheats 300] [--out bench/results/verify_calibration.json]
                                               [--samples bench/results/verify_samples.json] [--analyse-only]

1. Honest node: our real engine (`open_engine`, continuous batching) serving SmolLM2 answers
   chat prompts greedily and sampled at temperature 0.7 and 1.0 (top_p 1), the way requests
   are served. Outputs are the engine's own token ids (EOS included when it stopped).
2. Cheating node A, "another model": the project's random ~20M test model (`small`) answers
   the same prompts through its own engine; its text is re-tokenized with SmolLM2's tokenizer
   (what a cheater advertising SmolLM2's digest would have to send).
3. Cheating node B: uniformly random token ids from SmolLM2's vocabulary.
4. Cheating node C (informative): an honest SmolLM2 answer to a *different* prompt (replayed).
5. Verifier: a second SmolLM2 instance (mlx_lm.load on its own thread) scores every output in
   one teacher-forced forward pass per batch (darkbloom.inference.scoring.score_batch).

The samples are split by prompt into a calibration half and a held-out half; the verdict
parameters are chosen on the calibration half (verify.calibrate) and the pass/fail rates
reported on the held-out half, with the Clopper-Pearson-free "rule of three" bound when a
count is zero. Prompts are synthetic (no user data). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

from darkbloom.inference.blas import ensure_blas

ensure_blas()

import trio  # noqa: E402

from darkbloom.api.trust import verify  # noqa: E402

SUBJECTS = (
    "photosynthesis, the French Revolution, black holes, the water cycle, compound interest, "
    "volcanoes, the immune system, jazz music, the Roman Empire, machine learning, honey bees, "
    "climate change, the printing press, plate tectonics, vaccines, the internet, chess, "
    "coffee, the moon landing, recycling, sleep, electricity, the Great Wall of China, "
    "octopuses, democracy, bread baking, rainbows, the stock market, dinosaurs, gravity, "
    "the piano, tea ceremonies, glaciers, bicycles, the human heart, solar panels, whales, "
    "the Olympic Games, origami, earthquakes, penguins, the Renaissance, batteries, tides, "
    "sourdough, the Amazon rainforest, fractions, the Silk Road, comets, friendship"
).split(", ")
FORMS = (
    "Explain {s} to a ten-year-old.",
    "Write two sentences about {s}.",
    "What is the most surprising fact about {s}?",
    "Give me three quick tips related to {s}.",
    "Write a short poem about {s}.",
    "Why does {s} matter? Answer briefly.",
    "Summarize the history of {s} in one paragraph.",
    "List some common misconceptions about {s}.",
)


def all_prompts(n: int, seed: int) -> list[str]:
    ps = [f.format(s=s) for s in SUBJECTS for f in FORMS]
    random.Random(seed).shuffle(ps)
    if n > len(ps):
        raise SystemExit(f"at most {len(ps)} distinct prompts")
    return ps[:n]


async def generate(model_dir: Path, model_id: str, jobs: list[tuple[Any, Any]], max_tokens: int, concurrency: int) -> list[tuple[int, ...]]:
    """Run (prompt, sampling) jobs on a real engine; prompt is token ids (tuple) or chat messages,
    sampling a `Sampling` or a temperature."""
    from darkbloom.inference.engine import ChoiceFinished, open_engine
    from darkbloom.inference.params import GenerationRequest, Sampling

    out: list[tuple[int, ...] | None] = [None] * len(jobs)
    done = 0
    t0 = time.monotonic()
    async with open_engine([(model_id, model_dir)], max_concurrent=concurrency, max_queue=len(jobs) + 1, self_benchmark=False) as eng:
        limiter = trio.CapacityLimiter(concurrency)

        async def one(i: int, prompt: Any, sampling: Any) -> None:
            nonlocal done
            s = sampling if isinstance(sampling, Sampling) else Sampling(temperature=float(sampling))
            if isinstance(prompt, tuple):
                req = GenerationRequest(kind="completion", prompt=prompt, max_tokens=max_tokens, sampling=s)
            else:
                req = GenerationRequest(kind="chat", messages=prompt, max_tokens=max_tokens, sampling=s)
            async with limiter:
                async for ev in eng.generate(model_id, req):
                    if isinstance(ev, ChoiceFinished):
                        out[i] = ev.token_ids
            done += 1
            if done % 50 == 0:
                print(f"  {model_id}: {done}/{len(jobs)} in {time.monotonic() - t0:.0f}s", file=sys.stderr)

        async with trio.open_nursery() as nursery:
            for i, (p, t) in enumerate(jobs):
                nursery.start_soon(one, i, p, t)
    return [o if o is not None else () for o in out]


# Honest sampling regimes: name -> (temperature, top_p, top_k). "t0.7_filtered" exercises the
# top_p / top_k handling of the reference distribution.
REGIMES: dict[str, tuple[float, float, int]] = {
    "greedy": (0.0, 1.0, 0),
    "t0.7": (0.7, 1.0, 0),
    "t1.0": (1.0, 1.0, 0),
    "t0.7_filtered": (0.7, 0.9, 50),
}


async def collect_generations(args: argparse.Namespace) -> dict[str, Any]:
    """Phase 1: honest SmolLM2 answers per regime, another model's answers, random tokens (token ids)."""
    from transformers import AutoTokenizer

    from darkbloom.config import load_config
    from darkbloom.inference.catalog import models_dir, prepare_bundled
    from darkbloom.inference.params import Sampling
    from darkbloom.inference.testmodel import make_test_model

    root = models_dir(load_config().inference)
    prepare_bundled(root)
    smol = root / "smollm2-135m-instruct"
    small = make_test_model(Path(args.workdir) / "small", "small", seed=0)
    tok = AutoTokenizer.from_pretrained(str(smol))
    vocab = len(tok)
    prompts = all_prompts(args.prompts, args.seed)
    prompt_ids = [
        tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False), add_special_tokens=False))
        for p in prompts
    ]
    counts = {"greedy": args.prompts, "t0.7": args.prompts, "t1.0": args.prompts, "t0.7_filtered": args.filtered}
    jobs = []  # (regime, prompt index)
    for regime, n in counts.items():
        jobs += [(regime, i) for i in range(min(n, len(prompts)))]
    print(f"honest: {len(jobs)} generations of <= {args.max_tokens} tokens", file=sys.stderr)
    t0 = time.monotonic()
    samp = {r: Sampling(temperature=t, top_p=p, top_k=k) for r, (t, p, k) in REGIMES.items()}
    honest_out = await generate(smol, "smollm2", [(prompt_ids[i], samp[r]) for r, i in jobs], args.max_tokens, args.concurrency)
    gen_s = time.monotonic() - t0
    cheat_prompts = list(range(min(args.cheats, len(prompts))))
    other_jobs = [([{"role": "user", "content": prompts[i]}], (0.0, 0.7, 1.0)[i % 3]) for i in cheat_prompts]
    small_tok = AutoTokenizer.from_pretrained(str(small))
    other_raw = await generate(small, "small", other_jobs, args.max_tokens, args.concurrency) if other_jobs else []
    rng = random.Random(args.seed)
    items: list[dict[str, Any]] = []
    for (r, i), o in zip(jobs, honest_out):
        if o:
            items.append({"kind": f"honest_{r}", "regime": r, "prompt": i, "p": list(prompt_ids[i]), "o": list(o)})
    for i, raw in zip(cheat_prompts, other_raw):
        text = small_tok.decode(list(raw), skip_special_tokens=True)
        ids = tok.encode(text, add_special_tokens=False)[: args.max_tokens]
        if ids:
            items.append({"kind": "other_model", "prompt": i, "p": list(prompt_ids[i]), "o": ids})
    for i in cheat_prompts[: args.random_cheats]:
        items.append({"kind": "random_tokens", "prompt": i, "p": list(prompt_ids[i]), "o": [rng.randrange(vocab) for _ in range(args.max_tokens)]})
    return {"items": items, "generate_s": gen_s + 0.0, "vocab": vocab, "max_tokens": args.max_tokens}


def score_all(model_dir: Path, items: list[tuple[list[int], list[int]]], batch: int) -> list[list[Any]]:
    """Second instance: load SmolLM2 on this thread and score everything here (MLX streams are per thread)."""
    import mlx_lm

    from darkbloom.inference.scoring import score_batch

    model, tok = mlx_lm.load(str(model_dir))
    vocab = model.args.vocab_size
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))  # similar lengths per batch
    res: list[Any] = [None] * len(items)
    t0 = time.monotonic()
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        scored = score_batch(model, [items[i] for i in idx], vocab_size=vocab)
        for i, s in zip(idx, scored):
            res[i] = [(r.logprob, r.rank) for r in s]
        if (b // batch) % 10 == 0:
            print(f"  scored {b + len(idx)}/{len(items)} in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return res


async def collect(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from darkbloom.config import load_config
    from darkbloom.inference.catalog import models_dir, prepare_bundled
    from darkbloom.inference.testmodel import make_test_model

    root = models_dir(load_config().inference)
    prepare_bundled(root)
    smol = root / "smollm2-135m-instruct"
    small = make_test_model(Path(args.workdir) / "small", "small", seed=0)
    tok = AutoTokenizer.from_pretrained(str(smol))
    vocab = len(tok)

    prompts = all_prompts(args.prompts, args.seed)
    prompt_ids = [
        tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False), add_special_tokens=False))
        for p in prompts
    ]
    temps = [float(t) for t in args.temps.split(",")] if args.temps else [0.0] + [0.7, 1.0] * args.per_prompt
    honest_jobs = [(pi, i, t) for i in range(len(prompts)) for t in temps for pi in [prompt_ids[i]]]
    print(f"honest: {len(honest_jobs)} generations of <= {args.max_tokens} tokens", file=sys.stderr)
    t0 = time.monotonic()
    honest_out = await generate(smol, "smollm2", [(p, t) for p, _, t in honest_jobs], args.max_tokens, args.concurrency)
    gen_s = time.monotonic() - t0

    cheat_prompts = list(range(min(args.cheats, len(prompts))))
    cheat_temps = [0.0, 0.7, 1.0]
    other_jobs = [([{"role": "user", "content": prompts[i]}], cheat_temps[i % 3]) for i in cheat_prompts]
    small_tok = AutoTokenizer.from_pretrained(str(small))
    other_raw = await generate(small, "small", other_jobs, args.max_tokens, args.concurrency) if other_jobs else []
    rng = random.Random(args.seed)

    samples: list[dict[str, Any]] = []
    for (p, i, t), o in zip(honest_jobs, honest_out):
        if o:
            samples.append({"kind": f"honest_t{t}", "prompt": i, "p": list(p), "o": list(o)})
    for i, raw in zip(cheat_prompts, other_raw):
        text = small_tok.decode(list(raw), skip_special_tokens=True)
        ids = tok.encode(text, add_special_tokens=False)[: args.max_tokens]
        if ids:
            samples.append({"kind": "other_model", "prompt": i, "p": list(prompt_ids[i]), "o": ids})
    for i in cheat_prompts:
        samples.append({"kind": "random_tokens", "prompt": i, "p": list(prompt_ids[i]), "o": [rng.randrange(vocab) for _ in range(args.max_tokens)]})
    greedy = {s["prompt"]: s["o"] for s in samples if s["kind"] == "honest_t0.0"}
    for i in cheat_prompts:
        j = (i * 7 + 13) % len(prompts)
        if j != i and j in greedy:
            samples.append({"kind": "replayed_answer", "prompt": i, "p": list(prompt_ids[i]), "o": greedy[j]})

    t1 = time.monotonic()
    scores = await trio.to_thread.run_sync(score_all, smol, [(s["p"], s["o"]) for s in samples], args.batch)
    score_s = time.monotonic() - t1
    for s, sc in zip(samples, scores):
        s["lp"] = [round(lp, 4) for lp, _ in sc]
        s["rk"] = [rk for _, rk in sc]
        del s["p"], s["o"]  # keep only what the verdict needs
    return {"samples": samples, "generate_s": gen_s, "score_s": score_s, "vocab": vocab, "max_tokens": args.max_tokens}


TIERS = {"greedy": "honest_t0.0", "low": "honest_t0.7", "high": "honest_t1.0"}
CHEATS = ("other_model", "random_tokens", "replayed_answer")


def analyse(data: dict[str, Any], seed: int) -> dict[str, Any]:
    """Per sampling tier: calibrate on half the prompts, report rates on the other half and on all.

    Two rank regimes: k fixed at 100 (what a node reports today: in/out of its top 100) and k
    chosen freely (needs exact ranks from the verifier)."""
    samples = data["samples"]
    prompts = sorted({s["prompt"] for s in samples})
    rng = random.Random(seed)
    rng.shuffle(prompts)
    cal_prompts = set(prompts[: len(prompts) // 2])

    def obs(s: dict[str, Any]) -> verify.ScoredOutput:
        return verify.ScoredOutput(logprobs=tuple(s["lp"]), ranks=tuple(s["rk"]))

    cal = [s for s in samples if s["prompt"] in cal_prompts]
    held = [s for s in samples if s["prompt"] not in cal_prompts]
    cheat_cal = [obs(s) for s in cal if s["kind"] in ("other_model", "random_tokens")]
    results: dict[str, Any] = {}
    for regime, ks in (("k100", (100,)), ("free_k", (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))):
        policies: dict[str, Any] = {}
        rows = []
        for tier, honest_kind in TIERS.items():
            policy = verify.calibrate([obs(s) for s in cal if s["kind"] == honest_kind], cheat_cal, ks=ks)
            policies[tier] = verify.policy_to_dict(policy)
            for kind in (honest_kind, *CHEATS):
                for split, group in (("held-out", held), ("all", samples)):
                    xs = [obs(s) for s in group if s["kind"] == kind]
                    flagged = sum(1 for x in xs if verify.judge(x, policy).flagged)
                    n = len(xs)
                    ok = n - flagged if kind.startswith("honest") else flagged
                    rows.append({"tier": tier, "kind": kind, "split": split, "n": n, "flagged": flagged,
                                 "correct_rate": ok / n if n else math.nan,
                                 "rule_of_three_miss_bound": (3.0 / n) if n and ok == n else None})
        results[regime] = {"policies": policies, "rows": rows}
    tok_counts = [len(s["lp"]) for s in samples if s["kind"].startswith("honest")]
    return {"regimes": results, "honest_mean_tokens": sum(tok_counts) / max(1, len(tok_counts))}


def fixed_report(data: dict[str, Any], out: str) -> int:
    """Judge every sample with the shipped policies (no calibration on this data)."""
    tier_of = {"honest_t0.0": 0.0, "honest_t0.7": 0.7, "honest_t1.0": 1.0}
    rows = []
    for kind in sorted({s["kind"] for s in data["samples"]}):
        xs = [s for s in data["samples"] if s["kind"] == kind]
        temps = [tier_of[kind]] if kind in tier_of else [0.0, 0.7, 1.0]
        for t in temps:
            policy = verify.DEFAULT_POLICIES.for_temperature(t)
            flagged = sum(1 for s in xs if verify.judge(verify.ScoredOutput(tuple(s["lp"]), tuple(s["rk"])), policy).flagged)
            ok = len(xs) - flagged if kind in tier_of else flagged
            rows.append({"kind": kind, "policy_temperature": t, "n": len(xs), "flagged": flagged, "correct_rate": ok / len(xs),
                         "rule_of_three_miss_bound": 3.0 / len(xs) if ok == len(xs) else None})
            b = f"<= {3.0 / len(xs):.4f}" if ok == len(xs) else ""
            print(f"{kind:<16} policy t={t:<4} n={len(xs):>4} flagged={flagged:>4} correct={ok / len(xs):.4f} {b}")
    mean_tokens = sum(len(s["lp"]) for s in data["samples"]) / max(1, len(data["samples"]))
    print(f"generation {data['generate_s']:.0f}s, scoring {data['score_s']:.0f}s, mean {mean_tokens:.1f} tokens per answer")
    Path(out).write_text(json.dumps({"rows": rows, "policies": {"greedy": verify.policy_to_dict(verify.DEFAULT_POLICIES.greedy),
                                     "low": verify.policy_to_dict(verify.DEFAULT_POLICIES.low),
                                     "high": verify.policy_to_dict(verify.DEFAULT_POLICIES.high)}}, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--per-prompt", type=int, default=2, help="sampled answers per prompt at each of t=0.7 and t=1.0")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--cheats", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/darkbloom-calibration")
    ap.add_argument("--samples", default="bench/results/verify_samples.json")
    ap.add_argument("--out", default="bench/results/verify_calibration.json")
    ap.add_argument("--analyse-only", action="store_true", help="re-run the analysis on saved samples")
    ap.add_argument("--temps", default="", help="honest temperatures per prompt, e.g. 0.7,0.7 (default 0 + 0.7,1.0 x per-prompt)")
    ap.add_argument("--fixed", action="store_true", help="judge with verify.DEFAULT_POLICIES instead of calibrating (out-of-sample check)")
    ap.add_argument("--filtered", type=int, default=100, help="honest answers at t=0.7, top_p 0.9, top_k 50")
    ap.add_argument("--random-cheats", type=int, default=150)
    ap.add_argument("--generations", default="", help="token ids of phase 1 (default <workdir>/generations.json; private to this machine)")
    ap.add_argument("--generate-only", action="store_true")
    args = ap.parse_args()
    gen_file = Path(args.generations or Path(args.workdir) / "generations.json")
    if args.generate_only:
        gen = trio.run(collect_generations, args)
        gen_file.parent.mkdir(parents=True, exist_ok=True)
        gen_file.write_text(json.dumps(gen))
        print(f"{len(gen['items'])} items in {gen['generate_s']:.0f}s -> {gen_file}")
        return 0
    if args.analyse_only:
        data = json.loads(Path(args.samples).read_text())
    else:
        data = trio.run(collect, args)
        Path(args.samples).parent.mkdir(parents=True, exist_ok=True)
        Path(args.samples).write_text(json.dumps(data))
    if args.fixed:
        return fixed_report(data, args.out)
    result = analyse(data, args.seed)
    result.update({k: data[k] for k in ("generate_s", "score_s", "vocab", "max_tokens")})
    for regime, r in result["regimes"].items():
        print(f"== {regime}")
        for tier, pol in r["policies"].items():
            print(f"  {tier}: top_k={pol['top_k']} max_outside={pol['max_outside']} min_mean_logprob={pol['min_mean_logprob']}")
        print(f"  {'tier':<7} {'kind':<16} {'split':<9} {'n':>4} {'flagged':>7} {'correct':>8}  95% miss bound")
        for row in r["rows"]:
            b = f"<= {row['rule_of_three_miss_bound']:.4f}" if row["rule_of_three_miss_bound"] else ""
            print(f"  {row['tier']:<7} {row['kind']:<16} {row['split']:<9} {row['n']:>4} {row['flagged']:>7} {row['correct_rate']:>8.4f}  {b}")
    print(f"generation {data['generate_s']:.0f}s, scoring {data['score_s']:.0f}s, honest mean {result['honest_mean_tokens']:.1f} tokens")
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
