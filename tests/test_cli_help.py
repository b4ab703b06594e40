"""`python core/main.py --help` reads right: one table of flags (core.config.CLI_FLAGS) builds the
parser, the help and the overrides; defaults print as the flag takes them; each side of a paired
switch says which one is in effect when neither is given."""
from __future__ import annotations

import re

import pytest

from core.config import CLI_FLAGS, CLI_SWITCH_PAIRS, Config, cli_flag_help
from core.main import _build_parser, _overrides


@pytest.fixture(scope="module")
def help_text() -> str:
    # One help entry per line: argparse wraps to the terminal width, so the text is unwrapped.
    return re.sub(r"\s+", " ", _build_parser(Config()).format_help())


def test_list_defaults_print_as_typed_on_the_command_line(help_text):
    assert "--mtf-timeframes LIST MTF consensus timeframes in minutes, comma-separated (default: 1,5,15)" in help_text
    assert "(1, 5, 15)" not in help_text and "(default: None)" not in help_text


def test_each_side_of_a_switch_pair_says_which_is_in_effect(help_text):
    config = Config()
    for on_flag, off_flag in CLI_SWITCH_PAIRS:
        on = next(entry for entry in CLI_FLAGS if entry.flag == on_flag)
        default_on = bool(config.get(on.field))
        in_effect, other = (on_flag, off_flag) if default_on else (off_flag, on_flag)
        assert re.search(re.escape(in_effect) + r" [^-]*\(in effect by default; sets " + re.escape(on.field), help_text)
        assert f"(not by default: {in_effect} is in effect; sets {on.field})" in help_text
        assert other in help_text


def test_the_help_follows_the_configured_defaults():
    # The table states no defaults of its own: a different config default shows in the help.
    config = Config().override({"mtf.timeframes": "5,15", "mtf.use_mtf": True, "strategy.dte_min": 25})
    text = re.sub(r"\s+", " ", _build_parser(config).format_help())
    assert "(default: 5,15)" in text and "shortest expiry in days (default: 25)" in text
    assert "--use-mtf MTF consensus filter on: enter only when C is inside the consensus band (in effect by default" \
        in text


def test_every_table_flag_is_parsed_into_its_setting():
    parser = _build_parser(Config())
    paths = set(Config.field_paths())
    for entry in CLI_FLAGS:
        assert entry.field in paths, entry.flag
        if entry.sets is not None:
            args = parser.parse_args([entry.flag])
            assert _overrides(args)[entry.field] is entry.sets
        else:
            value = entry.choices[-1] if entry.choices else {int: "3", float: "0.5", str: "x"}[entry.kind]
            args = parser.parse_args([entry.flag, value])
            assert _overrides(args)[entry.field] == entry.kind(value), entry.flag


def test_a_switch_that_is_already_the_default_says_so():
    entry = next(entry for entry in CLI_FLAGS if entry.flag == "--no-plot")
    assert "off by default" in cli_flag_help(entry, True)
    assert "already the default" in cli_flag_help(entry, False)
