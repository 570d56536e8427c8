"""PackedLinear / PackedEmbedding: a Linear (rows = output features) or an Embedding (rows =
tokens) whose rows are stored at their planned widths, dequantized on the fly.

Storage per layer (what ``apply`` writes; its bytes are what ``cost.py`` predicts):
``qbits`` (out,) uint8 width per row; for each width w in 2..8 present, ``codes_b{w}``
(rows_w, ceil(K*w/8)) uint8 packed codes, ``scales_b{w}`` (rows_w, n_groups) float16 and
``zeros_b{w}`` (rows_w, n_groups) uint8; ``weight_f16`` (rows_16, K) for rows kept in float16. Pruned rows store
nothing and produce 0 (plus the bias, if any). Rows of one width appear in channel order.

Runtime: weights stay packed in memory. For a few input rows (batch-1 decoding) on the CPU,
``quant/kernel.c`` multiplies each width slice straight from its packed codes (one uniform-width
loop per slice, results written to the rows' channel positions); for more input rows (prefill,
evaluation) the layer dequantizes into one float buffer shared by every packed layer (the size of
the largest), then calls the matmul; without a C compiler, on a GPU or when gradients are needed,
a pure-torch path dequantizes into a fresh tensor. All give the outputs of the dequantized weight
(up to float summation order for the fused path).

Coupled pruning (``couplings.py``): a producer of dead units keeps only ``rows`` in its output
(the rows of its live units; the model sees a smaller matrix), and a consumer is simply packed
from its live columns (``in_features`` = K'). The bit map keeps every row; which rows stay is
derived from the bit maps and the couplings, not stored.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from .quant.grid import KEEP_WIDTH, PRUNE_WIDTH, QUANT_WIDTHS, choose_qparams, dequantize, quantize
from .quant.kernel import LayerSlices, get_kernel
from .quant.packing import pack_codes, unpack_codes

__all__ = [
    "PackedLinear",
    "PackedEmbedding",
    "PackedTiedHead",
    "pack_module",
    "pack_weight",
    "unpack_weight",
    "QUANT_TENSOR_SUFFIXES",
]

QUANT_TENSOR_SUFFIXES = ("qbits", "codes_b", "scales_b", "zeros_b", "weight_f16")
#: input rows up to which a product runs the fused kernel (above: one dequantized weight and a matmul)
GEMV_MAX_ROWS = 4


def pack_weight(
    weight: torch.Tensor,
    bits: torch.Tensor,
    group_size: int,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The packed tensors of one weight (out, K) under per-row widths ``bits`` (out,).

    Scales and zeros are the grid's min-max ones unless given: ``scales`` (out, n_groups) float16
    and ``zeros`` (out, n_groups) uint8 for every row (rows not at a width 2..8 are ignored), e.g.
    learned by QAT or SignRound; codes are then round(w / scale) + zero clamped to the width."""
    if (scales is None) != (zeros is None):
        raise ValueError("pack_weight: give both scales and zeros, or neither")
    w = weight.detach().float().cpu()
    bits = bits.to(torch.uint8).cpu()
    out = {"qbits": bits.clone()}
    for b in QUANT_WIDTHS:
        rows = (bits == b).nonzero().flatten()
        if rows.numel() == 0:
            continue
        sub = w[rows]
        if scales is None:
            scale, zero = choose_qparams(sub, b, group_size)
        else:
            scale = scales[rows].to(torch.float16).cpu()
            zero = zeros[rows].to(torch.uint8).cpu()
        codes = quantize(sub, scale, zero, b, group_size)
        out[f"codes_b{b}"] = pack_codes(codes, b)
        out[f"scales_b{b}"] = scale
        out[f"zeros_b{b}"] = zero
    rows = (bits == KEEP_WIDTH).nonzero().flatten()
    if rows.numel():
        out["weight_f16"] = w[rows].to(torch.float16)
    return out


def _group(in_features: int, group_size: int) -> int:
    """Codes per group along a row (the whole row for ``group_size=-1``)."""
    return in_features if group_size == -1 or group_size >= in_features else group_size


def unpack_weight(
    tensors: dict[str, torch.Tensor], in_features: int, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The dequantized weight (out, K) from the tensors :func:`pack_weight` wrote (pure torch)."""
    bits = tensors["qbits"]
    w = torch.zeros(bits.numel(), in_features, dtype=dtype, device=bits.device)
    for b in QUANT_WIDTHS:
        key = f"codes_b{b}"
        if key in tensors:
            rows = (bits == b).nonzero().flatten()
            codes = unpack_codes(tensors[key], b, in_features)
            w[rows] = dequantize(codes, tensors[f"scales_b{b}"], tensors[f"zeros_b{b}"], group_size, dtype=dtype)
    if "weight_f16" in tensors:
        w[(bits == KEEP_WIDTH).nonzero().flatten()] = tensors["weight_f16"].to(dtype)
    return w


_SCRATCH = threading.local()


def _scratch(rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) float32 CPU buffer reused by every packed layer of this thread: the weight
    a product dequantizes lives only until its matmul ends, and one buffer of the largest layer's
    size serves them all (a fresh allocation per layer costs page faults as large as a matmul's
    few percent)."""
    buf = getattr(_SCRATCH, "buffer", None)
    if buf is None or buf.numel() < rows * cols:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buf = _SCRATCH.buffer = torch.empty(rows * cols, dtype=torch.float32)
    return buf[: rows * cols].view(rows, cols)


def _kernel_for(x: torch.Tensor, device: torch.device):
    """The compiled kernel when it can serve ``x`` (CPU tensors, no gradient needed), else None."""
    if x.device.type != "cpu" or device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return get_kernel()


class PackedRows(nn.Module):
    """Packed row storage shared by the linear and embedding modules.

    Besides the stored tensors, each width's rows get their output positions (``out_b{w}``,
    int32, not saved): the row's channel index, or its rank among the kept rows when ``keep``
    drops pruned rows. Products and dequantization write every width slice straight to those
    positions, so rows grouped by width cost no permutation pass."""

    kind = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        tensors: dict[str, torch.Tensor],
        compute_dtype: torch.dtype = torch.float32,
        keep: torch.Tensor | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        if tensors["qbits"].numel() != out_features:
            raise ValueError(f"{type(self).__name__}: qbits has the wrong length")
        self._names = []
        for k, v in tensors.items():
            self.register_buffer(k, v)
            self._names.append(k)
        qbits = self.qbits.long()
        position = torch.arange(out_features, device=qbits.device)
        self.n_out = out_features
        if keep is not None:
            keep = torch.as_tensor(keep, device=qbits.device)
            keep = keep.nonzero().flatten() if keep.dtype == torch.bool else keep.long()
            dropped = torch.ones(out_features, dtype=torch.bool, device=qbits.device)
            dropped[keep] = False
            if (qbits[dropped] != PRUNE_WIDTH).any():
                raise ValueError(f"{type(self).__name__}: only pruned rows can be dropped")
            position = torch.full_like(position, -1)
            position[keep] = torch.arange(keep.numel(), device=qbits.device)
            self.n_out = int(keep.numel())
        self.widths = tuple(b for b in QUANT_WIDTHS if f"codes_b{b}" in tensors)
        #: every output row is stored (none pruned): dequantizing needs no zero fill first
        self.dense = int(((qbits != PRUNE_WIDTH) & (position >= 0)).sum()) == self.n_out
        for b in self.widths + ((KEEP_WIDTH,) if "weight_f16" in tensors else ()):
            self.register_buffer(f"out_b{b}", position[qbits == b].to(torch.int32), persistent=False)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._names}

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed_tensors().values())

    def dequantized_weight(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The (output rows, K) weight, pruned rows 0, in ``dtype`` (default: the compute dtype);
        written into ``out`` (float32, that shape) when given."""
        dtype = dtype or self.compute_dtype
        kernel = _kernel_for(self.qbits, self.qbits.device) if self._kernel_storage() else None
        shape = (self.n_out, self.in_features)
        if out is not None:
            w = out if self.dense and kernel is not None else out.zero_()
        else:
            w = (torch.empty if self.dense and kernel is not None else torch.zeros)(
                shape, dtype=torch.float32, device=self.qbits.device
            )
        group = _group(self.in_features, self.group_size)
        for b in self.widths:
            codes, scales, zeros = (
                getattr(self, f"codes_b{b}"),
                getattr(self, f"scales_b{b}"),
                getattr(self, f"zeros_b{b}"),
            )
            index = getattr(self, f"out_b{b}")
            if kernel is not None:
                kernel.dequant(
                    b, codes.contiguous(), scales.contiguous(), zeros.contiguous(), index.contiguous(), group, w
                )
            else:
                w[index.long()] = dequantize(unpack_codes(codes, b, self.in_features), scales, zeros, self.group_size)
        if hasattr(self, "weight_f16"):
            w[getattr(self, f"out_b{KEEP_WIDTH}").long()] = self.weight_f16.float()
        return w.to(dtype)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight^T`` (no bias) for x (..., K): fused unpack-and-multiply for a few rows of x
        on the CPU, else the weight dequantized into a buffer shared by all packed layers, and a matmul."""
        flat = x.reshape(-1, self.in_features)
        kernel = _kernel_for(flat, self.qbits.device)
        if kernel is not None and flat.shape[0] <= GEMV_MAX_ROWS:
            layer = self._layer_slices()
            if layer is not None:
                xf = flat.float().contiguous()
                y = (torch.empty if self.dense else torch.zeros)(xf.shape[0], self.n_out, dtype=torch.float32)
                kernel.gemv_layer(layer, xf, y)
                return y.to(x.dtype).reshape(*x.shape[:-1], self.n_out)
        if kernel is None or not self._kernel_storage():
            return F.linear(x, self.dequantized_weight(x.dtype))
        return F.linear(x, self.dequantized_weight(x.dtype, out=_scratch(self.n_out, self.in_features)))

    def _kernel_storage(self) -> bool:
        """The stored tensors have the dtypes the kernel reads (``.to(dtype)`` converts the float16 ones)."""
        b = self._buffers
        return all(
            b[f"scales_b{w}"].dtype == torch.float16
            and b[f"codes_b{w}"].dtype == torch.uint8
            and b[f"zeros_b{w}"].dtype == torch.uint8
            for w in self.widths
        ) and ("weight_f16" not in b or b["weight_f16"].dtype == torch.float16)

    def _apply(self, fn, *args, **kwargs):
        self._slices = None  # points into the old tensors
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_slices"] = None  # C pointers: neither copied nor pickled
        return state

    def _layer_slices(self) -> LayerSlices | None:
        """The kernel's view of this layer's slices, rebuilt when a buffer was replaced (``.to()``,
        assignment); None when the stored dtypes are not the kernel's."""
        buffers = self._buffers
        cached = getattr(self, "_slices", None)
        if cached is not None and all(buffers[n] is t for n, t in cached[0]):
            return cached[1]
        if not self._kernel_storage():
            self._slices = ([(n, t) for n, t in buffers.items() if t is not None], None)
            return None
        slices = [
            (b, buffers[f"codes_b{b}"], buffers[f"scales_b{b}"], buffers[f"zeros_b{b}"], buffers[f"out_b{b}"])
            for b in self.widths
        ]
        if "weight_f16" in buffers:
            slices.append((KEEP_WIDTH, buffers["weight_f16"], None, None, buffers[f"out_b{KEEP_WIDTH}"]))
        layer = LayerSlices(slices, _group(self.in_features, self.group_size), self.in_features)
        self._slices = ([(n, t) for n, t in buffers.items() if t is not None], layer)
        return layer

    @property
    def n_rows(self) -> int:
        """Rows of the bit map (pruned ones included)."""
        return self.qbits.numel()

    def extra_repr(self) -> str:
        counts = torch.bincount(self.qbits.long(), minlength=17)
        widths = ", ".join(f"{b}b:{int(counts[b])}" for b in range(17) if counts[b])
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"rows=[{widths}]"
        )


class PackedLinear(PackedRows):
    """Drop-in for ``nn.Linear`` holding packed rows; ``forward`` multiplies without a float weight
    for a few input rows (batch-1 decoding), else through a temporary dequantized weight."""

    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        tensors: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
        rows: torch.Tensor | None = None,
    ):
        """``out_features``: rows of the bit map; with ``rows`` (bool mask or index) the output has
        only those rows (every dropped row must be at width 0, and there may be no bias)."""
        if rows is not None and bias is not None:
            raise ValueError("PackedLinear: only pruned rows of a layer without bias can be dropped")
        super().__init__(in_features, out_features, group_size, tensors, compute_dtype, keep=rows)
        self.compact = rows is not None
        self.out_features = self.n_out
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: torch.Tensor,
        group_size: int,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        columns: torch.Tensor | None = None,
    ) -> "PackedLinear":
        """Pack ``linear`` at per-row widths ``bits``; ``columns`` (bool or index) keeps only those
        input columns (a coupled consumer), ``rows`` only those output rows (a producer)."""
        weight = linear.weight if columns is None else linear.weight[:, torch.as_tensor(columns)]
        tensors = pack_weight(weight, bits, group_size, scales, zeros)
        return cls(
            weight.shape[1],
            linear.out_features,
            group_size,
            tensors,
            linear.bias,
            compute_dtype=linear.weight.dtype,
            rows=rows,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (", compact" if self.compact else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class PackedEmbedding(PackedRows):
    """Drop-in for ``nn.Embedding`` holding packed token rows (``in_features`` = embedding dim);
    a lookup dequantizes only the rows of the tokens asked for."""

    kind = "embedding"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        tensors: dict[str, torch.Tensor],
        padding_idx: int | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(in_features, out_features, group_size, tensors, compute_dtype)
        self.padding_idx = padding_idx
        self.bias = None

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    @classmethod
    def from_embedding(
        cls,
        emb: nn.Embedding,
        bits: torch.Tensor,
        group_size: int,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
    ) -> "PackedEmbedding":
        tensors = pack_weight(emb.weight, bits, group_size, scales, zeros)
        return cls(
            emb.embedding_dim, emb.num_embeddings, group_size, tensors, emb.padding_idx, compute_dtype=emb.weight.dtype
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        out = torch.zeros(flat.numel(), self.in_features, dtype=self.compute_dtype, device=flat.device)
        bits = self.qbits[flat]
        for b in self.widths + ((KEEP_WIDTH,) if hasattr(self, "weight_f16") else ()):
            sel = (bits == b).nonzero().flatten()
            if sel.numel() == 0:
                continue
            slot = torch.searchsorted(getattr(self, f"out_b{b}"), flat[sel].to(torch.int32))
            if b == KEEP_WIDTH:
                rows = self.weight_f16[slot]
            else:
                codes = unpack_codes(getattr(self, f"codes_b{b}")[slot], b, self.in_features)
                rows = dequantize(
                    codes, getattr(self, f"scales_b{b}")[slot], getattr(self, f"zeros_b{b}")[slot], self.group_size
                )
            out[sel] = rows.to(out.dtype)
        return out.reshape(*ids.shape, self.in_features)


class PackedTiedHead(nn.Module):
    """An lm_head tied to a packed embedding: logits = x @ dequantized(embedding)^T. Holds no
    tensors of its own (the embedding's are stored once)."""

    def __init__(self, embedding: PackedEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # a reference, not a submodule
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.in_features = embedding.in_features
        self.out_features = embedding.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._embedding.product(x)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"tied to a PackedEmbedding of {self.out_features} rows"


def pack_module(
    mod: nn.Module,
    bits: torch.Tensor,
    group_size: int,
    rows: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    qparams: tuple | None = None,
) -> PackedRows:
    """The packed replacement of a target module (Linear or Embedding; ``rows`` and ``columns``
    as in :meth:`PackedLinear.from_linear`; ``qparams`` = (scales, zeros) as in :func:`pack_weight`)."""
    scales, zeros = qparams if qparams is not None else (None, None)
    if isinstance(mod, nn.Embedding):
        return PackedEmbedding.from_embedding(mod, bits, group_size, scales, zeros)
    return PackedLinear.from_linear(mod, bits, group_size, scales, zeros, rows=rows, columns=columns)
