"""PackedLinear / PackedEmbedding: a Linear (rows = output features) or an Embedding (rows =
tokens) whose rows are stored at their planned widths, dequantized on the fly.

Storage per layer (what ``apply`` writes; its bytes are what ``cost.py`` predicts):
``qbits`` (out,) uint8 width per row; for each width w in 2..8 present, ``codes_b{w}``
(rows_w, ceil(K*w/8)) uint8 packed codes, ``scales_b{w}`` (rows_w, n_groups) float16 and
``zeros_b{w}`` (rows_w, n_groups) uint8; ``weight_f16`` (rows_16, K) for rows kept in float16. Pruned rows store
nothing and produce 0 (plus the bias, if any). Rows of one width appear in channel order.

Coupled pruning (``couplings.py``): a producer of dead units keeps only ``rows`` in its output
(the rows of its live units; the model sees a smaller matrix), and a consumer is simply packed
from its live columns (``in_features`` = K'). The bit map keeps every row; which rows stay is
derived from the bit maps and the couplings, not stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant.grid import KEEP_WIDTH, QUANT_WIDTHS, choose_qparams, dequantize, quantize
from .quant.packing import pack_codes, unpack_codes

__all__ = ["PackedLinear", "PackedEmbedding", "PackedTiedHead", "pack_module", "pack_weight", "unpack_weight",
           "QUANT_TENSOR_SUFFIXES"]

QUANT_TENSOR_SUFFIXES = ("qbits", "codes_b", "scales_b", "zeros_b", "weight_f16")


def pack_weight(weight: torch.Tensor, bits: torch.Tensor, group_size: int, scales: torch.Tensor | None = None,
                zeros: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
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


def unpack_weight(tensors: dict[str, torch.Tensor], in_features: int, group_size: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weight (out, K) from the tensors :func:`pack_weight` wrote."""
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


class _PackedRows(nn.Module):
    """Packed row storage shared by the linear and embedding modules."""

    kind = ""

    def __init__(self, in_features: int, out_features: int, group_size: int, tensors: dict[str, torch.Tensor],
                 compute_dtype: torch.dtype = torch.float32):
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

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._names}

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed_tensors().values())

    def dequantized_weight(self) -> torch.Tensor:
        return unpack_weight(self.packed_tensors(), self.in_features, self.group_size, self.compute_dtype)

    @property
    def n_rows(self) -> int:
        """Rows of the bit map (pruned ones included)."""
        return self.qbits.numel()

    def extra_repr(self) -> str:
        counts = torch.bincount(self.qbits.long(), minlength=17)
        widths = ", ".join(f"{b}b:{int(counts[b])}" for b in range(17) if counts[b])
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, rows=[{widths}]"


class PackedLinear(_PackedRows):
    """Drop-in for ``nn.Linear`` holding packed rows; ``forward`` dequantizes, then ``F.linear``."""

    kind = "linear"

    def __init__(self, in_features: int, out_features: int, group_size: int, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32,
                 rows: torch.Tensor | None = None):
        """``out_features``: rows of the bit map; with ``rows`` (bool mask or index) the output has
        only those rows (every dropped row must be at width 0, and there may be no bias)."""
        super().__init__(in_features, out_features, group_size, tensors, compute_dtype)
        self.compact = rows is not None
        if self.compact:
            keep = torch.as_tensor(rows, device=self.qbits.device)
            keep = keep.nonzero().flatten() if keep.dtype == torch.bool else keep.long()
            dropped = torch.ones(out_features, dtype=torch.bool, device=keep.device)
            dropped[keep] = False
            if bias is not None or (self.qbits[dropped] != 0).any():
                raise ValueError("PackedLinear: only pruned rows of a layer without bias can be dropped")
            self.register_buffer("live_rows", keep, persistent=False)
            self.out_features = int(keep.numel())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: torch.Tensor, group_size: int, scales: torch.Tensor | None = None,
                    zeros: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                    columns: torch.Tensor | None = None) -> "PackedLinear":
        """Pack ``linear`` at per-row widths ``bits``; ``columns`` (bool or index) keeps only those
        input columns (a coupled consumer), ``rows`` only those output rows (a producer)."""
        weight = linear.weight if columns is None else linear.weight[:, torch.as_tensor(columns)]
        tensors = pack_weight(weight, bits, group_size, scales, zeros)
        return cls(weight.shape[1], linear.out_features, group_size, tensors, linear.bias,
                   compute_dtype=linear.weight.dtype, rows=rows)

    def dequantized_weight(self) -> torch.Tensor:
        w = super().dequantized_weight()
        return w[self.live_rows] if self.compact else w

    def extra_repr(self) -> str:
        return super().extra_repr() + (", compact" if self.compact else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, bias)


class PackedEmbedding(_PackedRows):
    """Drop-in for ``nn.Embedding`` holding packed token rows (``in_features`` = embedding dim)."""

    kind = "embedding"

    def __init__(self, in_features: int, out_features: int, group_size: int, tensors: dict[str, torch.Tensor],
                 padding_idx: int | None = None, compute_dtype: torch.dtype = torch.float32):
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
    def from_embedding(cls, emb: nn.Embedding, bits: torch.Tensor, group_size: int, scales: torch.Tensor | None = None,
                       zeros: torch.Tensor | None = None) -> "PackedEmbedding":
        tensors = pack_weight(emb.weight, bits, group_size, scales, zeros)
        return cls(emb.embedding_dim, emb.num_embeddings, group_size, tensors, emb.padding_idx,
                   compute_dtype=emb.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dequantized_weight(), self.padding_idx)


class PackedTiedHead(nn.Module):
    """An lm_head tied to a packed embedding: logits = x @ dequantized(embedding)^T. Holds no
    tensors of its own (the embedding's are stored once)."""

    def __init__(self, embedding: PackedEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)   # a reference, not a submodule
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.in_features = embedding.in_features
        self.out_features = embedding.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self._embedding.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"tied to a PackedEmbedding of {self.out_features} rows"


def pack_module(mod: nn.Module, bits: torch.Tensor, group_size: int, rows: torch.Tensor | None = None,
                columns: torch.Tensor | None = None, qparams: tuple | None = None) -> _PackedRows:
    """The packed replacement of a target module (Linear or Embedding; ``rows`` and ``columns``
    as in :meth:`PackedLinear.from_linear`; ``qparams`` = (scales, zeros) as in :func:`pack_weight`)."""
    scales, zeros = qparams if qparams is not None else (None, None)
    if isinstance(mod, nn.Embedding):
        return PackedEmbedding.from_embedding(mod, bits, group_size, scales, zeros)
    return PackedLinear.from_linear(mod, bits, group_size, scales, zeros, rows=rows, columns=columns)
