"""Benchmarks, studies and the decode fuzzer.

Each script runs from the repository root as ``python benchmarks/<name>.py``. The tests import the
modules they check as a package (``from benchmarks import load``); pyproject.toml's pytest
``pythonpath`` puts the root on the path for that.
"""
