"""What the standalone scripts (`python -m bench.X`) share of their command line."""

from __future__ import annotations

import argparse


def script_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A script's argument parser: its name, and its docstring as written for --help (under -m, argparse
    would name it after its file, and reflow the docstring's lists and usage lines into one paragraph)."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
