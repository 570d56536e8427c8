"""Run a causal LM block by block.

:class:`BlockRunner` captures the inputs of the first decoder block (hidden states plus the
keyword arguments the model passes every block: position embeddings, masks), then runs one
block at a time over cached hidden states. The final norm and head run through the model's own
forward with the blocks replaced by a stand-in that returns given hidden states, so no
per-architecture code is needed (Llama, Qwen2, Mistral, GPT-NeoX and OPT are tested).

With ``offload`` the decoder blocks live on the CPU and each is moved to the device only while
it runs, so a model whose blocks do not fit the device together can still be scored by the
estimators that need only layer inputs (``imatrix``, ``snr``) and calibrated per layer.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .models import decoder_blocks

__all__ = ["BlockRunner", "offload_blocks", "block_of", "names_by_block"]

#: logits formed at once by :meth:`BlockRunner.nll_sum` (tokens x vocabulary)
_HEAD_CHUNK_ELEMENTS = 1 << 21


class _Captured(Exception):
    pass


class _Inject(nn.Module):
    """Stands in for the decoder blocks: returns the given hidden states, shaped like a block's
    output. Unknown attributes (e.g. ``attention_type``) come from ``template``."""

    def __init__(self, hidden: torch.Tensor, template: nn.Module, as_tuple: bool):
        super().__init__()
        self.hidden = hidden
        object.__setattr__(self, "_template", template)
        self.as_tuple = as_tuple

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_template"), name)

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def offload_blocks(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Everything but the decoder blocks onto ``device``; the blocks stay on the CPU."""
    _, blocks = decoder_blocks(model)
    block_ids = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in block_ids:
                p.data = p.data.to(device)
        for name, b in list(mod.named_buffers(recurse=False)):
            if id(b) not in block_ids:
                mod._buffers[name] = b.to(device)
    blocks.to("cpu")
    return model


class BlockRunner:
    """Block-by-block execution of ``model`` on the device of its embeddings."""

    def __init__(self, model: nn.Module, offload: bool = False):
        self.model = model
        self.prefix, self.blocks = decoder_blocks(model)
        self.offload = offload
        emb = model.get_input_embeddings()
        self.device = next(iter(list(emb.parameters()) + list(emb.buffers()))).device
        self._as_tuple: bool | None = None
        self._head_ok: bool | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @contextmanager
    def on_device(self, i: int):
        """Block ``i`` on the device for the duration (and back to the CPU with ``offload``)."""
        if self.offload:
            self.blocks[i].to(self.device)
        try:
            yield self.blocks[i]
        finally:
            if self.offload:
                self.blocks[i].to("cpu")

    @torch.no_grad()
    def capture(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(hidden states entering block 0, keyword arguments the model passes its blocks)."""
        store = {}

        def hook(_mod, args, kwargs):
            store["h"] = args[0] if args else kwargs.pop("hidden_states")
            store["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Captured

        h = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=x.to(self.device), use_cache=False)
        except _Captured:
            pass
        finally:
            h.remove()
        kw = store["kw"]
        for k in ("past_key_value", "past_key_values"):
            if k in kw:
                kw[k] = None
        kw["use_cache"] = False
        return store["h"], kw

    def run_block(self, block: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
        out = block(h, **kw)
        if self._as_tuple is None:
            self._as_tuple = isinstance(out, tuple)
        return out[0] if isinstance(out, tuple) else out

    def _forward_from(self, h: torch.Tensor, x: torch.Tensor):
        """The model's forward with the decoder blocks replaced by ``h`` (the last block's output)."""
        parent = self.model.get_submodule(self.prefix.rpartition(".")[0]) if "." in self.prefix else self.model
        attr = self.prefix.rpartition(".")[2]
        saved = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList([_Inject(h, saved[-1], bool(self._as_tuple))]))
        try:
            return self.model(input_ids=x.to(self.device), use_cache=False)
        finally:
            setattr(parent, attr, saved)

    @torch.no_grad()
    def logits(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's logits given the hidden states ``h`` leaving the last block (``x``: the
        token ids, used only for the embedding pass the model's forward makes)."""
        return self._forward_from(h, x).logits

    @torch.no_grad()
    def head_inputs(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the output embedding receives (the final norm's output) given ``h``."""
        store = {}

        def hook(_mod, args):
            store["h"] = args[0]
            raise _Captured

        handle = self.model.get_output_embeddings().register_forward_pre_hook(hook)
        try:
            self._forward_from(h, x)
        except _Captured:
            pass
        finally:
            handle.remove()
        return store["h"]

    def _head_is_logits(self, h: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether the output embedding alone turns its inputs into the model's logits (no logit
        scaling or soft-capping after it); checked once, on the first call's tokens."""
        if self._head_ok is None:
            head = self.model.get_output_embeddings()
            self._head_ok = isinstance(head, nn.Linear)
            if self._head_ok:
                want = self.logits(h, x)
                got = head(self.head_inputs(h, x))
                self._head_ok = got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        return self._head_ok

    @torch.no_grad()
    def nll_sum(self, h: torch.Tensor, x: torch.Tensor) -> float:
        """Summed next-token NLL of ``x`` given the last block's output ``h``. The output
        embedding and the cross-entropy run over chunks of tokens, so no (tokens, vocab) logits
        tensor is formed or copied (when the model's logits are its output embedding's output)."""
        tgt = x[:, 1:].to(self.device)
        if not self._head_is_logits(h, x):
            logits = self.logits(h, x)[:, :-1]
            return sum(F.cross_entropy(logits[b].float(), tgt[b], reduction="sum").item() for b in range(x.shape[0]))
        head = self.model.get_output_embeddings()
        hid = self.head_inputs(h, x)
        chunk = max(1, _HEAD_CHUNK_ELEMENTS // head.out_features)
        total = 0.0
        for b in range(x.shape[0]):
            for i in range(0, tgt.shape[1], chunk):
                logits = head(hid[b, i : min(i + chunk, tgt.shape[1])])
                total += F.cross_entropy(logits.float(), tgt[b, i : i + chunk], reduction="sum").item()
        return total

    @torch.no_grad()
    def nll_from(self, i: int, hs: list[torch.Tensor], kws: list[dict], xs: list[torch.Tensor]) -> float:
        """Summed NLL over micro-batches when blocks i.. run on the hidden states ``hs``."""
        hs = list(hs)
        for k in range(i, self.n_blocks):
            with self.on_device(k) as block:
                hs = [self.run_block(block, h, kw) for h, kw in zip(hs, kws)]
        return sum(self.nll_sum(h, x) for h, x in zip(hs, xs))


def block_of(runner: BlockRunner, name: str) -> int | None:
    """Index of the decoder block holding module ``name`` (None outside the blocks)."""
    head = runner.prefix + "."
    if not name.startswith(head):
        return None
    return int(name[len(head) :].split(".", 1)[0])


def names_by_block(runner: BlockRunner, names) -> dict[int | None, list[str]]:
    """Module names grouped by :func:`block_of` (None: outside the blocks), in the given order."""
    out: dict[int | None, list[str]] = {}
    for name in names:
        out.setdefault(block_of(runner, name), []).append(name)
    return out
