"""Per-layer summary of a saved plan: avg width, pruned channels, width histogram; optional PNG.

python -m analysis.plan_report plan.json [--csv layers.csv] [--png widths.png]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

from bitsearch.cost import layer_bytes
from bitsearch.io.plan import BitPlan
from bitsearch.plots import plot_layer_bits


def layer_table(plan: BitPlan) -> pd.DataFrame:
    rows = []
    for name, bits in plan.bits.items():
        out_f, in_f = plan.shapes[name]
        hist = {f"w{int(b)}": int(c) for b, c in zip(*np.unique(bits, return_counts=True))}
        rows.append(
            {
                "layer": name,
                "channels": out_f,
                "in_features": in_f,
                "avg_bits_all_in": 8 * layer_bytes(in_f, bits, plan.group_size) / (out_f * in_f),
                "mean_width": float(bits.mean()),
                "pruned": int((bits == 0).sum()),
                **hist,
            }
        )
    return pd.DataFrame(rows).fillna(0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", help="plan JSON")
    ap.add_argument("--csv", default=None, help="write the table as CSV")
    ap.add_argument("--png", default=None, help="bar chart of avg bits per layer")
    args = ap.parse_args(argv)
    plan = BitPlan.load(args.plan)
    df = layer_table(plan)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"total: {plan.summary['avg_bits']:.4f} avg bits, {plan.summary['bytes']} bytes, "
        f"{plan.summary['pruned_channels']} pruned"
    )
    if args.csv:
        df.to_csv(args.csv, index=False)
    if args.png:
        print(
            plot_layer_bits(list(df["layer"]), list(df["avg_bits_all_in"]), args.png, title=os.path.basename(args.plan))
        )


if __name__ == "__main__":
    main()
