"""The typer application the commands of :mod:`flowspec.cli` register on: ``--version``, ``-h``,
shell completion, and a help page that shows flags as flags and each command's first sentence whole.

Nothing here imports torch (nor does flowspec.cli at module level): ``flowspec --help``,
``--version`` and completion answer at once, and each command imports what it uses.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup


class Commands(TyperGroup):
    """The command list of ``flowspec --help``: each command's first sentence, wrapped rather than
    cut at the terminal's width with "..." (click's default)."""

    # Any: recent typer passes its vendored click's Context and HelpFormatter, older typer click's own
    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _print_version(value: bool) -> None:
    if value:
        from flowspec import __version__

        print(f"flowspec {__version__}")
        raise typer.Exit()


# rich_markup_mode=None: the plain help layout, where a boolean option reads `--force` (typer's rich
# panels print `--force <bool>`, `--help <bool>`)
app = typer.Typer(cls=Commands, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Train flow maps (consistency models) from TOML specs.")


@app.callback()
def _options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                          help="print the version and exit")) -> None:
    """Train flow maps (consistency models) from TOML specs."""
