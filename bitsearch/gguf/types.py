"""ggml tensor types: their ids, block layouts, exact byte prices and llama.cpp's shape fallbacks.

A ggml type stores a row of ``n`` weights as ``n / block`` blocks of ``type_size`` bytes (the
block holds the scales and super-block scales, so this is the exact price). A row whose length
is not a multiple of the block cannot be stored in the type; ``llama-quantize`` then falls back
to a type with 32-weight blocks, and to F16 when even that block does not divide the row
(``tensor_type_fallback`` in llama.cpp's ``src/llama-quant.cpp``): :func:`effective_type`
applies the same rule so a plan prices and writes what llama.cpp would.

Pure Python: the ids and sizes are those of ggml's ``enum ggml_type`` and its type traits (the
tests check them against the ``gguf`` package and against the ggml library itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BitsearchError

__all__ = [
    "GGMLType",
    "GGML_TYPES",
    "SEARCH_TYPES",
    "FALLBACK",
    "ggml_type",
    "effective_type",
    "row_bytes",
    "tensor_bytes",
    "parse_types",
]


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int  # ggml's enum ggml_type value (also the GGUF tensor-info type)
    block: int  # weights per block
    type_size: int  # bytes per block
    needs_imatrix: bool = False  # ggml refuses to quantize it without importance weights

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block


_TABLE = [
    GGMLType("F32", 0, 1, 4),
    GGMLType("F16", 1, 1, 2),
    GGMLType("BF16", 30, 1, 2),
    GGMLType("Q4_0", 2, 32, 18),
    GGMLType("Q4_1", 3, 32, 20),
    GGMLType("Q5_0", 6, 32, 22),
    GGMLType("Q5_1", 7, 32, 24),
    GGMLType("Q8_0", 8, 32, 34),
    GGMLType("IQ4_NL", 20, 32, 18),
    GGMLType("Q2_K", 10, 256, 84),
    GGMLType("Q3_K", 11, 256, 110),
    GGMLType("Q4_K", 12, 256, 144),
    GGMLType("Q5_K", 13, 256, 176),
    GGMLType("Q6_K", 14, 256, 210),
    GGMLType("IQ2_XXS", 16, 256, 66, True),
    GGMLType("IQ2_XS", 17, 256, 74, True),
    GGMLType("IQ2_S", 22, 256, 82, True),
    GGMLType("IQ3_XXS", 18, 256, 98, True),
    GGMLType("IQ3_S", 21, 256, 110),
    GGMLType("IQ4_XS", 23, 256, 136),
]
#: every type bitsearch can price, quantize and write, by name
GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in _TABLE}
_BY_ID = {t.id: t for t in _TABLE}

#: the default search menu: the K-quants, Q8_0 and the IQ types llama.cpp makes with an imatrix,
#: by price (Q3_K and IQ3_S cost the same)
SEARCH_TYPES = [
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "Q2_K",
    "IQ3_XXS",
    "Q3_K",
    "IQ3_S",
    "IQ4_XS",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q8_0",
]

#: llama-quantize's fallback of a 256-block type for rows its block does not divide
FALLBACK = {
    "IQ2_XXS": "IQ4_NL",
    "IQ2_XS": "IQ4_NL",
    "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL",
    "IQ3_S": "IQ4_NL",
    "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


def ggml_type(name_or_id: str | int) -> GGMLType:
    """A type by name (case-insensitive) or ggml id; a one-line error for an unknown one."""
    if isinstance(name_or_id, int):
        if name_or_id not in _BY_ID:
            raise BitsearchError(f"ggml type id {name_or_id} is not one bitsearch supports")
        return _BY_ID[name_or_id]
    t = GGML_TYPES.get(str(name_or_id).upper())
    if t is None:
        raise BitsearchError(f"unknown ggml type '{name_or_id}' (choose from {', '.join(GGML_TYPES)})")
    return t


def parse_types(spec: str | list[str] | None) -> list[str]:
    """A comma-separated type menu (default: :data:`SEARCH_TYPES`), checked and sorted by price."""
    if spec is None:
        return list(SEARCH_TYPES)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = list(dict.fromkeys(ggml_type(n.strip()).name for n in names if n.strip()))
    if not out:
        raise BitsearchError("the ggml type menu is empty")
    return sorted(out, key=lambda n: GGML_TYPES[n].bits_per_weight)


def effective_type(name: str, n_per_row: int) -> str:
    """The type llama-quantize stores a tensor with rows of ``n_per_row`` weights in when asked
    for ``name``: itself when its block divides the row, else its fallback, else F16."""
    t = ggml_type(name)
    if n_per_row % t.block == 0:
        return t.name
    fb = FALLBACK.get(t.name, t.name)
    return fb if n_per_row % GGML_TYPES[fb].block == 0 else "F16"


def row_bytes(name: str, n_per_row: int) -> int:
    t = ggml_type(name)
    if n_per_row % t.block:
        raise BitsearchError(
            f"a row of {n_per_row} weights cannot be stored as {t.name} (its blocks hold {t.block} weights)"
        )
    return n_per_row // t.block * t.type_size


def tensor_bytes(name: str, shape: tuple[int, int]) -> int:
    """Exact bytes of a (rows, n_per_row) tensor stored as ``name``."""
    return shape[0] * row_bytes(name, shape[1])
