"""The ``slimmer`` command: ``apply`` compresses a model with a recipe, ``validate`` checks a recipe.

Exit codes: 0 success, 2 bad input (recipe, model file, data), 3 a check failed (ONNX parity,
a broken compressed model, a diverged fine-tune), 1 internal error, 130 interrupted. Errors go
to stderr as one line; the result table goes to stdout. When a run that saved a fine-tuning
checkpoint stops early, that line also names the work folder and the command that resumes the run,
or after a failed check the command that starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import traceback
from pathlib import Path

from slimmer.errors import CheckFailedError, FinetuneInterrupted, InputError, SlimmerError

logger = logging.getLogger("slimmer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimmer", description="Compress a trained PyTorch CNN and prove the speed-up.")
    commands = parser.add_subparsers(dest="command", required=True)

    apply = commands.add_parser("apply", help="compress a model with a recipe and export ONNX with a report")
    apply.add_argument("recipe", type=Path, help="recipe YAML file")
    apply.add_argument("model", type=Path, help="model file: a checkpoint or state_dict written by torch.save")
    apply.add_argument("-o", "--output", type=Path, default=Path("out"), help="output folder (default: out)")
    apply.add_argument("--force", action="store_true",
                       help="replace an existing output folder and discard the partial work of an interrupted run")
    apply.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from the checkpoint in the work folder <output>.partial")
    apply.add_argument("--allow-pickle", action="store_true",
                       help="allow loading a whole pickled nn.Module (unpickling runs code from the file)")
    apply.add_argument("--quiet", action="store_true", help="print only errors")
    apply.add_argument("--json", action="store_true", help="print report.json to stdout instead of the table")
    apply.add_argument("-v", "--verbose", action="store_true", help="log every layer change")

    validate = commands.add_parser("validate", help="check a recipe without loading a model")
    validate.add_argument("recipe", type=Path)
    for command in (apply, validate):
        command.epilog = ("Recipe overrides go anywhere after the command as key=value, parsed as YAML, for example "
                          "seed=1 steps[0].decompose.rank.ratio=0.4")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse options; every other argument of the form key=value is a recipe override."""
    parser = _parser()
    arguments, extra = parser.parse_known_args(argv)
    arguments.overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in arguments.overrides]
    if unknown:
        hint = ""
        if any(not item.startswith("-") for item in unknown):
            hint = "; recipe overrides are written key=value, for example seed=1"
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return arguments


def _configure_logging(quiet: bool, verbose: bool) -> None:
    level = logging.INFO
    if quiet:
        level = logging.ERROR
    elif verbose:
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    if not verbose:
        for noisy in ("slimmer.decompose", "slimmer.prune", "slimmer.cost", "slimmer.export"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _run_validate(arguments: argparse.Namespace) -> int:
    from slimmer.recipe import load_recipe

    recipe = load_recipe(arguments.recipe, arguments.overrides)
    count = len(recipe.steps)
    print(f"{arguments.recipe}: valid ({count} step{'' if count == 1 else 's'}: "
          f"{', '.join(type(step).__name__.removesuffix('Step').lower() for step in recipe.steps) or 'none'})")
    return 0


def _run_apply(arguments: argparse.Namespace) -> int:
    from slimmer.checkpoint import work_dir
    from slimmer.model_io import load_model_and_source
    from slimmer.pipeline import apply, check_output_dir, search_path
    from slimmer.recipe import load_recipe
    from slimmer.report import format_summary

    recipe = load_recipe(arguments.recipe, arguments.overrides)
    output = arguments.output
    check_output_dir(output, arguments.force)
    model_path = arguments.model.resolve()
    for folder, label in ((output, "output folder"), (work_dir(output), "work folder")):
        if model_path == folder.resolve() or model_path.is_relative_to(folder.resolve()):
            raise InputError(f"{label} {folder} contains the input model {arguments.model}; choose another -o")

    model_config = recipe.model
    model, architecture = load_model_and_source(
        arguments.model, model_config.architecture, model_config.kwargs, model_config.state_dict_key,
        model_config.strip_prefix, arguments.allow_pickle or model_config.allow_pickle, search_path(recipe))

    _, report = apply(model, recipe, output_dir=output, progress=not arguments.quiet and sys.stderr.isatty(),
                      architecture=architecture, force=arguments.force, resume=arguments.resume)
    if arguments.json:
        print(json.dumps(report, indent=2, default=str))
    elif not arguments.quiet:
        print(format_summary(report))
        print(f"\nWrote {output}/: model.onnx, model.pt, report.json, report.md, recipe.resolved.yaml")
    return 0


def _partial_work_note(error: BaseException, argv: list[str]) -> str:
    """Say where the partial work of a stopped run is and how to go on; empty when there is none.

    An interrupt or a crash is resumed. A failed check, such as a diverged fine-tune, usually needs
    other step settings, which a resume rejects, so that note gives the command that starts over.
    """
    folder = getattr(error, "partial_work", None)
    if folder is None:
        return ""
    if isinstance(error, CheckFailedError):
        command = [item for item in argv if item != "--resume"]
        if "--force" not in command:
            command.append("--force")
        return (f"; after fixing the cause, start over with --force, which discards the partial work in {folder}: "
                f"slimmer {shlex.join(command)}")
    command = argv if "--resume" in argv else [*argv, "--resume"]
    return f"; partial work is in {folder}; resume with: slimmer {shlex.join(command)}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = _parse(argv)
    _configure_logging(getattr(arguments, "quiet", False), getattr(arguments, "verbose", False))
    try:
        if arguments.command == "validate":
            return _run_validate(arguments)
        return _run_apply(arguments)
    except SlimmerError as error:
        print(f"slimmer: error: {error}{_partial_work_note(error, argv)}", file=sys.stderr)
        return error.exit_code
    except FinetuneInterrupted as interrupt:
        print(f"slimmer: {interrupt}; no output was written{_partial_work_note(interrupt, argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt as interrupt:
        print(f"slimmer: interrupted; no output was written{_partial_work_note(interrupt, argv)}", file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(error, "partial_work", None) is None:
            raise
        traceback.print_exc()
        print(f"slimmer: internal error: {type(error).__name__}: {error}{_partial_work_note(error, argv)}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
