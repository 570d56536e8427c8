"""studies/benchmark.py's verdict: which peers beat bitsearch at equal or larger stored size, by
perplexity (tiled QAT) and by held-out KL (bitsearch's best finalizer), each peer once."""

from studies import benchmark


def row(method, budget, bits, ppl, kl):
    family = "bitsearch" if method.startswith("bitsearch") else "peer"
    return {
        "method": method,
        "label": benchmark.LABELS[method],
        "budget": budget,
        "family": family,
        "avg_bits": bits,
        "ppl": ppl,
        "kl": kl,
    }


def test_verdict_lists_each_better_peer_once_at_its_smallest_size():
    rows = [
        row("bitsearch-qat", 2.5, 2.5, 226.0, 0.07),
        row("bitsearch-signround", 2.5, 2.5, 227.0, 0.05),
        row("gptq", 2.5, 2.38, 200.0, 0.01),  # smaller: never counts
        row("gptq", 3.25, 3.19, 225.0, 0.03),
        row("gptq", 4.25, 4.19, 224.0, 0.006),
        row("hqq", 3.25, 3.25, 236.0, 0.06),  # larger but worse in both
        row("autoround", 3.0, 2.56, 233.0, 0.04),
    ]  # worse ppl, better KL
    rows.append({"method": "hqq", "label": "HQQ", "budget": 4.25, "family": "peer", "skipped": "not installed"})
    lines = benchmark.verdict(rows, {"ppl": 220.0})
    assert lines[0] == ("2.5 bits: bitsearch 226.00 (+2.7 % vs float): beaten by GPTQ at 3.19 bits (225.00)")
    assert lines[1] == (
        "2.5 bits, by KL: bitsearch plan + SignRound 0.0500: higher than AutoRound at 2.56 bits "
        "(0.0400), GPTQ at 3.19 bits (0.0300)"
    )
    alone = [r for r in rows if r["method"] in ("bitsearch-qat", "bitsearch-signround", "hqq")]
    assert benchmark.verdict(alone, {"ppl": 220.0}) == [
        "2.5 bits: bitsearch 226.00 (+2.7 % vs float): beats every peer measured at equal or larger size",
        "2.5 bits, by KL: bitsearch plan + SignRound 0.0500: lower than every peer measured at equal or larger size",
    ]


def test_verdict_by_evaluation_text_kl_compares_only_points_that_have_it():
    rows = [
        dict(row("bitsearch-qat", 2.5, 2.5, 226.0, 0.07), eval_kl=0.11),
        dict(row("bitsearch-signround", 2.5, 2.5, 227.0, 0.05), eval_kl=0.09),
        dict(row("autoround", 3.25, 3.15, 222.0, 0.02), eval_kl=0.05),
        dict(row("gptq", 3.25, 3.19, 225.0, 0.03), eval_kl=0.095),  # larger, worse on the evaluation text
        row("hqq", 4.25, 4.25, 225.0, 0.01),
    ]  # no evaluation-text KL: not compared
    lines = benchmark.verdict(rows, {"ppl": 220.0})
    assert lines[-1] == (
        "2.5 bits, by evaluation-text KL: bitsearch plan + SignRound 0.0900: higher than "
        "AutoRound at 3.15 bits (0.0500)"
    )
    no_eval = [{k: v for k, v in r.items() if k != "eval_kl"} for r in rows]
    assert not any("evaluation-text" in line for line in benchmark.verdict(no_eval, {"ppl": 220.0}))
