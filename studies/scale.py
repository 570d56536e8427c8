"""How the cost of each bitsearch stage grows with model size and calibration tokens.

Every stage (sensitivity per estimator, search per method, finalize per mode, apply, packed
eval) runs through bitsearch's Python API on a random-initialised Llama built from a config
(no download: speed and memory depend on the shape, not on trained weights) and random token
ids as calibration data. Each stage's wall time and peak memory are reported as ratios to ONE
forward+backward pass (loss = mean next-token cross-entropy, all parameters trainable) over the
same calibration tokens in the same micro-batches, measured in the same run after a warm-up,
so the figures carry over to other GPUs. Model-in-the-loop stages also get a per-unit ratio
(per optuna trial, per diffq / QAT / SignRound step, per Hutchinson probe); those stages have a
fixed setup too (cached quantized weights, float log-probabilities, validation of the
finalists), which the per-unit figure includes.

Memory is the peak ABOVE what the process held when the stage started (the model's weights are
already resident; ``base_mem_bytes`` gives that level): on CUDA from
``torch.cuda.max_memory_allocated`` (reset per stage); on CPU from the peak RSS
(``/proc/self/status`` VmHWM, reset per stage through ``/proc/self/clear_refs``; memory the
allocator kept from earlier stages can hide part of a stage's growth, so CPU memory figures are
lower bounds; empty where the kernel does not allow the reset).

Shapes: ``tiny`` (hidden 64, 2 layers, vocab 256), ``small`` (slm-llama-17m: hidden 384, 8
layers, vocab 8192), ``1b`` (Llama-3.2-1B) and ``8b`` (Llama-3.1-8B); ``--layers N`` builds a
shape at reduced depth (recorded in the ``layers`` column). ``--tokens 8x512,32x512`` lists
calibration sizes (samples x sequence length). Calibration text for the stages that read a
file (sensitivity, optuna, diffq, eval) is written under ``--out/tmp``: the random ids as
decimal words, read by an in-memory word-level tokenizer whose vocabulary is the ids, so the
stages see exactly the batch the forward+backward unit is measured on.

GPU (H100), the full measurement:

    python -m studies.scale --device cuda --shapes 1b,8b --tokens 32x512,128x512 --out studies/results/scale

CPU (small shapes, few steps and trials; what ``studies/results/scale_cpu`` holds; on a shared
machine ``--unit-after`` measures the unit again at the end, to show how much the speed drifted):

    OMP_NUM_THREADS=1 python -m studies.scale --threads 1 --shapes small --tokens 8x256,32x256 \\
        --unit-after --unit-repeats 3 --out studies/results/scale_cpu
    S=sens_imatrix_raw,sens_fisher,sens_hutchinson,search_greedy,search_ilp,search_optuna,search_diffq
    S=$S,finalize_qat_e2e,finalize_qat_tiled,finalize_signround,apply,load_packed,eval_float,eval_packed
    OMP_NUM_THREADS=1 python -m studies.scale --threads 1 --shapes 1b --layers 2 --tokens 4x256 --stages $S \\
        --unit-repeats 1 --unit-after --append --out studies/results/scale_cpu

(the calibrated ``sens_imatrix``/``sens_snr`` are left out at 1b there: 28 passes of the
vocabulary-128k model each, about 9 forward+backward passes, 7 minutes on one CPU thread;
``sens_imatrix`` - ``sens_imatrix_raw`` of the small rows is that calibration).

Writes ``scale.csv``, ``scale.json`` and ``scale.png`` (time ratio per stage, one bar group per
shape/tokens, log scale) in ``--out`` after every stage (``--append`` keeps the rows already
there), prints one line per stage and a markdown table at the end. A stage that fails (e.g. out
of memory at 8B) is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shutil
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from bitsearch import api
from bitsearch.config import ApplyConfig, EvalConfig, FinalizeConfig, SearchConfig, SensitivityConfig
from bitsearch.io.checkpoint import packed_tensor_bytes
from bitsearch.plots import plot_stage_costs

SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        tie_word_embeddings=True,
    ),
    "small": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=6,
        head_dim=64,
        vocab_size=8192,
        tie_word_embeddings=True,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}

STAGES = [
    "sens_imatrix",
    "sens_imatrix_raw",
    "sens_snr",
    "sens_fisher",
    "sens_hutchinson",
    "search_greedy",
    "search_ilp",
    "search_optuna",
    "search_diffq",
    "finalize_qat_e2e",
    "finalize_qat_tiled",
    "finalize_signround",
    "finalize_default",
    "apply",
    "load_packed",
    "eval_float",
    "eval_packed",
]

COLUMNS = [
    "shape",
    "layers",
    "params",
    "samples",
    "seq_len",
    "tokens",
    "stage",
    "seconds",
    "ratio_time",
    "units",
    "unit",
    "ratio_time_per_unit",
    "peak_mem_bytes",
    "ratio_mem",
    "base_mem_bytes",
    "fwd_bwd_seconds",
    "fwd_bwd_peak_mem_bytes",
    "device",
    "device_name",
    "dtype",
    "torch",
    "micro_batch",
    "error",
    "detail",
]


# ----------------------------------------------------------------------------- measuring


def _proc_status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        s = f.read()
    return {k: int(m.group(1)) * 1024 for k in ("VmRSS", "VmHWM") if (m := re.search(k + r":\s+(\d+)", s))}


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Meter:
    """Wall time and peak memory above the starting level of one measured span."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_peak_ok = None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        gc.collect()
        self._sync()
        if self.cuda:
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = None
            _malloc_trim()  # free heap pages back to the OS, so that the RSS is what is in use
            try:
                with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                    f.write("5")
                st = _proc_status()
                self.base = st["VmRSS"]
                self.cpu_peak_ok = st["VmHWM"] <= st["VmRSS"] * 1.01 + (1 << 20)
            except OSError:
                self.cpu_peak_ok = False
        self.t0 = time.perf_counter()

    def stop(self) -> tuple[float, int | None, int | None]:
        """(seconds, peak bytes above the start, bytes at the start)."""
        self._sync()
        secs = time.perf_counter() - self.t0
        if self.cuda:
            return secs, int(torch.cuda.max_memory_allocated(self.device) - self.base), int(self.base)
        if not self.cpu_peak_ok or self.base is None:
            return secs, None, self.base
        return secs, max(0, _proc_status()["VmHWM"] - self.base), self.base


def fwd_bwd(model, batch: torch.Tensor, micro_batch: int, meter: Meter, repeats: int = 1) -> tuple[float, int | None]:
    """(seconds, peak bytes) of one forward+backward pass over ``batch`` in micro-batches, every
    parameter trainable, gradients accumulated; after a one-micro-batch warm-up; the fastest of
    ``repeats`` passes (memory: the largest peak)."""
    dev = next(model.parameters()).device
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)

    def one(x):
        x = x.to(dev)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()

    try:
        one(batch[:micro_batch])
        model.zero_grad(set_to_none=True)
        best, peak = math.inf, None
        for _ in range(max(1, repeats)):
            meter.start()
            for i in range(0, batch.shape[0], micro_batch):
                one(batch[i : i + micro_batch])
            secs, mem, _ = meter.stop()
            model.zero_grad(set_to_none=True)
            best = min(best, secs)
            peak = mem if peak is None or (mem is not None and mem > peak) else peak
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return best, peak


# ----------------------------------------------------------------------------- setup


def build_config(shape: str, layers: int | None):
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape], max_position_embeddings=4096)
    if layers:
        kw["num_hidden_layers"] = int(layers)
    return LlamaConfig(**kw)


def build_model(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The same random-initialised LlamaForCausalLM every call (seeded), built on ``device``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(device=device, dtype=dtype).eval()


def id_tokenizer(vocab_size: int):
    """A word-level tokenizer whose words are the decimal token ids 0 .. vocab_size-1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({str(i): i for i in range(vocab_size)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="0", eos_token="0", bos_token="0")


def write_calib(path: str, vocab_size: int, samples: int, seq_len: int, seed: int = 0) -> None:
    """(samples + 1) x seq_len random ids as text: bitsearch's calibration windows (seed 0) are then
    exactly the first samples x seq_len ids, in a permuted order."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, ((samples + 1) * seq_len,), generator=g)
    with open(path, "w") as f:
        f.write(" ".join(map(str, ids.tolist())) + "\n")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
        name = m.group(1).strip() if m else platform.processor()
    except OSError:
        name = platform.processor()
    return f"{name}, threads={torch.get_num_threads()}"


def _error_text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


# ----------------------------------------------------------------------------- stages


class Run:
    """One shape x tokens configuration: the model, the calibration files and batch, the stages."""

    def __init__(self, args, shape: str, samples: int, seq_len: int, meter: Meter, emit):
        self.a, self.shape, self.samples, self.seq_len = args, shape, samples, seq_len
        self.meter, self.emit = meter, emit
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.cfg = build_config(shape, args.layers)
        self.tmp = os.path.join(args.out, "tmp", f"{shape}_L{self.cfg.num_hidden_layers}_{samples}x{seq_len}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.tok = id_tokenizer(self.cfg.vocab_size)
        self.calib = os.path.join(self.tmp, "calib.txt")
        write_calib(self.calib, self.cfg.vocab_size, samples, seq_len)
        from bitsearch.data import calibration_batches

        self.batch, _ = calibration_batches(self.tok, self.calib, samples, seq_len, 0)
        self.name = f"random-{shape}"
        self.model = None
        self.table_path = self.plan = self.packed_dir = self.packed = None
        self.kl_samples = max(1, min(args.kl_samples, samples // 2)) if samples >= 2 else 1

    # the model: rebuilt (same seed) for stages that change it, and after a failed stage
    def fresh(self):
        self.drop()
        self.model = build_model(self.cfg, self.device, self.dtype)
        return self.model

    def get(self):
        return self.model if self.model is not None else self.fresh()

    def drop(self):
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ prerequisites (untimed)
    def need_table(self) -> str:
        """The imatrix table of the sens_imatrix stage, else an uncalibrated one (the search stages'
        cost does not depend on the curves' scale, and the layer-loss calibration is slow)."""
        if self.table_path is None:
            path = os.path.join(self.tmp, "table_imatrix_raw.parquet")
            if not os.path.isfile(path):
                config = SensitivityConfig(
                    samples=self.samples,
                    seq_len=self.seq_len,
                    estimators="imatrix",
                    bits=self.a.bits,
                    loss_calibration="none",
                    group_size=self.a.group_size,
                    micro_batch=self.a.micro_batch,
                    show_progress=False,
                )
                api.sensitivity(self.get(), self.calib, config, tokenizer=self.tok, out=path)
            self.table_path = path
        return self.table_path

    def need_plan(self):
        if self.plan is None:
            config = SearchConfig(
                budget=self.a.budget, method="greedy", group_size=self.a.group_size, show_progress=False
            )
            self.plan = api.search(self.get(), None, config, tokenizer=self.tok, table=self.need_table())
        return self.plan

    def need_packed(self) -> str:
        if self.packed_dir is None:
            out = os.path.join(self.tmp, "packed_setup")
            api.apply(self.get(), self.need_plan(), ApplyConfig(device=self.a.device), out=out)
            self.drop()  # the model now holds packed layers
            self.packed_dir = out
        return self.packed_dir

    # ------------------------------------------------------------------ stages
    def sens(self, est: str):
        """``imatrix_raw``: imatrix without the layer-loss calibration (``--calibrate none``)."""
        raw = est.endswith("_raw")
        est = est[:-4] if raw else est
        path = os.path.join(self.tmp, f"table_{est}{'_raw' if raw else ''}.parquet")
        m = self.get()
        self.meter.start()
        config = SensitivityConfig(
            samples=self.samples,
            seq_len=self.seq_len,
            estimators=est,
            bits=self.a.bits,
            group_size=self.a.group_size,
            probes=self.a.probes,
            loss_calibration="none" if raw else "auto",
            micro_batch=self.a.micro_batch,
            show_progress=False,
            device=self.a.device,
        )
        t = api.sensitivity(m, self.calib, config, tokenizer=self.tok, out=path, overwrite=True)
        res = self.meter.stop()
        if est == "imatrix" and not raw:
            self.table_path = path
        info = t.meta["estimator_info"][est]
        detail = {"estimator_seconds": info.get("seconds"), "calibration": info.get("calibration")}
        units = (self.a.probes, "probe") if est == "hutchinson" else (None, None)
        return res, units, detail

    def search(self, method: str):
        table = self.need_table()
        m = self.get()
        out = os.path.join(self.tmp, f"plan_{method}.json")
        for f in (out, os.path.splitext(out)[0] + ".optuna.journal", os.path.splitext(out)[0] + ".trials.csv"):
            if os.path.exists(f):
                os.remove(f)
        kw = dict(
            budget=self.a.budget,
            method=method,
            group_size=self.a.group_size,
            micro_batch=self.a.micro_batch,
            seq_len=self.seq_len,
            show_progress=False,
            device=self.a.device,
        )
        calib = None
        units = (None, None)
        if method == "ilp":
            kw.update(granularity="layer")
        elif method == "optuna":
            calib = self.calib
            kw.update(n_trials=self.a.trials, kl_samples=self.kl_samples)
            units = (self.a.trials, "trial")
        elif method == "diffq":
            calib = self.calib
            kw.update(steps=self.a.diffq_steps, kl_samples=self.kl_samples)
            units = (self.a.diffq_steps, "step")
        config = SearchConfig(**kw)
        self.meter.start()
        plan = api.search(m, calib, config, tokenizer=self.tok, table=table, out=out)
        res = self.meter.stop()
        if method == "greedy":
            self.plan = plan
        detail = {"avg_bits": plan.summary.get("avg_bits")}
        if method in ("optuna", "diffq"):
            detail["kl_samples"] = self.kl_samples
        return res, units, detail

    def finalize(self, method: str, mode: str | None):
        plan = self.need_plan()
        m = self.fresh()
        out = os.path.join(self.tmp, f"final_{method}_{mode}")
        shutil.rmtree(out, ignore_errors=True)
        kw = dict(
            method=method,
            batch_size=self.a.micro_batch,
            samples=self.batch.shape[0],
            seq_len=self.batch.shape[1],
            checkpoint_every=1e12,
            show_progress=False,
            device=self.a.device,
        )
        if method == "qat" and mode is None:  # the default recipe: SignRound, then the step sizes e2e
            kw.update(steps=self.a.qat_steps, signround_steps=self.a.signround_steps)
        elif method == "qat":
            kw.update(mode=mode, steps=self.a.qat_steps, init="rtn", trainable="all")
        else:
            kw.update(signround_steps=self.a.signround_steps)
        try:
            self.meter.start()
            api.finalize(m, plan, self.batch, FinalizeConfig(**kw), tokenizer=self.tok, out=out)
            res = self.meter.stop()
            info = m.bitsearch_plan.provenance["finalize"]
        finally:
            self.drop()  # the model now holds quantized layers
            shutil.rmtree(out, ignore_errors=True)
        if method == "qat":
            units = (info["qat"]["steps_run"], "step")
        else:
            units = (self.a.signround_steps * self.cfg.num_hidden_layers, "step")
        return res, units, {"steps_setting": self.a.qat_steps if method == "qat" else self.a.signround_steps}

    def apply(self):
        plan = self.need_plan()
        m = self.get()
        out = os.path.join(self.tmp, "packed")
        shutil.rmtree(out, ignore_errors=True)
        self.meter.start()
        try:
            api.apply(m, plan, ApplyConfig(device=self.a.device), out=out)
            res = self.meter.stop()
        finally:
            self.drop()  # the model now holds packed layers
        self.packed_dir = out
        return res, (None, None), {"written_bytes": packed_tensor_bytes(out), "avg_bits": plan.summary.get("avg_bits")}

    def load_packed(self):
        from bitsearch.io.loading import load_model

        path = self.need_packed()
        self.packed = None
        gc.collect()
        self.meter.start()
        self.packed = load_model(path, self.a.device, self.a.dtype)
        res = self.meter.stop()
        return res, (None, None), {}

    def eval(self, packed: bool):
        if packed:
            if self.packed is None:
                from bitsearch.io.loading import load_model

                self.packed = load_model(self.need_packed(), self.a.device, self.a.dtype)
            m = self.packed
        else:
            m = self.get()
        self.meter.start()
        config = EvalConfig(
            max_tokens=self.samples * self.seq_len,
            seq_len=self.seq_len,
            micro_batch=self.a.micro_batch,
            show_progress=False,
            device=self.a.device,
        )
        r = api.evaluate(m, self.calib, config, tokenizer=self.tok)
        res = self.meter.stop()
        if packed:
            self.packed = None
        return res, (None, None), {"ppl": r.ppl, "eval_tokens": r.tokens}

    def dispatch(self, stage: str):
        if stage.startswith("sens_"):
            return self.sens(stage[5:])
        if stage.startswith("search_"):
            return self.search(stage[7:])
        if stage == "finalize_qat_e2e":
            return self.finalize("qat", "e2e")
        if stage == "finalize_qat_tiled":
            return self.finalize("qat", "tiled")
        if stage == "finalize_default":
            return self.finalize("qat", None)
        if stage == "finalize_signround":
            return self.finalize("signround", None)
        if stage == "apply":
            return self.apply()
        if stage == "load_packed":
            return self.load_packed()
        if stage == "eval_float":
            return self.eval(False)
        if stage == "eval_packed":
            return self.eval(True)
        raise ValueError(stage)

    # ------------------------------------------------------------------ driver
    def run(self, stages: list[str]) -> None:
        base = {
            "shape": self.shape,
            "layers": self.cfg.num_hidden_layers,
            "samples": self.samples,
            "seq_len": self.seq_len,
            "tokens": self.samples * self.seq_len,
            "device": self.a.device,
            "device_name": device_name(self.device),
            "dtype": self.a.dtype,
            "torch": torch.__version__,
            "micro_batch": self.a.micro_batch,
        }
        tag = f"[{self.shape} L={self.cfg.num_hidden_layers} {self.samples}x{self.seq_len}]"
        try:
            m = self.get()
            base["params"] = sum(p.numel() for p in m.parameters())
            fb_s, fb_m = fwd_bwd(m, self.batch, self.a.micro_batch, self.meter, self.a.unit_repeats)
        except Exception as exc:  # noqa: BLE001  (no unit: every stage of this configuration is skipped)
            self.drop()
            row = dict(base, stage="fwd_bwd", error=_error_text(exc))
            print(f"{tag} fwd+bwd FAILED: {row['error']}", flush=True)
            self.emit(row)
            return
        base.update(fwd_bwd_seconds=fb_s, fwd_bwd_peak_mem_bytes=fb_m)
        print(
            f"{tag} params {base['params'] / 1e6:.1f}M, fwd+bwd {fb_s:.3f} s"
            + (f", peak +{fb_m / 2**20:.0f} MiB" if fb_m is not None else ""),
            flush=True,
        )
        self.emit(
            dict(
                base,
                stage="fwd_bwd",
                seconds=fb_s,
                ratio_time=1.0,
                peak_mem_bytes=fb_m,
                ratio_mem=1.0 if fb_m else None,
            )
        )
        for stage in stages:
            row = dict(base, stage=stage)
            # on file while it runs: a stage the kernel kills (out of memory) leaves this row behind
            at = self.emit(dict(row, error="did not finish: the process was killed during this stage (out of memory?)"))
            try:
                (secs, mem, mem0), (units, unit), detail = self.dispatch(stage)
                row.update(
                    seconds=secs,
                    ratio_time=secs / fb_s,
                    peak_mem_bytes=mem,
                    base_mem_bytes=mem0,
                    ratio_mem=(mem / fb_m) if (mem is not None and fb_m) else None,
                    units=units,
                    unit=unit,
                    ratio_time_per_unit=(secs / units / fb_s) if units else None,
                    detail=json.dumps(detail, default=str),
                )
                msg = (
                    f"{secs:8.2f} s = {row['ratio_time']:8.2f}x fwd+bwd"
                    + (f" ({row['ratio_time_per_unit']:.3f}x per {unit})" if units else "")
                    + (
                        f", peak +{mem / 2**20:.0f} MiB = {row['ratio_mem']:.2f}x"
                        if row["ratio_mem"] is not None
                        else ""
                    )
                )
            except Exception as exc:  # noqa: BLE001  (out of memory at 8B and such: recorded, go on)
                try:
                    self.meter.stop()
                except Exception:  # noqa: BLE001
                    pass
                row["error"] = _error_text(exc)
                if self.a.verbose:
                    traceback.print_exc()
                msg = f"FAILED: {row['error']}"
                self.drop()
                self.packed = None
            print(f"{tag} {stage:<20} {msg}", flush=True)
            self.emit(row, at)
        self.drop()
        self.packed = None
        if self.a.unit_after:  # the unit again: how much the machine's speed drifted during the stages
            row = dict(base, stage="fwd_bwd_after")
            try:
                s2, m2 = fwd_bwd(self.get(), self.batch, self.a.micro_batch, self.meter, self.a.unit_repeats)
                row.update(
                    seconds=s2,
                    ratio_time=s2 / fb_s,
                    peak_mem_bytes=m2,
                    ratio_mem=(m2 / fb_m) if (m2 is not None and fb_m) else None,
                )
                print(f"{tag} {'fwd_bwd_after':<20} {s2:8.2f} s = {s2 / fb_s:8.2f}x the first measurement", flush=True)
            except Exception as exc:  # noqa: BLE001
                row["error"] = _error_text(exc)
            self.emit(row)
            self.drop()
        if not self.a.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- output


def _group(r: dict) -> str:
    return f"{r['shape']} L{int(r['layers'])} {int(r['samples'])}x{int(r['seq_len'])}"


def _fmt_ratio(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.3g}"


def markdown(rows: list[dict]) -> str:
    """Stages x configurations: time ratio / memory ratio (per-unit time ratio where it applies)."""
    groups = list(dict.fromkeys(_group(r) for r in rows))
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    cell = {(r["stage"], _group(r)): r for r in rows}
    lines = ["| stage | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for s in stages:
        cells = []
        for g in groups:
            r = cell.get((s, g))
            if r is None:
                cells.append("")
            elif r.get("error"):
                cells.append("failed: " + str(r["error"]).split(":")[0])
            elif s == "fwd_bwd":
                mem = r.get("peak_mem_bytes")
                cells.append(f"{r['seconds']:.3g} s" + (f", +{mem / 2**20:.0f} MiB" if _ok(mem) else ""))
            else:
                c = f"{_fmt_ratio(r.get('ratio_time'))}× / {_fmt_ratio(r.get('ratio_mem'))}×"
                if _ok(r.get("ratio_time_per_unit")):
                    c += f" ({_fmt_ratio(r['ratio_time_per_unit'])}×/{r['unit']})"
                cells.append(c)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and not math.isfinite(v))


def plot(rows: list[dict], path: str) -> None:
    good = [r for r in rows if not r.get("error") and not r["stage"].startswith("fwd_bwd") and _ok(r.get("ratio_time"))]
    if not good:
        return
    r0 = good[0]
    plot_stage_costs(
        {(r["stage"], _group(r)): r["ratio_time"] for r in good},
        path,
        title=f"bitsearch stage cost ({r0['device_name'][:40]}, {r0['dtype']})",
    )


def save(rows: list[dict], out: str, args) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    df = df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]
    df.to_csv(os.path.join(out, "scale.csv"), index=False)
    with open(os.path.join(out, "scale.json"), "w") as f:
        json.dump(
            {"args": vars(args), "command": " ".join(sys.argv), "rows": df.to_dict(orient="records")},
            f,
            indent=1,
            default=str,
        )
    try:
        plot(rows, os.path.join(out, "scale.png"))
    except Exception as exc:  # noqa: BLE001  (a plot never costs the measurements)
        print(f"plot failed: {_error_text(exc)}", flush=True)


def _load_rows(out: str) -> list[dict]:
    path = os.path.join(out, "scale.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = json.load(f)["rows"]
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def parse_tokens(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if not m:
            raise SystemExit(f"--tokens '{item}' must look like SAMPLESxSEQ_LEN, e.g. 32x512")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--shapes", default="tiny,small", help=f"comma-separated from {', '.join(SHAPES)}")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--tokens", default="8x256,32x256", help="SAMPLESxSEQ_LEN, comma-separated")
    ap.add_argument("--stages", default="all", help=f"comma-separated from: {', '.join(STAGES)}")
    ap.add_argument("--micro-batch", type=int, default=8, help="micro-batch of every stage and of the unit")
    ap.add_argument("--budget", default="2.5", help="search budget (avg bits)")
    ap.add_argument("--bits", default="0,2,3,4,5,6,8", help="bit menu of the sensitivity tables")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--probes", type=int, default=2, help="hutchinson probes")
    ap.add_argument("--trials", type=int, default=4, help="optuna trials")
    ap.add_argument("--diffq-steps", type=int, default=4)
    ap.add_argument(
        "--kl-samples", type=int, default=8, help="optuna/diffq KL samples (capped at half the calibration samples)"
    )
    ap.add_argument("--qat-steps", type=int, default=4, help="QAT steps (tiled: per tile)")
    ap.add_argument("--signround-steps", type=int, default=4, help="SignRound steps per block")
    ap.add_argument("--unit-repeats", type=int, default=2, help="forward+backward passes timed (fastest kept)")
    ap.add_argument(
        "--unit-after",
        action="store_true",
        help="measure the unit again after the stages (row fwd_bwd_after: drift of a shared machine)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out/scale.json")
    ap.add_argument("--keep-tmp", action="store_true", help="keep --out/tmp (tables, plans, checkpoints)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failed stages")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.stages = STAGES if args.stages == "all" else [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGES)}")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"unknown shape(s) {', '.join(bad)}; choose from {', '.join(SHAPES)}")
    args.shape_list = shapes
    args.token_list = parse_tokens(args.tokens)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    rows = _load_rows(args.out) if args.append else []
    device = torch.device(args.device)
    meter = Meter(device)

    def emit(row, at: int | None = None) -> int:
        """Append ``row`` (or replace row ``at``) and rewrite the outputs; returns its index."""
        if at is None:
            rows.append(row)
            at = len(rows) - 1
        else:
            rows[at] = row
        save(rows, args.out, args)
        return at

    for shape in args.shape_list:
        for samples, seq_len in args.token_list:
            Run(args, shape, samples, seq_len, meter, emit).run(args.stages)
    if not args.keep_tmp:
        shutil.rmtree(os.path.join(args.out, "tmp"), ignore_errors=True)
    print()
    print(
        "time / memory as multiples of one forward+backward pass over the same tokens"
        + ("" if device.type == "cuda" else " (memory: peak RSS growth on CPU, a lower bound)")
    )
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
