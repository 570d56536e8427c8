"""Per-layer summary of a saved plan: avg width, pruned channels, width histogram; optional PNG.

    python analysis/plan_report.py plan.json [--csv layers.csv] [--png widths.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bitsearch.cost import layer_bytes  # noqa: E402
from bitsearch.plan import BitPlan  # noqa: E402


def layer_table(plan: BitPlan) -> pd.DataFrame:
    rows = []
    for name, bits in plan.bits.items():
        out_f, in_f = plan.shapes[name]
        hist = {f"w{int(b)}": int(c) for b, c in zip(*np.unique(bits, return_counts=True))}
        rows.append({"layer": name, "channels": out_f, "in_features": in_f,
                     "avg_bits_all_in": 8 * layer_bytes(in_f, bits, plan.group_size) / (out_f * in_f),
                     "mean_width": float(bits.mean()), "pruned": int((bits == 0).sum()), **hist})
    return pd.DataFrame(rows).fillna(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", help="plan JSON")
    ap.add_argument("--csv", default=None, help="write the table as CSV")
    ap.add_argument("--png", default=None, help="bar chart of avg bits per layer")
    args = ap.parse_args()
    plan = BitPlan.load(args.plan)
    df = layer_table(plan)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"total: {plan.summary['avg_bits']:.4f} avg bits, {plan.summary['bytes']} bytes, "
          f"{plan.summary['pruned_channels']} pruned")
    if args.csv:
        df.to_csv(args.csv, index=False)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, len(df) * 0.18), 4), dpi=110)
        ax.bar(range(len(df)), df["avg_bits_all_in"], color="tab:blue")
        ax.set_xticks(range(len(df)), [n.replace("model.layers.", "") for n in df["layer"]], rotation=90, fontsize=6)
        ax.set_ylabel("avg bits (all-in)")
        ax.set_title(os.path.basename(args.plan))
        fig.tight_layout()
        fig.savefig(args.png)
        print(args.png)


if __name__ == "__main__":
    main()
