"""Plot perplexity against avg bits from a saved results.csv (demo or studies/slm_budget_table.py).

python -m analysis.plot_results demo_out/results.csv --out ppl_vs_bits.png [--float-ppl 223.7]
"""

from __future__ import annotations

import argparse

import pandas as pd

from bitsearch.plots import plot_ppl_vs_bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="results.csv with columns method, avg_bits, ppl")
    ap.add_argument("--out", required=True, help="output PNG")
    ap.add_argument("--float-ppl", type=float, default=None, help="draw the float model's perplexity")
    ap.add_argument("--title", default="", help="plot title")
    args = ap.parse_args()
    df = pd.read_csv(args.results)
    if "label" in df.columns:
        df = df.assign(method=df["label"].where(df["method"] == "greedy", "uniform"))
    print(plot_ppl_vs_bits(df, args.out, title=args.title, float_ppl=args.float_ppl))


if __name__ == "__main__":
    main()
