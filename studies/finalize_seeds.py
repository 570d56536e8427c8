"""AutoRound against bitsearch's SignRound and SignRound → step sizes over seeds, from the points
the benchmark (``--seed N --tag t200-ar-3.25-sN``) and ``finalize_chain`` (``--seed N --out
.../w3g128-sN``) left: each seed's perplexity and held-out KL, the mean and standard deviation
over the seeds every method has, and the paired difference to AutoRound with a 95 % t interval
(seed by seed: the same seed draws the same mini-batch order in both).

    python -m studies.finalize_seeds --seeds 0,1,2,3 --out studies/results/finalize/seeds-w3g128
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
from scipy import stats

from bitsearch.atomic import write_text_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "finalize")


def suffix(seed: int) -> str:
    return f"-s{seed}" if seed else ""


def sources(args) -> dict[str, str]:
    """method -> path template with {s} for the seed suffix."""
    return {
        "AutoRound": os.path.join(RESULTS, "bench", args.ar_tag + "{s}", "points", f"autoround@{args.budget}.json"),
        "bitsearch SignRound": os.path.join(RESULTS, "chain", args.chain + "{s}", "points", "signround+none.json"),
        "bitsearch SignRound → step sizes": os.path.join(
            RESULTS, "chain", args.chain + "{s}", "points", f"signround+{args.steps_chain}.json"
        ),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--ar-tag", default="t200-ar-3.25", help="benchmark tag of AutoRound's seed-0 run")
    ap.add_argument("--budget", default="3.25")
    ap.add_argument("--chain", default="w3g128", help="finalize_chain folder of seed 0")
    ap.add_argument("--steps-chain", default="e2e_100_2e-5_scales")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    seeds = [int(x) for x in a.seeds.split(",")]
    points: dict[str, dict[int, dict]] = {}
    for method, template in sources(a).items():
        for seed in seeds:
            path = template.format(s=suffix(seed))
            if os.path.exists(path):
                points.setdefault(method, {})[seed] = json.load(open(path))
    common = [s for s in seeds if all(s in p for p in points.values())]
    if "AutoRound" not in points or not common:
        raise SystemExit("finalize_seeds: no seed has every method's point")
    lines = ["| method | " + " | ".join(f"seed {s}: ppl / held-out KL" for s in seeds) + " | mean ppl | mean KL |"]
    lines.append("| --- |" + " ---: |" * (len(seeds) + 2))
    summary = {}
    for method, by_seed in points.items():
        cells = [f"{by_seed[s]['ppl']:.2f} / {by_seed[s]['kl']:.5f}" if s in by_seed else "" for s in seeds]
        ppl = np.array([by_seed[s]["ppl"] for s in common])
        kl = np.array([by_seed[s]["kl"] for s in common])
        summary[method] = {"ppl_mean": ppl.mean(), "ppl_sd": ppl.std(ddof=1) if len(common) > 1 else None}
        summary[method].update(kl_mean=kl.mean())
        sd = f" ± {ppl.std(ddof=1):.2f}" if len(common) > 1 else ""
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {ppl.mean():.2f}{sd} | {kl.mean():.5f} |")
    lines += ["", f"Means over seeds {', '.join(map(str, common))} (± the standard deviation over seeds).", ""]
    lines += ["| against AutoRound, seed by seed | perplexity change | 95 % interval | held-out KL change |"]
    lines += ["| --- | ---: | ---: | ---: |"]
    ar = points["AutoRound"]
    for method, by_seed in points.items():
        if method == "AutoRound":
            continue
        d = np.array([100 * (by_seed[s]["ppl"] / ar[s]["ppl"] - 1) for s in common])
        dk = np.array([100 * (by_seed[s]["kl"] / ar[s]["kl"] - 1) for s in common])
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        summary[method].update(ppl_change=d.mean(), ppl_change_half=half, kl_change=dk.mean())
        lines.append(
            f"| {method} | {d.mean():+.2f} % | {d.mean() - half:+.2f} … {d.mean() + half:+.2f} % | {dk.mean():+.1f} % |"
        )
    os.makedirs(a.out, exist_ok=True)
    write_text_atomic(os.path.join(a.out, "seeds.md"), "\n".join(lines) + "\n")
    write_text_atomic(
        os.path.join(a.out, "seeds.json"),
        json.dumps({"args": vars(a), "seeds": common, "summary": summary, "points": points}, indent=1) + "\n",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
