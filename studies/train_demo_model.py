#!/usr/bin/env python
"""Train the tiny Llama-style causal LM that ships with ``bitsearch demo``.

Reproducible, seeded, CPU-only pipeline:

1. read the training text (``.xz`` files are decompressed with :mod:`lzma`);
2. train a byte-level BPE tokenizer with the ``tokenizers`` library and save it
   as a Hugging Face fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``);
3. build a ``transformers.LlamaForCausalLM`` (RoPE, SwiGLU, RMSNorm, tied
   embeddings) and train it with AdamW and a warmup + cosine schedule on random
   windows of the tokenized text; a slice at the end of the token stream is held
   out for validation and the best checkpoint by validation loss is kept;
4. save the model in float16 (``model.safetensors``), the tokenizer and a
   ``training.json`` record (data hash, arguments, timings, losses, perplexities,
   library versions).

Example (the command used for ``bitsearch/assets/demo/model``; see the README there)::

    python -m studies.train_demo_model --out bitsearch/assets/demo/model --threads 2 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import lzma
import math
import os
import platform
import sys
import time
from pathlib import Path

# The CPU is usually shared with other jobs: spinning OpenMP workers then slow training down ~5-10x.
# Passive waiting must be chosen before torch initialises OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
EOS_TOKEN = "<|endoftext|>"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train the small demo Llama model (byte-level BPE tokenizer + LlamaForCausalLM) on CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--train-text",
        default=str(REPO_ROOT.parent / "shared/data/corpus/train.txt.xz"),
        help="training text file (UTF-8; a .xz file is decompressed with lzma)",
    )
    p.add_argument(
        "--eval-text",
        default=str(REPO_ROOT / "bitsearch/assets/demo/eval.txt"),
        help="held-out text for the final perplexity report (never used for training or model selection); "
        "pass an empty string to skip",
    )
    p.add_argument("--out", required=True, help="output directory for model, tokenizer and training.json")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (including the special token)")
    p.add_argument("--hidden", type=int, default=192, help="hidden size (multiple of 64)")
    p.add_argument("--layers", type=int, default=4, help="number of decoder layers")
    p.add_argument("--heads", type=int, default=4, help="number of attention heads (head_dim = hidden / heads)")
    p.add_argument("--inter", type=int, default=512, help="SwiGLU intermediate size (multiple of 64)")
    p.add_argument("--seq-len", type=int, default=256, help="training window length in tokens")
    p.add_argument(
        "--max-positions", type=int, default=512, help="max_position_embeddings written to the config (>= --seq-len)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per optimizer step")
    p.add_argument("--steps", type=int, default=1600, help="number of optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warmup steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (not applied to norms)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="fraction of the token stream (taken from its end) held out for validation",
    )
    p.add_argument("--val-windows", type=int, default=32, help="number of validation windows per evaluation")
    p.add_argument("--eval-every", type=int, default=250, help="validate (and maybe checkpoint) every N steps")
    p.add_argument("--log-every", type=int, default=25, help="print training progress every N steps")
    p.add_argument("--seed", type=int, default=0, help="random seed (torch, window sampling, init)")
    p.add_argument("--threads", type=int, default=2, help="torch / tokenizers thread count")
    p.add_argument(
        "--max-train-chars",
        type=int,
        default=0,
        help="use only the first N characters of the training text (0 = all; for quick timing runs)",
    )
    args = p.parse_args(argv)
    if args.hidden % args.heads:
        p.error("--hidden must be divisible by --heads")
    if args.max_positions < args.seq_len:
        p.error("--max-positions must be >= --seq-len")
    return args


def _relpath(path: str) -> str:
    """Path relative to the repository root (for the training record)."""
    return os.path.relpath(os.path.abspath(path), REPO_ROOT)


def read_text(path: str) -> tuple[str, str]:
    """Return (text, sha256 of the file's decompressed bytes)."""
    if path.endswith(".xz"):
        with lzma.open(path, "rb") as f:
            raw = f.read()
    else:
        with open(path, "rb") as f:
            raw = f.read()
    return raw.decode("utf-8"), hashlib.sha256(raw).hexdigest()


def chunk_text(text: str, chunk_chars: int = 1 << 16) -> list[str]:
    """Split text at line boundaries into chunks of roughly ``chunk_chars`` characters."""
    chunks, start, n = [], 0, len(text)
    while start < n:
        end = text.find("\n", min(start + chunk_chars, n))
        end = n if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def train_tokenizer(chunks: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(chunks, trainer=trainer, length=len(chunks))
    assert tok.token_to_id(EOS_TOKEN) == 0
    return tok


def wrap_tokenizer(tok, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def encode(tok, chunks: list[str]):
    ids = []
    for i in range(0, len(chunks), 64):
        for enc in tok.encode_batch(chunks[i : i + 64], add_special_tokens=False):
            ids.append(np.asarray(enc.ids, dtype=np.int32))
    return torch.from_numpy(np.concatenate(ids).astype(np.int64))


@torch.no_grad()
def window_loss(model, tokens, seq_len: int, starts) -> float:
    """Mean next-token loss (nats) over windows tokens[s : s + seq_len + 1]."""
    total, count = 0.0, 0
    starts = list(starts)
    for i in range(0, len(starts), 16):
        batch = torch.stack([tokens[s : s + seq_len + 1] for s in starts[i : i + 16]])
        logits = model(input_ids=batch[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def text_perplexity(model, tokens, window: int) -> dict:
    """Perplexity over non-overlapping windows of ``window`` tokens (every token after a window's first is scored)."""
    total, count = 0.0, 0
    for s in range(0, len(tokens) - 1, window):
        chunk = tokens[s : s + window]
        if len(chunk) < 2:
            break
        logits = model(input_ids=chunk[None]).logits.float()[0]
        total += torch.nn.functional.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return {"window": window, "tokens_scored": count, "loss": total / count, "ppl": math.exp(total / count)}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import tokenizers
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # ---------------------------------------------------------------- data + tokenizer
    text, text_sha = read_text(args.train_text)
    if args.max_train_chars:
        text = text[: args.max_train_chars]
    chunks = chunk_text(text)
    print(f"[data] {args.train_text}: {len(text):,} chars, sha256 {text_sha[:16]}…, {len(chunks)} chunks", flush=True)
    t0 = time.time()
    tok = train_tokenizer(chunks, args.vocab_size)
    print(f"[tok] trained byte-level BPE, vocab {tok.get_vocab_size()} in {time.time() - t0:.1f}s", flush=True)
    t0 = time.time()
    tokens = encode(tok, chunks)
    n_tokens = len(tokens)
    print(
        f"[tok] encoded {n_tokens:,} tokens ({len(text) / n_tokens:.2f} chars/token) in {time.time() - t0:.1f}s",
        flush=True,
    )
    del text, chunks
    n_val = max(int(n_tokens * args.val_fraction), (args.seq_len + 1) * args.val_windows)
    train_tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]
    g_val = torch.Generator().manual_seed(args.seed + 1)
    val_starts = torch.randint(0, len(val_tokens) - args.seq_len - 1, (args.val_windows,), generator=g_val).tolist()

    # ---------------------------------------------------------------- model
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads,
        hidden_act="silu",
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_cache=True,
    )
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[model] LlamaForCausalLM hidden={args.hidden} layers={args.layers} heads={args.heads} "
        f"inter={args.inter} vocab={config.vocab_size}: {n_params:,} parameters",
        flush=True,
    )

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:  # step in [0, steps)
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        frac = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    g_train = torch.Generator().manual_seed(args.seed)
    hi = len(train_tokens) - args.seq_len - 1
    best = {"val_loss": float("inf"), "step": 0, "state": None}
    history = []
    t_train = time.time()
    t_log, tok_log, loss_acc, loss_n = time.time(), 0, 0.0, 0
    last_train_loss = float("nan")
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, hi, (args.batch_size,), generator=g_train)
        batch = torch.stack([train_tokens[s : s + args.seq_len + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits  # next-token loss over all seq_len targets
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        loss_acc += loss.item()
        loss_n += 1
        tok_log += batch[:, :-1].numel()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            dt = time.time() - t_log
            last_train_loss = loss_acc / loss_n
            print(
                f"[train] step {step + 1:5d}/{args.steps} loss {last_train_loss:.4f} lr {lr_at(step):.2e} "
                f"{tok_log / dt:,.0f} tok/s elapsed {time.time() - t_train:.0f}s",
                flush=True,
            )
            history.append({"step": step + 1, "train_loss": last_train_loss, "tok_per_s": tok_log / dt})
            t_log, tok_log, loss_acc, loss_n = time.time(), 0, 0.0, 0
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            vl = window_loss(model, val_tokens, args.seq_len, val_starts)
            model.train()
            print(f"[val] step {step + 1} val loss {vl:.4f} ppl {math.exp(vl):.2f}", flush=True)
            history.append({"step": step + 1, "val_loss": vl})
            if vl < best["val_loss"]:
                best = {"val_loss": vl, "step": step + 1, "state": copy.deepcopy(model.state_dict())}
    train_wall = time.time() - t_train

    # ---------------------------------------------------------------- save best checkpoint
    model.load_state_dict(best["state"])
    model.eval()
    print(
        f"[save] best checkpoint: step {best['step']} val loss {best['val_loss']:.4f} "
        f"(ppl {math.exp(best['val_loss']):.2f})",
        flush=True,
    )

    eval_report = {}
    if args.eval_text:
        eval_raw = Path(args.eval_text).read_bytes()
        eval_ids = torch.tensor(tok.encode(eval_raw.decode("utf-8"), add_special_tokens=False).ids)
        eval_report = {
            "file": _relpath(args.eval_text),
            "sha256": hashlib.sha256(eval_raw).hexdigest(),
            "tokens": len(eval_ids),
            "fp32": [text_perplexity(model, eval_ids, w) for w in sorted({args.seq_len, 512})],
        }
        for r in eval_report["fp32"]:
            print(f"[eval] {eval_report['file']}: window {r['window']} ppl {r['ppl']:.2f}", flush=True)

    model.config.use_cache = True
    model = model.to(torch.float16)
    model.config.dtype = "float16"
    model.save_pretrained(out, safe_serialization=True)
    hf_tok = wrap_tokenizer(tok, args.max_positions)
    hf_tok.save_pretrained(out)
    # save_pretrained of the tokenizer may write extra files; keep only the two needed ones
    for extra in ("special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja"):
        (out / extra).unlink(missing_ok=True)
    # transformers 5 writes its internal class name; the generic name also loads with transformers 4.x
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    os.chmod(out / "model.safetensors", 0o644)

    record = {
        "description": "Tiny Llama-style causal LM for `bitsearch demo`, trained by studies/train_demo_model.py",
        "command": " ".join(["python -m studies.train_demo_model"] + (argv if argv is not None else sys.argv[1:])),
        "args": {
            k: (_relpath(v) if k in ("train_text", "eval_text", "out") and v else v) for k, v in vars(args).items()
        },
        "data": {
            "train_text": os.path.basename(args.train_text),
            "train_text_sha256": text_sha,
            "tokens": n_tokens,
            "train_tokens": len(train_tokens),
            "val_tokens": len(val_tokens),
            "max_train_chars": args.max_train_chars,
        },
        "parameters": n_params,
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "best_step": best["step"],
        "best_val_loss": best["val_loss"],
        "best_val_ppl": math.exp(best["val_loss"]),
        "final_train_loss": last_train_loss,
        "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "eval_text": eval_report,
        "history": history,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "saved_dtype": "float16",
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    print(f"[save] wrote {out}: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()), flush=True)
    print(f"[done] total wall {record['total_wall_s']:.0f}s (training {train_wall:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
