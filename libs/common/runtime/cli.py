"""The command line every service shares: subcommands plus a settings section in ``--help``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Generic

import msgspec

from libs.common.runtime.service import EXIT_CONFIG
from libs.common.runtime.settings import (
    SettingsError,
    SettingsT,
    describe_settings,
    load_settings,
)

Command = Callable[[argparse.Namespace], int]


class ServiceCli(Generic[SettingsT]):
    """``python -m services.<name> <subcommand>``: argparse with a shared shape."""

    def __init__(self, service: str, description: str, settings_cls: type[SettingsT]) -> None:
        self.service = service
        self.settings_cls = settings_cls
        self.parser = argparse.ArgumentParser(
            prog=f"python -m services.{service}",
            description=description,
            epilog=describe_settings(settings_cls),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.subparsers = self.parser.add_subparsers(dest="command", metavar="COMMAND")
        self.commands: dict[str, Command] = {}

    def command(
        self, name: str, help_text: str, run: Command, *, aliases: Sequence[str] = ()
    ) -> argparse.ArgumentParser:
        """Add a subcommand (also known by ``aliases``); returns its parser so arguments can
        be added."""
        parser = self.subparsers.add_parser(
            name,
            aliases=list(aliases),
            help=help_text,
            description=help_text,
            epilog=describe_settings(self.settings_cls),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for command in (name, *aliases):
            self.commands[command] = run
        return parser

    def settings(self, **overrides: object) -> SettingsT:
        """Load this service's settings (with ``overrides`` from the command line, checked
        like the rest), exiting with a clear message when malformed."""
        try:
            settings = load_settings(self.settings_cls)
            return msgspec.structs.replace(settings, **overrides) if overrides else settings
        except (SettingsError, msgspec.ValidationError) as exc:
            print(f"{self.service}: bad setting: {exc}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)

    def main(self, argv: Sequence[str] | None = None, default: str = "run") -> int:
        """Parse ``argv`` and run the chosen subcommand (``default`` when none is given)."""
        args_list = list(sys.argv[1:] if argv is None else argv)
        if not args_list or (
            args_list[0] not in self.commands
            and args_list[0].startswith("-")
            and args_list[0] not in ("-h", "--help")
        ):
            args_list.insert(0, default)
        args = self.parser.parse_args(args_list)
        if args.command is None:
            args = self.parser.parse_args([default])
        return self.commands[args.command](args)
