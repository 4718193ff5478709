#!/usr/bin/env python3
"""Dovetail command line: ``python launch.py {fetch,generate,bench} --help``."""

import sys

from dovetail.cli import main

if __name__ == "__main__":
    sys.exit(main())
