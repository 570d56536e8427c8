"""studies/finalizer_aware.py: ratios go to the right (layer type, width) entries, unmeasured
widths take the nearest measured one, and the greedy allocator moves bytes accordingly."""

import numpy as np

from bitsearch.search import get_allocator
from bitsearch.search.problem import AllocationProblem
from studies import finalizer_aware


def problem():
    """Two layers of 3 rows, widths 2/3/4 at 10/14/18 bytes, curves 8/2/0.5 scaled per row."""
    errors = np.tile([8.0, 2.0, 0.5], (6, 1)) * np.array([[1.0], [1.1], [1.2], [1.05], [1.15], [1.25]])
    return AllocationProblem(
        bits=[2, 3, 4],
        errors=errors,
        costs=np.tile([10, 14, 18], (6, 1)),
        fixed_bytes=6,
        n_weights=6 * 32,
        layer_slices={"b.0.o_proj": slice(0, 3), "b.0.q_proj": slice(3, 6)},
        group_size=32,
    )


def test_rows_of_repair_table_become_ratios_and_nearest_width_fills_gaps():
    rows = [
        {"layer type": "o_proj", "width": 2, "signround / rtn": 0.5},
        {"layer type": "o_proj", "width": 3, "signround / rtn": 0.8},
    ]
    ratios = finalizer_aware.repair_ratios(rows, "signround")
    assert ratios == {"o_proj": {2: 0.5, 3: 0.8}}
    assert finalizer_aware.ratio_at(ratios["o_proj"], 4) == 0.8 and finalizer_aware.ratio_at({2: 1, 4: 3}, 3) == 1


def test_rescale_touches_only_its_layer_type_and_moves_the_greedy_bytes():
    p, ref = problem(), problem()
    finalizer_aware.rescale(p, {"o_proj": {2: 0.1, 3: 1.0, 4: 1.0}})
    assert np.allclose(p.errors[3:], ref.errors[3:])  # q_proj untouched
    assert np.allclose(p.errors[:3], ref.errors[:3] * [0.1, 1.0, 1.0])
    greedy = get_allocator("greedy")
    budget = 6 + 6 * 10 + 3 * 4  # three 2->3 upgrades
    before, after = greedy.allocate(ref, budget), greedy.allocate(p, budget)
    assert before.tolist() == [0, 0, 1, 0, 1, 1]  # the largest gains 7.5, 7.2, 6.9
    assert after[:3].sum() == 0 and after[3:].tolist() == [1, 1, 1]  # o_proj's 2-bit error mostly repaired
