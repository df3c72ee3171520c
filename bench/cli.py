"""What the standalone scripts (`python -m bench.X`) share of their command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def script_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A script's argument parser: its name, and its docstring as written for --help (under -m, argparse
    would name it after its file, and reflow the docstring's lists and usage lines into one paragraph)."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def distinct_names(option: str, choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type for `option`: a comma-separated list of `choices`, each at most once, in the order given."""

    def parse(names: str) -> list[str]:
        chosen = names.split(",")
        if set(chosen) - set(choices) or len(set(chosen)) != len(chosen):
            raise argparse.ArgumentTypeError(f"{option} takes distinct names among {', '.join(choices)}")
        return chosen

    return parse
