"""Every stage's command-line tail: arguments, params validation, the `--round` check, bad-input exits.

A stage module declares its paths and hands its work function to `stage_main`:

    def main(argv=None):
        stage_main(__doc__, run, argv, paths={"--out": "where the model goes"}, takes_round=True)

`run(params, args)` does the work and prints its summary. Bad input (invalid params, an unknown
round, a `DataError`) ends the process with one clear message on stderr and exit status 2, which
the Prefect flow does not retry: retrying cannot fix an input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from tasks.lib.errors import DataError
from tasks.lib.params import ParamsError, load_params
from tasks.lib.schema import Params

BAD_INPUT_EXIT = 2
"""Exit status of a stage refused its input (params, data, arguments): retrying cannot help."""

StageWork = Callable[[Params, argparse.Namespace], None]


def exit_bad_input(message: str) -> NoReturn:
    """Stop a stage whose input is wrong, with the message and the exit status orchestrators do not retry."""
    print(message, file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT)


def stage_main(
    description: str | None,
    work: StageWork,
    argv: Sequence[str] | None = None,
    *,
    paths: dict[str, str],
    optional_paths: dict[str, str] | None = None,
    takes_round: bool = False,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Parse the stage's arguments, validate params.yaml, then run `work`; bad input exits with status 2.

    `paths` are required path arguments (`{"--out": help}`); `optional_paths` default to None.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the pipeline's params file")
    if takes_round:
        parser.add_argument("--round", required=True, help="round name, a key of dpo.rounds")
    for flag, help_text in paths.items():
        parser.add_argument(flag, type=Path, required=True, help=help_text)
    for flag, help_text in (optional_paths or {}).items():
        parser.add_argument(flag, type=Path, default=None, help=help_text)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as error:
        exit_bad_input(f"invalid params:\n{error}")
    if takes_round and args.round not in params.dpo.rounds:
        exit_bad_input(f"--round {args.round}: not a key of dpo.rounds ({', '.join(params.dpo.rounds)})")
    try:
        work(params, args)
    except DataError as error:
        exit_bad_input(f"bad data:\n{error}")
