"""Decoding speed and memory of packed checkpoints against the float model, on the CPU.

For a float model, a plan (e.g. a 2.5-bit one) and a uniform plan (every row at --uniform-bits,
groups of --group-size), this writes both packed checkpoints to a temporary folder and measures,
in one run:

* memory, each model loaded in fresh processes: resident set size added by ``load_model`` once
  every tensor has been read (safetensors may map a file and read it only on use), in a process
  that has only imported the model's code (cold) and in one that has paid its one-time costs
  first (warm, see :func:`memory_probe`), the cold growth split into shared libraries' code pages
  (faulted in by code paths run for the first time) and data (heap, anonymous memory, the mapped
  checkpoint); bytes of the loaded model's tensors (parameters and
  buffers, shared ones once); both against the packed checkpoint's plan bytes plus its untouched
  tensors' bytes;
* batch-1 greedy decoding with a key-value cache: tokens/s over --new-tokens tokens after a
  --prompt-tokens prompt; every model is fed the same tokens (the float model's greedy ones);
* prefill: tokens/s of one forward pass over a --prefill-tokens prompt;
* perplexity evaluation: tokens/s of ``bitsearch.evaluate.perplexity`` (windows of 512, 4 at a time);
* top-1 agreement: how often a model's next-token argmax equals the float model's on those tokens.

The models run in turn, --rounds times, in a rotating order; a ratio is the median over rounds of
the per-round ratio packed / float (the machine's load changes less within a round than across).
Speeds are given per CPU second of the process (what other jobs on a shared machine do not
inflate) and per wall-clock second.

    OMP_NUM_THREADS=1 python -m studies.decode_bench --model ../shared/models/slm-llama-17m \\
        --plan studies/results/search_methods_v4/greedy_2.5.json --threads 1 --rounds 7 \\
        --out studies/results/decode_bench
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bitsearch.atomic import write_text_atomic
from bitsearch.data import read_text, tokenize_text
from bitsearch.evaluate import perplexity
from bitsearch.generate import greedy_decode
from bitsearch.io.checkpoint import QUANT_FILE, REST_FILE, load_packed, parameters_on_meta, save_packed
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.io.plan import BitPlan
from bitsearch.quant.kernel import get_kernel
from bitsearch.search.uniform import uniform_plan


def _rss() -> int:
    """Resident set size, after handing the allocator's free memory back to the system (so that
    a later allocation cannot hide in pages freed earlier)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_by_kind() -> dict:
    """Resident bytes split into shared libraries' pages (their code, faulted in the first time a
    code path runs, shared with every process using the library and independent of the model)
    and everything else (heap, anonymous memory, mapped data files such as the checkpoint)."""
    _rss()
    out = {"libraries": 0, "data": 0}
    kind = "data"
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 6)
            if head and "-" in head[0] and not head[0].endswith(":"):
                name = head[5].strip() if len(head) > 5 else ""
                kind = "libraries" if name.endswith(".so") or ".so." in name else "data"
            elif head and head[0] == "Rss:":
                out[kind] += int(head[1]) * 1024
    return out


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _load_and_read(path: str) -> tuple[dict, object]:
    before = _rss()
    model = load_model(path, dtype=None)
    loaded = _rss()
    for t in list(model.parameters()) + list(model.buffers()):  # memory-mapped tensors count once read
        t.detach().reshape(-1).view(torch.uint8).sum()
    return {"rss_added": _rss() - before, "rss_added_before_reading": loaded - before}, model


def memory_probe(path: str, cold: bool) -> dict:
    """What loading ``path`` adds to the resident set, once every tensor has been read.

    ``cold``: the first load in a process that has only imported the model's code. Otherwise the
    process first pays its one-time costs, which do not grow with the model: a model skeleton
    built (parameters on the meta device) and a safetensors file read."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    get_kernel()
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # imports the model's code
        AutoModelForCausalLM.from_config(config)
    if not cold:
        with parameters_on_meta():
            AutoModelForCausalLM.from_config(config)
        with tempfile.TemporaryDirectory() as tmp:
            save_file({"x": torch.zeros(8)}, os.path.join(tmp, "x.safetensors"))
            load_file(os.path.join(tmp, "x.safetensors"))
    kinds = _rss_by_kind()
    before = _rss()
    model = load_model(path, dtype=None)
    loaded = _rss()
    for t in list(model.parameters()) + list(model.buffers()):  # memory-mapped tensors count once read
        t.detach().reshape(-1).view(torch.uint8).sum()
    added = _rss() - before
    after = _rss_by_kind()
    return {
        "rss_added": added,
        "rss_added_before_reading": loaded - before,
        "rss_added_libraries": after["libraries"] - kinds["libraries"],
        "rss_added_data": after["data"] - kinds["data"],
        "tensor_bytes": tensor_bytes(model),
    }


def probe_in_subprocess(path: str, threads: int, cold: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "studies.decode_bench", "--memory-probe", path] + (["--cold"] if cold else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stored_bytes(path: str) -> tuple[int, int]:
    """(plan bytes, untouched tensors' bytes) of a packed checkpoint: the tensors in its two files."""
    from safetensors.torch import load_file

    return tuple(
        sum(t.numel() * t.element_size() for t in load_file(os.path.join(path, name)).values())
        for name in (QUANT_FILE, REST_FILE)
    )


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="../shared/models/slm-llama-17m")
    ap.add_argument("--plan", default="studies/results/search_methods_v4/greedy_2.5.json")
    ap.add_argument("--uniform-bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="group size of the uniform plan")
    ap.add_argument("--text", default="../shared/data/corpus/wikitext2_test.txt")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="studies/results/decode_bench")
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="measure memory only (no speed rounds); writes memory.json and memory.md into --out",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.cold)))
        return 0

    kernel = get_kernel()
    tok = load_tokenizer(args.model)
    float_model = load_model(args.model)
    plan = BitPlan.load(args.plan)
    uniform = uniform_plan(float_model, args.uniform_bits, args.group_size)
    names = {
        "float": "float32",
        "plan": f"packed {plan.summary['avg_bits']:.2f}-bit plan",
        "uniform": f"packed uniform W{args.uniform_bits} g{args.group_size} ({uniform.summary['avg_bits']:.2f} bits)",
    }
    result = {
        "command": " ".join(["python -m studies.decode_bench"] + sys.argv[1:]),
        "threads": args.threads,
        "kernel": None if kernel is None else ("avx2" if kernel.vector else "scalar"),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "models": names,
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"float": args.model, "plan": os.path.join(tmp, "plan"), "uniform": os.path.join(tmp, "uniform")}
        save_packed(float_model, plan, paths["plan"], tok)
        save_packed(float_model, uniform, paths["uniform"], tok)

        memory = {}
        for key, path in paths.items():
            memory[key] = {when: probe_in_subprocess(path, args.threads, when == "cold") for when in ("cold", "warm")}
            memory[key]["tensor_bytes"] = memory[key]["warm"]["tensor_bytes"]
            if key != "float":
                memory[key]["plan_bytes"], memory[key]["untouched_bytes"] = stored_bytes(path)
                stored = memory[key]["plan_bytes"] + memory[key]["untouched_bytes"]
                memory[key]["tensor_bytes_over_stored"] = memory[key]["tensor_bytes"] / stored
                for when in ("cold", "warm"):
                    for what in ("rss_added", "rss_added_data"):
                        memory[key][when][f"{what}_over_stored"] = memory[key][when][what] / stored
            print(f"memory {key}: {memory[key]}", flush=True)
        result["memory"] = memory
        if args.memory_only:
            os.makedirs(args.out, exist_ok=True)
            write_text_atomic(os.path.join(args.out, "memory.json"), json.dumps(result, indent=1))
            write_text_atomic(os.path.join(args.out, "memory.md"), memory_markdown(result))
            print(memory_markdown(result))
            return 0

        models = {"float": float_model, "plan": load_packed(paths["plan"]), "uniform": load_packed(paths["uniform"])}
        ids = tokenize_text(tok, read_text(args.text))
        prompt = ids[None, : args.prompt_tokens]
        forced = torch.tensor(greedy_decode(float_model, prompt, args.new_tokens).tokens)
        choices = {k: greedy_decode(m, prompt, args.new_tokens, forced=forced).choices for k, m in models.items()}
        result["top1_agreement_with_float"] = {
            k: sum(a == b for a, b in zip(v, choices["float"])) / len(v) for k, v in choices.items()
        }
        prefill_ids = ids[None, 1000 : 1000 + args.prefill_tokens]
        eval_ids = ids[20000 : 20000 + args.eval_tokens]
        kinds = ("decode", "prefill", "eval")
        runs = {k: {f"{w}_{clock}": [] for w in kinds for clock in ("cpu", "wall")} for k in models}
        order = list(models)
        for r in range(args.rounds):
            for key in order[r % len(order) :] + order[: r % len(order)]:
                m, v = models[key], runs[key]
                t = greedy_decode(m, prompt, args.new_tokens, forced=forced)
                v["decode_wall"].append(t.decode_tokens_per_s)
                v["decode_cpu"].append(t.decode_tokens_per_cpu_s)
                with torch.no_grad():
                    wall, cpu = timed(lambda: m(input_ids=prefill_ids))
                v["prefill_wall"].append(prefill_ids.shape[1] / wall)
                v["prefill_cpu"].append(prefill_ids.shape[1] / cpu)
                wall, cpu = timed(lambda: perplexity(m, eval_ids, seq_len=512, micro_batch=4, show_progress=False))
                v["eval_wall"].append(eval_ids.numel() / wall)
                v["eval_cpu"].append(eval_ids.numel() / cpu)
            print(
                f"round {r + 1}/{args.rounds} (tokens per CPU second): "
                + ", ".join(
                    f"{k} decode {v['decode_cpu'][-1]:.1f} prefill {v['prefill_cpu'][-1]:.0f} "
                    f"eval {v['eval_cpu'][-1]:.0f}"
                    for k, v in runs.items()
                ),
                flush=True,
            )
        speed = {}
        for key, v in runs.items():
            speed[key] = {f"{what}_per_s": statistics.median(xs) for what, xs in v.items()}
            speed[key]["runs"] = v
            if key != "float":
                for what in v:
                    speed[key][f"{what}_ratio"] = statistics.median(a / b for a, b in zip(v[what], runs["float"][what]))
        result["speed"] = speed
    os.makedirs(args.out, exist_ok=True)
    write_text_atomic(os.path.join(args.out, "decode_bench.json"), json.dumps(result, indent=1))
    write_text_atomic(os.path.join(args.out, "decode_bench.md"), markdown(result))
    print(markdown(result))
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def markdown(r: dict) -> str:
    lines = [
        f"Command: `{r['command']}`",
        "",
        f"CPU: {r['cpu']}, {r['threads']} thread(s), kernel: {r['kernel']}, torch {r['torch']}",
        "",
    ]
    for clock, title in (("cpu", "tokens per CPU second of the process"), ("wall", "tokens per wall-clock second")):
        lines += [
            f"Speed, {title} (median of {r['args']['rounds']} rounds; x float: median of the rounds' ratios):",
            "",
            "| model | decode | x float | prefill | x float | eval | x float | top-1 = float |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, name in r["models"].items():
            s = r["speed"][key]
            ratio = (lambda w: f"{s[w + '_ratio']:.2f}") if key != "float" else (lambda w: "1")
            cells = " | ".join(
                f"{s[f'{w}_{clock}_per_s']:.1f} | {ratio(f'{w}_{clock}')}" for w in ("decode", "prefill", "eval")
            )
            lines.append(f"| {name} | {cells} | {100 * r['top1_agreement_with_float'][key]:.0f} % |")
        lines.append("")
    return "\n".join(lines) + "\n" + memory_markdown(r, header=False)


def memory_markdown(r: dict, header: bool = True) -> str:
    mb = 1e6
    lines = [f"Command: `{r['command']}`", ""] if header else []
    lines += [
        "Memory:",
        "",
        "| model | tensors MB | plan + untouched MB | tensors / stored "
        "| RSS added, cold MB | / stored | of which libraries' code MB | data MB | / stored "
        "| RSS added, warm MB | / stored |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, name in r["models"].items():
        m = r["memory"][key]
        if key == "float":
            lines.append(
                f"| {name} | {m['tensor_bytes'] / mb:.2f} | - | - | {m['cold']['rss_added'] / mb:.1f} | - "
                f"| {m['cold']['rss_added_libraries'] / mb:.1f} | {m['cold']['rss_added_data'] / mb:.1f} | - "
                f"| {m['warm']['rss_added'] / mb:.1f} | - |"
            )
            continue
        stored = m["plan_bytes"] + m["untouched_bytes"]
        lines.append(
            f"| {name} | {m['tensor_bytes'] / mb:.2f} | {stored / mb:.2f} "
            f"| {m['tensor_bytes_over_stored']:.3f} "
            f"| {m['cold']['rss_added'] / mb:.1f} | {m['cold']['rss_added_over_stored']:.2f} "
            f"| {m['cold']['rss_added_libraries'] / mb:.1f} | {m['cold']['rss_added_data'] / mb:.1f} "
            f"| {m['cold']['rss_added_data_over_stored']:.2f} "
            f"| {m['warm']['rss_added'] / mb:.1f} | {m['warm']['rss_added_over_stored']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
