"""scripts/instructions' own logic: its options, its reading of callgrind's totals and its table
(the counting itself runs under valgrind: tests/integration/test_bench_script.py)."""

import datetime
import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def instructions():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    spec = importlib.util.spec_from_file_location("instructions", os.path.join(REPO, "scripts", "instructions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cases_and_baselines_are_read_from_the_options(instructions):
    args = instructions.parse_args(["--baseline", "HEAD", "--cases", "1:simple,25:prepared"])
    assert [target for target, _commit in args.targets] == ["pgforkpool", "pgforkpool@HEAD"]
    assert len(args.targets[1][1]) == 40
    assert args.case_list == [(1, "simple"), (25, "prepared")]
    assert instructions.parse_args([]).case_list == [(1, "simple"), (1, "prepared"), (25, "simple"),
                                                      (25, "prepared")]


@pytest.mark.parametrize("argv, message", [
    (["--cases", "1"], "CLIENTS:simple|extended|prepared or MB:bytea"),
    (["--cases", "0:simple"], "CLIENTS:simple|extended|prepared or MB:bytea"),
    (["--cases", "x:simple"], "CLIENTS:simple|extended|prepared or MB:bytea"),
    (["--cases", "1:fast"], "CLIENTS:simple|extended|prepared or MB:bytea"),
    (["--cases", "25:simple", "--transactions", "100"], "at least 5 per client (125 for 25 clients)"),
    (["--timeout", "0"], "--timeout must be positive"),
])
def test_malformed_options_are_refused(instructions, argv, message, capsys):
    with pytest.raises(SystemExit):
        instructions.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_case_given_twice_is_counted_once(instructions):
    assert instructions.parse_args(["--cases", "1:simple,1:simple"]).case_list == [(1, "simple")]


def test_the_total_is_read_from_a_callgrind_file(instructions, tmp_path):
    path = tmp_path / "callgrind.123"
    path.write_text("# callgrind format\nversion: 1\ncmd: python\npid: 123\nevents: Ir\n"
                    "fn=(1) main\n0 17\n\nsummary: 987654321\n\n\ntotals: 987654321\n")
    assert instructions.total_instructions(str(path)) == 987654321
    path.write_text("events: Ir\n")
    with pytest.raises(RuntimeError, match="no total"):
        instructions.total_instructions(str(path))


def test_the_table_has_each_builds_count_and_the_ratios(instructions):
    args = instructions.parse_args(["--baseline", "HEAD", "--cases", "1:simple,25:prepared"])
    counts = {("pgforkpool", 1, "simple"): 48000.0, ("pgforkpool@HEAD", 1, "simple"): 50000.0,
              ("pgforkpool", 25, "prepared"): 40000.0}   # the baseline's 25-client count failed
    report = instructions.render(args, datetime.datetime(2026, 12, 2, 16, 0), counts)
    assert "| clients, protocol | pgforkpool | pgforkpool@HEAD | pgforkpool/pgforkpool@HEAD |" in report
    assert "| 1, `-M simple` | 48,000 | 50,000 | 0.960 |" in report
    assert "| 25, `-M prepared` | 40,000 | — | — |" in report


def test_a_bytea_case_counts_per_mb_and_says_so(instructions):
    """MB:bytea: round trips of an MB-megabyte bytea; the client count check does not apply."""
    args = instructions.parse_args(["--baseline", "HEAD", "--cases", "16:bytea,1:simple",
                                    "--transactions", "5"])
    assert args.case_list == [(16, "bytea"), (1, "simple")]
    counts = {("pgforkpool", 16, "bytea"): 900_000.0, ("pgforkpool@HEAD", 16, "bytea"): 1_000_000.0}
    report = instructions.render(args, datetime.datetime(2026, 12, 3, 8, 0), counts)
    assert "| 16 MB bytea round trips, per MB | 900,000 | 1,000,000 | 0.900 |" in report
    assert "instructions per MB moved each way" in report
