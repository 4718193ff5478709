#!/usr/bin/env python3
"""Dovetail command line: ``python launch.py {serve,fetch,generate,train-draft,bench} --help``.

The installed ``dovetail`` command is the same, less ``bench``: the benchmarks live in this
checkout's ``bench/`` package, not in the library.
"""

import sys

import bench
from dovetail.cli import main

if __name__ == "__main__":
    sys.exit(main(extra={"bench": (bench.HELP, bench.add_bench_args, bench.run)}))
