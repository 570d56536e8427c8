"""bitsearch.progress in a log file: plain lines at most every LOG_EVERY seconds (with counts,
time left and the caller's postfix), nothing for short work, and every item passed through."""

import io

from bitsearch.progress import LineProgress


class Clock:
    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_lines_every_interval_with_counts_time_left_and_postfix():
    out = io.StringIO()
    bar = LineProgress(range(10), desc="layer response", stream=out, every=30.0, clock=Clock(10.0))
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=0.123456, block=i)
    assert seen == list(range(10))
    lines = out.getvalue().splitlines()
    # the clock advances 10 s per call: a line after items 3, 6 and 9, and a last one
    assert lines[0] == "layer response: 3/10 (30 %), 0:30 elapsed, ~1:10 left, loss=0.1235, block=2"
    assert [line.split(",")[0] for line in lines] == [
        "layer response: 3/10 (30 %)",
        "layer response: 6/10 (60 %)",
        "layer response: 9/10 (90 %)",
        "layer response: 10/10 (100 %)",
    ]
    assert "left" not in lines[-1]


def test_short_work_writes_nothing_and_unknown_totals_count_only():
    out = io.StringIO()
    assert list(LineProgress(range(5), stream=out, every=30.0, clock=Clock(1.0))) == list(range(5))
    assert out.getvalue() == ""
    bar = LineProgress(iter(range(4)), desc="samples", stream=out, every=1.0, clock=Clock(1.0))
    bar.set_postfix_str("MSE 2 -> 1")
    assert list(bar) == [0, 1, 2, 3]
    assert out.getvalue().splitlines()[0] == "samples: 1, 0:01 elapsed, MSE 2 -> 1"


def test_a_line_on_the_last_item_is_not_repeated():
    out = io.StringIO()
    assert list(LineProgress(range(3), desc="d", stream=out, every=2.0, clock=Clock(1.0))) == [0, 1, 2]
    # calls: start 1, then 2, 3 (line at item 2), 4 (item 3: 1 s since the line, none); a last line
    assert out.getvalue().splitlines() == ["d: 2/3 (67 %), 0:02 elapsed, ~0:01 left", "d: 3/3 (100 %), 0:04 elapsed"]
    out = io.StringIO()
    list(LineProgress(range(2), desc="d", stream=out, every=2.0, clock=Clock(1.0)))
    assert out.getvalue().splitlines() == ["d: 2/2 (100 %), 0:02 elapsed"]  # the line on the last item only
