"""docs/operations.md's flag tables name exactly the flags the parsers take, with their env
vars and defaults: a flag added, renamed or given another default shows here first."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from gateway import config as gateway_config
from worker import config as worker_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def parser_rows(parser: argparse.ArgumentParser) -> dict[str, tuple[str, str]]:
    rows = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        env = re.search(r"\[env (BATCHWIRE_\w+)\]", action.help or "")
        assert env, f"{action.option_strings[0]}: its help names no env var"
        default = "unset" if action.default in (None, "", ()) else str(action.default)
        rows[action.option_strings[0]] = (env.group(1), default)
    return rows


def doc_rows(command: str) -> dict[str, tuple[str, str]]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split(f"### `batchwire {command}`", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `--"):
            continue
        flag, env, default = (cell.strip().strip("`") for cell in line.strip("|").split(" | ")[:3])
        rows[flag.split()[0]] = (env, default)
    return rows


def test_the_flag_tables_match_the_parsers():
    parser = gateway_config.build_parser({})
    commands = next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    for command, sub in (("serve", commands["serve"]), ("gateway", commands["gateway"]),
                         ("worker", worker_config.build_parser({}))):
        documented, real = doc_rows(command), parser_rows(sub)
        assert sorted(documented) == sorted(real), command
        for flag, (env, default) in real.items():
            doc_env, doc_default = documented[flag]
            assert doc_env == env, f"{command} {flag}"
            # A default resolved at start ("16 on cpu, 32 on a GPU") is written out in words.
            assert doc_default == default or default == "unset", f"{command} {flag}: " \
                f"documented {doc_default!r}, the parser's is {default!r}"
