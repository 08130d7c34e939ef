"""profiler/interference.py: what else took the CPU in each round, and rounds measured again for a burst."""

import pytest

from profiler.interference import CpuMonitor, interference, parse_proc_stat, summary
from profiler.rounds import measure_in_rounds

# /proc/stat as a 2-core VM printed it (first lines), and one second later
BEFORE = """cpu  1610808 0 135180 11703001 7579 0 2557 51674 0 0
cpu0 744315 0 57750 5925198 1639 0 327 25825 0 0
cpu1 866493 0 77430 5777802 5939 0 2230 25848 0 0
intr 1 2 3
"""
AFTER = """cpu  1610928 0 135200 11703031 7579 0 2559 51694 0 0
cpu0 744375 0 57760 5925213 1639 0 328 25835 0 0
"""


def test_proc_stat_is_parsed_and_steal_and_other_processes_are_shares_of_the_machine():
    before, after = parse_proc_stat(BEFORE), parse_proc_stat(AFTER)
    assert before["user"] == 1610808 and before["steal"] == 51674 and before["idle"] == 11703001
    # 192 ticks in all: 20 steal, 142 busy (120 user + 20 system + 2 softirq), 30 idle; this process used 0.5 s
    got = interference(before, after, own_s=0.5, tick_s=0.01)
    assert got == {"steal_pct": pytest.approx(100 * 20 / 192, abs=1e-3),
                   "other_pct": pytest.approx(100 * (142 - 50) / 192, abs=1e-3)}
    assert parse_proc_stat("cpu  1 2 3 4")["steal"] == 0  # an old kernel without the steal column
    with pytest.raises(ValueError):
        parse_proc_stat("intr 1 2 3")


def test_without_proc_stat_the_monitor_says_so_and_measuring_goes_on(tmp_path):
    mon = CpuMonitor(path=tmp_path / "no-such-file")
    assert not mon.available and "unreadable" in mon.note
    log = []
    rows = measure_in_rounds(["a", "b"], lambda k: [1.0, 1.1], 3, monitor=mon, log=log)
    assert len(rows) == 12 and log == [] and "steal_pct" not in rows[0]


class Bursty:
    """A monitor whose rounds see 2% other-process CPU, except the bursts it is told (the `n`-th
    round measured, counting re-measurements)."""

    min_excess_pct = 10.0
    note = None

    def __init__(self, bursts):
        self.bursts, self.n = set(bursts), -1

    def start(self):
        self.n += 1

    def stop(self):
        return {"steal_pct": 0.5, "other_pct": 60.0 if self.n in self.bursts else 2.0 + 0.1 * (self.n % 3)}

    flag = CpuMonitor.flag


def test_a_round_with_a_burst_is_flagged_measured_again_and_reported():
    calls = []

    def measure(key):
        calls.append(key)
        return [5.0 if len(calls) <= 3 * 4 else 1.0]  # keys take 5 ms before and during the burst round, 1 ms after

    log = []
    rows = measure_in_rounds(["full", "x", "y"], measure, 6, monitor=Bursty({3}), log=log)
    assert [e["round"] for e in log] == [0, 1, 2, 3, 3, 4, 5]  # round 3 measured twice
    assert [e["rejected"] for e in log] == [False] * 3 + [True] + [False] * 3
    assert sorted({r["round"] for r in rows}) == list(range(6)) and len(rows) == 18  # the burst's samples dropped
    assert all(r["other_pct"] < 10 for r in rows)
    s = summary(log)
    assert s["remeasured_rounds"] == 1 and s["rounds"] == 6 and s["other_pct_max"] < 10


def test_re_measuring_is_bounded_and_the_first_rounds_set_the_typical_level():
    log = []
    rows = measure_in_rounds(["full", "x"], lambda k: [1.0], 6, monitor=Bursty({2, 3, 4, 5, 6, 7, 8}), log=log,
                             max_repeats=2)
    assert sum(e["rejected"] for e in log) == 2  # the cap, then the bursty rounds are kept (and reported)
    assert len({r["round"] for r in rows}) == 6
    assert summary(log)["other_pct_max"] == 60.0
    first = []
    measure_in_rounds(["full"], lambda k: [1.0], 3, monitor=Bursty({0}), log=first)
    assert not any(e["rejected"] for e in first)  # no typical level yet: a burst in round 0 cannot be told apart
