"""The build under test is the one asked for: compiled by default, pure Python with PGFORKPOOL_PURE=1."""

import os
import subprocess
import sys

import pgforkpool


def test_the_build_is_the_one_asked_for():
    expected = "pure Python" if os.environ.get("PGFORKPOOL_PURE") == "1" else "compiled (mypyc)"
    assert pgforkpool.build() == expected


def test_version_says_which_build_runs():
    program = os.path.join(os.path.dirname(sys.executable), "pgforkpool")
    out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.startswith("pgforkpool ") and pgforkpool.build() in out.stdout
