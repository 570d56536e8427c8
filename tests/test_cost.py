"""Cost model: exact bytes and budget parsing."""

import pytest

from bitsearch.cost import avg_bits, budget_to_bytes, layer_bytes, parse_budget, row_bytes
from bitsearch.errors import BitsearchError


def test_row_bytes_formula():
    # 3 bits, K=384, groups of 128: 144 code bytes + 3 groups * (fp16 scale + uint8 zero)
    assert row_bytes(384, 3, 128) == 144 + 9
    assert row_bytes(384, 0, 128) == 0
    assert row_bytes(384, 16, 128) == 768
    assert row_bytes(10, 3, -1) == 4 + 3  # ceil(30/8) = 4
    with pytest.raises(ValueError):
        row_bytes(10, 1, -1)


def test_uniform_w3_g128_is_3_1875_bits_plus_bit_map():
    n_bytes = layer_bytes(1024, [3] * 512, 128)
    assert n_bytes == 512 * (384 + 8 * 3) + 512
    assert avg_bits(n_bytes - 512, 512 * 1024) == pytest.approx(3 + 24 / 128)


def test_parse_budget():
    assert parse_budget("2.5") == ("bits", 2.5)
    assert parse_budget("12MB") == ("bytes", 12e6)
    assert parse_budget("12MiB") == ("bytes", 12 * 2**20)
    assert parse_budget("1.5 kib") == ("bytes", 1536)
    assert budget_to_bytes("2.5", 1000) == 312
    for bad in ["abc", "0", "-1", "17", "12XB"]:
        with pytest.raises(BitsearchError):
            parse_budget(bad)
