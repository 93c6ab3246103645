"""Measure the spot-check verdict (darkbloom/api/trust/verify.py) on the bundled SmolLM2: honest pass rate, cheats caught.

    .venv/bin/python bench/calibrate_verify.py [--prompts 240] [--greedy 120] [--filtered 60] [--cheats 240]
        [--random-cheats 120] [--max-tokens 24] [--generate-only] [--analyse-only]
        [--samples bench/results/verify_samples.json] [--out bench/results/verify_calibration.json]

Phase 1 (generation; token ids go to --workdir only, never to bench/results):
1. Honest node: our real engine (`open_engine`, continuous batching) serving SmolLM2 answers
   chat prompts per sampling regime (REGIMES: greedy, t=0.7, t=1.0, and t=0.7 with top_p 0.9
   and top_k 50), the way requests are served. Outputs are the engine's own token ids.
2. Cheating node A, "another model": the project's random ~20M test model (`small`) answers
   the same prompts through its own engine (temperature 0 / 0.7 / 1.0 in turn); its text is
   re-tokenized with SmolLM2's tokenizer (what a cheater advertising SmolLM2's digest sends).
3. Cheating node B: uniformly random token ids from SmolLM2's vocabulary.
Phase 2 (the verifier): a second SmolLM2 instance scores every output in one teacher-forced
forward pass per batch (scoring.output_logits + sampled_stats) under the regime it is claimed
to come from: an honest answer under its own, a cheat under every regime.

The shipped policy (verify.DEFAULT_POLICY) has no fitted threshold (the e-value's false-flag
bound holds by construction), so there is no calibration split: every sample is out of sample.
Reported per cell: n, flagged, pass or catch rate, the one-sided 95% Clopper-Pearson upper
bound on the honest failure rate, the z rule at -3 / -4 and the legacy raw-distribution
policies for comparison, and detection by scored length. Prompts are synthetic.

--accumulate (with saved --samples): per-node rates when the shim accumulates a node's checks
(darkbloom/api/trust/accumulate.py): a simulated node gets k distinct scored samples of one cell
in random order (--draws resamples); it is flagged when one check is flagged (judge) or the
e-detector over the checks' final e-values reaches ln 1000. Reported for k = 1..8: caught (cheat
cells) or falsely flagged (honest cells), plus the plain product and "any single check flagged"
for comparison, and for honest cells the largest detector value over long lifetimes (k = 200,
drawn with replacement).
"""

from __future__ import annotations

import argparse
import dataclasses
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
    counts = {"greedy": args.greedy or args.prompts, "t0.7": args.prompts, "t1.0": args.prompts, "t0.7_filtered": args.filtered}
    if args.regimes:
        counts = {r: n for r, n in counts.items() if r in args.regimes.split(",")}
    jobs = []  # (regime, prompt index)
    for regime, n in counts.items():
        jobs += [(regime, i) for i in range(min(n, len(prompts)))]
    print(f"honest: {len(jobs)} generations of <= {args.max_tokens} tokens", file=sys.stderr)
    t0 = time.monotonic()
    # Every sampled request carries a seed, as the shim sets one (darkbloom.api.trust.seeding): the
    # engine draws with replayable noise and the verifier replays it.
    seed_rng = random.Random(args.seed + 1)
    seeds = [seed_rng.randrange(1 << 63) if REGIMES[r][0] > 0 else None for r, _ in jobs]
    samp = [Sampling(temperature=REGIMES[r][0], top_p=REGIMES[r][1], top_k=REGIMES[r][2], seed=sd) for (r, _), sd in zip(jobs, seeds)]
    honest_out = await generate(smol, "smollm2", [(prompt_ids[i], sp) for (_, i), sp in zip(jobs, samp)], args.max_tokens, args.concurrency)
    gen_s = time.monotonic() - t0
    cheat_prompts = list(range(min(args.cheats, len(prompts))))
    if args.reuse_cheats:  # the cheats' token ids of an earlier run (they do not depend on seeds)
        old = json.loads(Path(args.reuse_cheats).read_text())["items"]
        cheat_items = [it for it in old if it["kind"] in ("other_model", "random_tokens")]
        cheat_prompts = []
    other_jobs = [([{"role": "user", "content": prompts[i]}], (0.0, 0.7, 1.0)[i % 3]) for i in cheat_prompts]
    small_tok = AutoTokenizer.from_pretrained(str(small))
    other_raw = await generate(small, "small", other_jobs, args.max_tokens, args.concurrency) if other_jobs else []
    rng = random.Random(args.seed)
    items: list[dict[str, Any]] = []
    for (r, i), o, sd in zip(jobs, honest_out, seeds):
        if o:
            items.append({"kind": f"honest_{r}", "regime": r, "prompt": i, "p": list(prompt_ids[i]), "o": list(o), "seed": sd})
    if args.reuse_cheats:
        items += cheat_items
    for i, raw in zip(cheat_prompts, other_raw):
        text = small_tok.decode(list(raw), skip_special_tokens=True)
        ids = tok.encode(text, add_special_tokens=False)[: args.max_tokens]
        if ids:
            items.append({"kind": "other_model", "prompt": i, "p": list(prompt_ids[i]), "o": ids})
    for i in cheat_prompts[: args.random_cheats]:
        items.append({"kind": "random_tokens", "prompt": i, "p": list(prompt_ids[i]), "o": [rng.randrange(vocab) for _ in range(args.max_tokens)]})
    for it in items:  # a cheat gets the seed the shim gave its request, and ignores it
        if not it["kind"].startswith("honest"):
            it["seed"] = seed_rng.randrange(1 << 63)
    return {"items": items, "generate_s": gen_s + 0.0, "vocab": vocab, "max_tokens": args.max_tokens}


def score_items(model_dir: Path, items: list[dict[str, Any]], batch: int, claims_only: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Phase 2, the verifier: a second SmolLM2 instance loaded on this thread scores every output
    in one teacher-forced forward pass per batch, under each sampling regime the output is
    claimed to come from (an honest answer: its own; a cheat: every regime)."""
    import mlx_lm

    from darkbloom.inference.scoring import TILTS, SamplingSpec, output_logits, sampled_stats

    model, _ = mlx_lm.load(str(model_dir))
    vocab = model.args.vocab_size
    specs = {r: SamplingSpec(temperature=t, top_p=p, top_k=k) for r, (t, p, k) in REGIMES.items()}
    order = sorted(range(len(items)), key=lambda i: len(items[i]["p"]) + len(items[i]["o"]))
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        logits = output_logits(model, [(items[i]["p"], items[i]["o"]) for i in idx], vocab_size=vocab)
        for i, lg in zip(idx, logits):
            it = items[i]
            claims = [it["regime"]] if "regime" in it else [r for r in REGIMES if not claims_only or r in claims_only]
            for claim in claims:
                spec = specs[claim]
                if spec.temperature > 0 and it.get("seed") is not None:  # the verifier replays the seeded draws
                    spec = dataclasses.replace(spec, seed=it["seed"])
                st = sampled_stats(lg, it["o"], spec)
                x = verify.scored_from_sampled(st, TILTS)
                rows.append({"kind": it["kind"], "claim": claim, "prompt": it["prompt"], "lp": x.logprobs, "rk": x.ranks,
                             "slp": x.sample_logprobs, "h": x.entropies, "var": x.variances, "lt": x.log_tilts,
                             "ex": x.excluded, "gap": x.replay_gaps})
        if (b // batch) % 10 == 0:
            print(f"  scored {b + len(idx)}/{len(items)} in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return rows


def _obs(r: dict[str, Any]) -> verify.ScoredOutput:
    from darkbloom.inference.scoring import TILTS

    return verify.ScoredOutput(tuple(r["lp"]), tuple(r["rk"]), sample_logprobs=tuple(r["slp"]), entropies=tuple(r["h"]),
                               variances=tuple(r["var"]), log_tilts=tuple(tuple(t) for t in r["lt"]), tilts=TILTS,
                               excluded=tuple(r["ex"]), replay_gaps=tuple(r.get("gap") or ()))


def upper95(k: int, n: int) -> float:
    """One-sided 95% Clopper-Pearson upper bound on a rate with k events in n trials."""
    if n == 0:
        return 1.0
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        cdf = sum(math.comb(n, j) * mid**j * (1 - mid) ** (n - j) for j in range(k + 1))
        lo, hi = (mid, hi) if cdf > 0.05 else (lo, mid)
    return hi


# The raw-distribution policies shipped before the e-value (for comparison on the same data).
LEGACY = {
    "greedy": verify.VerifyPolicy(top_k=100, max_outside=0, min_mean_logprob=-2.04, far_logprob=-11.0, max_far=0, min_tokens=4),
    "t0.7": verify.VerifyPolicy(top_k=100, max_outside=4, min_mean_logprob=-3.47, far_logprob=-10.0, max_far=1, min_tokens=4),
    "t1.0": verify.VerifyPolicy(top_k=100, max_outside=verify.NO_RANK_RULE, min_mean_logprob=-8.07, min_tokens=4),
}
LEGACY["t0.7_filtered"] = LEGACY["t0.7"]


# Variants of the e-value rule, reported side by side (alpha = e^-max_log_evalue; lam = bet fractions).
VARIANTS = {
    "a1e-3 lam1": verify.VerifyPolicy(max_log_evalue=math.log(1e3), bet_fractions=(1.0,)),
    "a1e-3 lam.5": verify.VerifyPolicy(max_log_evalue=math.log(1e3), bet_fractions=(0.5,)),
    "a1e-3 lam1,.5,.2": verify.VerifyPolicy(max_log_evalue=math.log(1e3), bet_fractions=(1.0, 0.5, 0.2)),
    "a1e-4 lam.5": verify.VerifyPolicy(max_log_evalue=math.log(1e4), bet_fractions=(0.5,)),
    "a1e-4 lam1": verify.VerifyPolicy(max_log_evalue=math.log(1e4), bet_fractions=(1.0,)),
}


def _hist(values: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        key = str(v) if v < 5 else "5+"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def analyse(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (kind, claimed regime): pass/catch rates of the shipped policy, the z rule at -3 and
    -4 and the legacy raw rules; honest e-value quantiles; detection by output length."""
    policy = verify.DEFAULT_POLICY
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["kind"], r["claim"]), []).append(r)
    table = []
    for (kind, claim), rs in sorted(cells.items()):
        xs = [_obs(r) for r in rs]
        honest = kind.startswith("honest")
        verdicts = [verify.judge(x, policy) for x in xs]
        flagged = sum(v.flagged for v in verdicts)
        inconclusive = sum(v.inconclusive for v in verdicts)
        zs = [verify.z_score(x) for x in xs]
        les = sorted(v.log_evalue for v in verdicts)
        row = {
            "kind": kind, "claim": claim, "n": len(xs), "flagged": flagged, "inconclusive": inconclusive,
            "reasons": {k: sum(v.reason == k for v in verdicts) for k in ("excluded_token", "high_evalue")},
            "rate": (len(xs) - flagged) / len(xs) if honest else flagged / len(xs),
            "honest_fail_upper95": upper95(flagged, len(xs)) if honest else None,
            "z_lt_-3": sum(z < -3 for z in zs), "z_lt_-4": sum(z < -4 for z in zs),
            "z_or_excluded_lt_-4": sum((z < -4) or v.excluded > 0 for z, v in zip(zs, verdicts)),
            "legacy_flagged": sum(verify.judge(verify.ScoredOutput(x.logprobs, x.ranks), LEGACY[claim]).flagged for x in xs),
            "log_evalue_max": les[-1], "log_evalue_p99": les[min(len(les) - 1, int(0.99 * len(les)))], "min_z": min(zs),
            "mean_tokens": sum(len(x.logprobs) for x in xs) / len(xs),
            "variants": {name: sum(verify.judge(x, pol).flagged for x in xs) for name, pol in VARIANTS.items()},
            "excluded_tokens": sum(sum(x.excluded) for x in xs),
            "replayed": sum(1 for x in xs if x.replay_gaps),
            "replay_flagged": sum(v.reason == "replay_mismatch" for v in verdicts),
            # without the replay rule (the e-value and excluded tokens alone), for comparison
            "without_replay_flagged": sum(verify.judge(dataclasses.replace(x, replay_gaps=()), policy).flagged for x in xs),
            "max_replay_gap": max((g for x in xs for g, e in zip(x.replay_gaps, x.excluded) if not e), default=None),
            "replay_misses_hist": _hist([v.replay_misses for v in verdicts if v.replay_misses >= 0]),
            "rank_gt0_tokens": sum(sum(1 for r in x.ranks if r > 0) for x in xs),
        }
        if not honest:  # detection when only the first L tokens are scored
            row["caught_by_length"] = {
                L: sum(verify.judge(x, dataclasses.replace(policy, max_scored_tokens=L)).flagged for x in xs) / len(xs)
                for L in (1, 2, 4, 8, 16, 24)
            }
        table.append(row)
    return {"policy": verify.policy_to_dict(policy), "cells": table}


def accumulation(rows: list[dict[str, Any]], *, ks: tuple[int, ...] = tuple(range(1, 9)), draws: int = 2000,
                 seed: int = 0, life: int = 200, stops: tuple[float, ...] | None = None) -> dict[str, Any]:
    """Per-node flag rates after k checks (see the module docstring, --accumulate). `stops`: the
    per-check e-value's stop levels (verify.stopped_log_evalue; default: the shipped policy's)."""
    from darkbloom.api.trust.accumulate import DEFAULT_ACCUMULATE_LOG_EVALUE as THR
    from darkbloom.api.trust.accumulate import log_detector

    rng = random.Random(seed)
    cells: dict[tuple[str, str], list[tuple[bool, float]]] = {}
    for r in rows:
        pol = verify.DEFAULT_POLICY if stops is None else dataclasses.replace(verify.DEFAULT_POLICY, accumulate_stops=stops)
        v = verify.judge(_obs(r), pol)
        if not v.inconclusive:
            cells.setdefault((r["kind"], r["claim"]), []).append((v.flagged, v.check_log_evalue))
    out = []
    for (kind, claim), pool in sorted(cells.items()):
        honest = kind.startswith("honest")
        row: dict[str, Any] = {"kind": kind, "claim": claim, "n": len(pool),
                               "mean_check_log_e": sum(le for _, le in pool) / len(pool), "detector": {}, "product": {},
                               "any_single": {}}
        for k in ks:
            if k > len(pool):
                break
            det = prod = single = 0
            for _ in range(draws):
                seq = rng.sample(pool, k)
                single_hit = any(f for f, _ in seq)
                les = [le for _, le in seq]
                det += single_hit or max(log_detector(les)) >= THR
                run, hit = 0.0, False
                for le in les:
                    run += le
                    hit |= run >= THR
                prod += single_hit or hit
                single += single_hit
            row["detector"][k], row["product"][k], row["any_single"][k] = det / draws, prod / draws, single / draws
        honest_pool = cells.get((f"honest_{claim}", claim))
        if not honest and honest_pool:  # a node honest for `turn` checks that then cheats: accumulation only
            turn, late_det, late_prod = 100, {}, {}
            for k in ks:
                det = prod = 0
                for _ in range(draws // 4):
                    les = [le for _, le in (rng.choice(honest_pool) for _ in range(turn))] + [le for _, le in rng.sample(pool, k)]
                    det += max(log_detector(les)[turn:]) >= THR
                    run, hit = 0.0, False
                    for le in les:
                        run += le
                        hit |= run >= THR
                    prod += hit
                late_det[k], late_prod[k] = det / (draws // 4), prod / (draws // 4)
            row["after_100_honest"] = {"detector": late_det, "product": late_prod}
        if honest:  # long lifetimes, with replacement: the largest detector value seen, and flags
            peak, flags = -math.inf, 0
            for _ in range(draws // 4):
                m = max(log_detector(le for _, le in (rng.choice(pool) for _ in range(life))))
                peak, flags = max(peak, m), flags + (m >= THR)
            row["lifetime"] = {"checks": life, "nodes": draws // 4, "flagged": flags, "max_log_detector": peak}
        out.append(row)
    return {"threshold": THR, "draws": draws, "stops": list(stops or verify.DEFAULT_POLICY.accumulate_stops), "cells": out}


def print_accumulation(acc: dict[str, Any]) -> None:
    print(f"per-node flag rate after k checks (detector or a single flag; threshold ln E {acc['threshold']:.2f}, "
          f"{acc['draws']} simulated nodes per cell; per-check e-value stopped at ln levels {acc['stops']})")
    for c in acc["cells"]:
        print(f"  {c['kind']:<22} {c['claim']:<14} n={c['n']:>4} mean check lnE {c['mean_check_log_e']:>6.2f}")
        for name in ("detector", "product", "any_single"):
            print(f"    {name:<10} " + " ".join(f"k={k}:{v:.3f}" for k, v in c[name].items()))
        if "after_100_honest" in c:
            for name, vals in c["after_100_honest"].items():
                print(f"    turned after 100 honest checks, accumulation only, {name:<8} "
                      + " ".join(f"k={k}:{v:.3f}" for k, v in vals.items()))
        if "lifetime" in c:
            life = c["lifetime"]
            print(f"    lifetime {life['checks']} checks x {life['nodes']} nodes: flagged {life['flagged']}, "
                  f"max ln detector {life['max_log_detector']:.2f}")


def print_table(result: dict[str, Any]) -> None:
    print(f"policy: {result['policy']}")
    print(f"{'kind':<22} {'claimed':<14} {'n':>4} {'tok':>5} {'flag':>5} {'pass/caught':>11} {'95%UB fail':>10} "
          f"{'z<-3':>5} {'z<-4':>5} {'legacy':>6} {'lnE max':>8} {'min z':>6}")
    for c in result["cells"]:
        ub = f"{c['honest_fail_upper95']:.4f}" if c["honest_fail_upper95"] is not None else ""
        print(f"{c['kind']:<22} {c['claim']:<14} {c['n']:>4} {c['mean_tokens']:>5.1f} {c['flagged']:>5} {c['rate']:>11.4f} {ub:>10} "
              f"{c['z_lt_-3']:>5} {c['z_lt_-4']:>5} {c['legacy_flagged']:>6} {c['log_evalue_max']:>8.2f} {c['min_z']:>6.2f}")
    print("replay (seeded sampled regimes): replayed, flagged by replay, flagged without the replay rule, largest honest gap, misses per check")
    for c in result["cells"]:
        if c.get("replayed"):
            gap = f"{c['max_replay_gap']:.5f}" if c["max_replay_gap"] is not None else "-"
            print(f"  {c['kind']:<22} {c['claim']:<14} n={c['n']:>4} replayed {c['replayed']:>4} replay-flag {c['replay_flagged']:>4} "
                  f"no-replay-flag {c['without_replay_flagged']:>4} max gap {gap} misses {c['replay_misses_hist']}")
    print("flagged by variant: " + " | ".join(VARIANTS))
    for c in result["cells"]:
        print(f"  {c['kind']:<22} {c['claim']:<14} n={c['n']:>4} " + " ".join(f"{v:>5}" for v in c["variants"].values()))
    print("detection by scored length (cheats):")
    for c in result["cells"]:
        if "caught_by_length" in c:
            print(f"  {c['kind']:<14} {c['claim']:<14} " + " ".join(f"L={L}:{v:.3f}" for L, v in c["caught_by_length"].items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=240)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--cheats", type=int, default=240, help="another model's answers (one per prompt)")
    ap.add_argument("--concurrency", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/darkbloom-calibration")
    ap.add_argument("--samples", default="bench/results/verify_samples.json", help="scored statistics (no token ids)")
    ap.add_argument("--out", default="bench/results/verify_calibration.json")
    ap.add_argument("--analyse-only", action="store_true", help="re-run the analysis on saved samples")
    ap.add_argument("--greedy", type=int, default=0, help="honest greedy answers (default: one per prompt)")
    ap.add_argument("--filtered", type=int, default=60, help="honest answers at t=0.7, top_p 0.9, top_k 50")
    ap.add_argument("--random-cheats", type=int, default=120)
    ap.add_argument("--generations", default="", help="token ids of phase 1 (default <workdir>/generations.json; private to this machine)")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--accumulate", action="store_true", help="per-node accumulated-evidence rates from saved --samples")
    ap.add_argument("--draws", type=int, default=2000, help="simulated nodes per cell for --accumulate")
    ap.add_argument("--accumulate-out", default="bench/results/verify_accumulate.json")
    ap.add_argument("--regimes", default="", help="honest regimes to generate, comma-separated (default: all)")
    ap.add_argument("--claims", default="", help="regimes cheats are scored under, comma-separated (default: all)")
    ap.add_argument("--reuse-cheats", default="", help="take the cheats' token ids from this earlier generations file")
    ap.add_argument("--coupled", action="store_true",
                    help="score only the coupled cheat: honest seeded answers at one temperature claimed at the other "
                         "(same model, same seed, same noise: t=1.0 as t=0.7 and t=0.7 as t=1.0)")
    args = ap.parse_args()
    if args.accumulate:
        acc = accumulation(json.loads(Path(args.samples).read_text())["rows"], draws=args.draws, seed=args.seed)
        print_accumulation(acc)
        Path(args.accumulate_out).write_text(json.dumps(acc, indent=2))
        return 0
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
        if not gen_file.exists():
            gen = trio.run(collect_generations, args)
            gen_file.parent.mkdir(parents=True, exist_ok=True)
            gen_file.write_text(json.dumps(gen))
        gen = json.loads(gen_file.read_text())
        if args.coupled:  # a node that uses the seed but serves another temperature
            swap = {"t1.0": "t0.7", "t0.7": "t1.0"}
            gen["items"] = [{**it, "kind": f"seeded_{it['regime']}_as_{swap[it['regime']]}", "regime": swap[it["regime"]]}
                            for it in gen["items"] if it.get("regime") in swap]
        from darkbloom.config import load_config
        from darkbloom.inference.catalog import models_dir

        smol = models_dir(load_config().inference) / "smollm2-135m-instruct"
        t0 = time.monotonic()
        rows = score_items(smol, gen["items"], args.batch, tuple(c for c in args.claims.split(",") if c))
        data = {"rows": rows, "generate_s": gen["generate_s"], "score_s": time.monotonic() - t0, "max_tokens": gen["max_tokens"]}
        Path(args.samples).parent.mkdir(parents=True, exist_ok=True)
        Path(args.samples).write_text(json.dumps(data))
    result = analyse(data["rows"])
    result.update({k: data[k] for k in ("generate_s", "score_s", "max_tokens")})
    print_table(result)
    print(f"generation {data['generate_s']:.0f}s, scoring {data['score_s']:.0f}s")
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
