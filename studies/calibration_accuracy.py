"""How well one-pass predictions of each layer's loss response match the exact measurement.

The layer-loss calibration measures dL_l, the calibration-loss increase when target l alone is
round-to-nearest quantized at 2 bits (groups of 128), by running the later blocks once per
target (``calibrate.layer_loss_response``) on the first 16 calibration samples. This study
takes those exact responses from a table made with ``--calibrate layer-loss`` (``--exact-table``,
its ``layer_response`` metric), or measures them (``--measure-exact``, slow), and predicts them
from one forward+backward (``grad_response.py``) with:

* ``ef``: first + second order, empirical Fisher of per-sample gradients (data labels);
* ``ef-quad``: the second-order term alone;
* ``gn``: the Gauss-Newton quadratic from sampled labels (second order only), plus ``gn+lin``
  with the first-order term of the data labels added;

each on the same 16 samples and on all N samples. Per predictor: Pearson correlation of
log dL, Spearman rank correlation, the median ratio predicted / exact and the geometric
standard deviation of that ratio (the calibration's allocation is unchanged by one global
factor, so the spread of the ratio across layers is what matters).

    OMP_NUM_THREADS=1 nice -n 10 python -m studies.calibration_accuracy --threads 1 \\
        --exact-table studies/results/slm_budget_table/sensitivity.parquet \\
        --out studies/results/calibration_accuracy

``--compare-tables T1 T2 ...`` compares the responses saved in calibrated tables (their
``layer_response`` and ``prune_response`` metrics) with those of ``--exact-table`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

from bitsearch.data import calibration_batches
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.models import find_targets
from bitsearch.quant.grid import fake_quantize
from bitsearch.sensitivity.calibrate import layer_loss_response
from bitsearch.sensitivity.grad_response import Probe, predicted_increase, probe_sums
from bitsearch.sensitivity.table import SensitivityTable

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")


def agreement(pred: np.ndarray, exact: np.ndarray) -> dict:
    ok = (pred > 0) & (exact > 0)
    lp, le = np.log(pred[ok]), np.log(exact[ok])
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    ratio = lp - le
    return {
        "layers": int(ok.sum()),
        "non_positive": int((~ok).sum()),
        "pearson_log": float(np.corrcoef(lp, le)[0, 1]),
        "spearman": float(np.corrcoef(rank(pred[ok]), rank(exact[ok]))[0, 1]),
        "median_ratio": float(np.exp(np.median(ratio))),
        "geo_std_ratio": float(np.exp(ratio.std())),
    }


def responses(path: str) -> tuple[dict, pd.Series, pd.Series | None]:
    """(meta, 2-bit response per layer, pruning response per layer or None) of a calibrated table."""
    table = SensitivityTable.load(path)
    info = table.meta["estimator_info"]
    est = next(e for e in table.estimators if info[e]["calibration"] in ("gradient", "layer-loss"))
    first = table.df.groupby("layer", sort=False).first()
    prune = first[f"{est}.prune_response"] if f"{est}.prune_response" in first else None
    return table.meta, first[f"{est}.layer_response"], prune


def compare_tables(exact_path: str, paths: list[str], out: str) -> None:
    """Agreement of each table's calibration responses with those of the layer-loss table."""
    meta, exact, exact_prune = responses(exact_path)
    rows = {}
    for path in paths:
        m, r, pr = responses(path)
        row = {
            "table": path,
            "calibration": m["estimator_info"],
            "calib_loss_samples": m["calib_loss_samples"],
            "2-bit": agreement(r[exact.index].to_numpy(), exact.to_numpy()),
        }
        if pr is not None and exact_prune is not None:
            row["pruning"] = agreement(pr[exact_prune.index].to_numpy(), exact_prune.to_numpy())
        rows[path] = row
    lines = [
        "| table | response | layers | pearson log | spearman | median pred/exact | geo std of ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path, row in rows.items():
        for what in ("2-bit", "pruning"):
            if what in row:
                a = row[what]
                lines.append(
                    f"| {os.path.basename(path)} | {what} | {a['layers']} | {a['pearson_log']:.3f} | "
                    f"{a['spearman']:.3f} | {a['median_ratio']:.3g} | {a['geo_std_ratio']:.3f} |"
                )
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out, "tables.json"), "w") as f:
        json.dump({"exact_table": exact_path, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(table + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"))
    ap.add_argument("--calib", default=os.path.join(SHARED, "data", "corpus", "heldout.txt"))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--subset", type=int, default=16, help="samples of the exact measurement")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--exact-table", default=None, help="a layer-loss table of the same model and calibration")
    ap.add_argument("--measure-exact", action="store_true", help="measure the exact responses here instead")
    ap.add_argument(
        "--compare-tables",
        nargs="*",
        default=None,
        help="only compare these calibrated tables' responses with --exact-table's (no model pass)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.compare_tables:
        compare_tables(args.exact_table, args.compare_tables, args.out)
        return
    model = load_model(args.model)
    tok = load_tokenizer(args.model)
    batch, _ = calibration_batches(tok, args.calib, args.samples, args.seq_len, 0)
    targets = find_targets(model)
    names = [t.name for t in targets]
    modules = dict(model.named_modules())
    probes = {
        n: [
            Probe(
                fake_quantize(modules[n].weight.detach().float(), args.bits, args.group_size)
                - modules[n].weight.detach().float()
            )
        ]
        for n in names
    }
    T = args.seq_len - 1
    k = args.subset
    cols, secs = {}, {}
    if args.measure_exact:
        t0 = time.time()
        r = layer_loss_response(model, targets, batch[:k], args.bits, args.group_size, show_progress=False)
        secs["exact"] = time.time() - t0
        cols["exact"] = np.array([r[n] for n in names])
    else:
        table = SensitivityTable.load(args.exact_table)
        if (
            table.meta["calibration"] != "layer-loss"
            or table.meta["calib_loss_samples"] != k
            or table.meta["calib_ref_bits"] != args.bits
            or table.group_size != args.group_size
        ):
            sys.exit(
                "calibration_accuracy: --exact-table must be a layer-loss table at the same width, group size "
                "and --subset samples"
            )
        first = table.df.groupby("layer", sort=False)[f"{table.estimators[0]}.layer_response"].first()
        cols["exact"] = np.array([first[n] for n in names])
    subsets = {f"{k}": batch[:k], f"{args.samples}": batch}  # one entry when --samples is --subset
    for tag, sub in subsets.items():
        t0 = time.time()
        u = probe_sums(model, targets, sub, probes, show_progress=False)
        secs[f"data-{tag}"] = time.time() - t0
        t0 = time.time()
        us = probe_sums(model, targets, sub, probes, labels="sampled", show_progress=False)
        secs[f"sampled-{tag}"] = time.time() - t0
        ef = np.array([predicted_increase(u[n], T)[0] for n in names])
        quad = np.array([predicted_increase(u[n], T, first_order=False)[0] for n in names])
        gn = np.array([predicted_increase(us[n], T, first_order=False)[0] for n in names])
        lin = ef - quad
        cols.update({f"ef@{tag}": ef, f"ef-quad@{tag}": quad, f"gn@{tag}": gn, f"gn+lin@{tag}": gn + lin})
        print(
            f"passes on {tag} samples: data {secs[f'data-{tag}']:.1f} s, sampled {secs[f'sampled-{tag}']:.1f} s",
            flush=True,
        )
    rows = {tag: agreement(v, cols["exact"]) for tag, v in cols.items() if tag != "exact"}
    lines = [
        "| predictor | layers | pearson log | spearman | median pred/exact | geo std of ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tag, r in rows.items():
        lines.append(
            f"| {tag} | {r['layers']} | {r['pearson_log']:.3f} | {r['spearman']:.3f} | "
            f"{r['median_ratio']:.3g} | {r['geo_std_ratio']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {
                "args": vars(args),
                "seconds": secs,
                "agreement": rows,
                "per_layer": {n: {tag: float(v[i]) for tag, v in cols.items()} for i, n in enumerate(names)},
            },
            f,
            indent=1,
        )
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
