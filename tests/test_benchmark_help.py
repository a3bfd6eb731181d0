"""The reproduction scripts' ``--help``: every option with its default, none with a meaningless "None"."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.parametrize("script", ["reproduce_llm.py", "reproduce_summ.py", "reproduce_mt.py"])
def test_help_gives_defaults_but_not_none(script):
    out = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), "--help"], capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(out.split())
    assert "(default: None)" not in flat
    assert "--threads THREADS" in flat and "(default: 1)" in flat  # defaults still shown
