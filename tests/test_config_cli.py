"""Flags derived from settings dataclasses (lora_kit/config_cli.py): the kinds of flag it makes, and
``lora-kit serve``'s server flags derived from ServerConfig (names, help and defaults as before)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from lora_kit.config_cli import add_dataclass_args, dataclass_from_args, field_docs, flag_of
from lora_kit.server.config import ServerConfig


@dataclass
class Switches:
    """A settings class with every kind of flag the module derives."""

    verbose: bool = False
    """say more"""

    color: bool = True
    """colour the output"""

    ui: bool = field(default=True, metadata={"flag": "--no-ui"})
    """do not serve the page"""

    root: list[str] = field(default_factory=list, metadata={"flag": "--root", "metavar": "DIR"})
    """a root (repeatable)"""

    internal: int = field(default=3, metadata={"flag": None})
    """set by code only"""


def parse(*argv: str) -> Switches:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Switches)
    return dataclass_from_args(Switches, parser.parse_args(argv))


def test_bool_and_list_fields_become_switches_and_repeatable_flags():
    assert parse() == Switches()
    assert parse("--verbose", "--no-color", "--no-ui", "--root", "a", "--root", "b") == Switches(
        verbose=True, color=False, ui=False, root=["a", "b"]
    )
    assert parse("--color").color is True  # BooleanOptionalAction: both spellings
    assert parse().root == [] and parse("--root", "x").root == ["x"] and parse().root == []  # the default is not shared
    with pytest.raises(SystemExit):
        parse("--internal", "4")  # a field without a flag


def serve_actions() -> dict[str, argparse.Action]:
    from lora_kit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {opt: action for action in sub.choices["serve"]._actions for opt in action.option_strings}


def test_serve_keeps_its_server_flags_with_the_fields_docstrings_as_help():
    flags = serve_actions()
    expected = [
        "--host", "--port", "--api-token", "--allow-unauthenticated", "--enable-management", "--adapter-root",
        "--allowed-host", "--max-tokens-cap", "--graceful-timeout", "--no-ui", "--log-level",
    ]  # fmt: skip
    with_flags = [f for f in dataclasses.fields(ServerConfig) if flag_of(f) is not None]
    assert [flag_of(f) for f in with_flags] == expected
    docs = field_docs(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        assert docs[f.name], f.name
        if flag_of(f) is not None:
            assert flags[flag_of(f)].dest == f.name and flags[flag_of(f)].help.startswith(docs[f.name])
    assert "--max-body-bytes" not in flags and "--uploads-dir" not in flags  # set by code only
    assert flags["--port"].help == "port (default: 8000; 0 picks a free one)" and flags["--port"].default == 8000
    assert flags["--max-tokens-cap"].help == "upper bound applied to max_tokens (default: 4096)"
    assert flags["--log-level"].choices == ["debug", "info", "warning", "error"]


def test_server_config_round_trips_through_the_serve_flags(monkeypatch):
    from lora_kit.cli import build_parser

    monkeypatch.delenv("LORA_KIT_API_TOKEN", raising=False)
    parser = build_parser()
    assert ServerConfig.from_cli_args(parser.parse_args(["serve"])) == ServerConfig()
    argv = ["serve", "--host", "0.0.0.0", "--port", "9", "--allow-unauthenticated", "--enable-management"]
    argv += ["--adapter-root", "/a", "--adapter-root", "/b", "--max-tokens-cap", "5", "--graceful-timeout", "2.5"]
    argv += ["--no-ui", "--log-level", "debug"]
    assert ServerConfig.from_cli_args(parser.parse_args(argv)) == ServerConfig(
        host="0.0.0.0",
        port=9,
        allow_unauthenticated=True,
        enable_management=True,
        adapter_roots=["/a", "/b"],
        max_tokens_cap=5,
        graceful_timeout=2.5,
        serve_ui=False,
        log_level="debug",
    )


def test_the_token_comes_from_the_flag_else_the_environment(monkeypatch):
    from lora_kit.cli import build_parser

    parser = build_parser()
    monkeypatch.setenv("LORA_KIT_API_TOKEN", "from-env")
    assert ServerConfig.from_cli_args(parser.parse_args(["serve"])).api_token == "from-env"
    assert ServerConfig.from_cli_args(parser.parse_args(["serve", "--api-token", "flag"])).api_token == "flag"
    assert ServerConfig(api_token="").api_token is None  # built in code: no environment, empty = none
    assert ServerConfig().management is False and ServerConfig(api_token="t").management is True
    with pytest.raises(ValueError, match="log_level"):
        ServerConfig(log_level="loud")  # type: ignore[arg-type]
