"""Error types, each with the process exit code the command line uses for it."""


class SlimmerError(Exception):
    """Base class of the errors slimmer reports to a user as one line, without a traceback."""

    exit_code = 1


class InputError(SlimmerError):
    """Bad input: a recipe, a model file, a checkpoint or a data folder. Exit code 2."""

    exit_code = 2


class RecipeError(InputError):
    """A recipe that does not match the schema; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        self.source = source
        if len(self.problems) == 1:
            message = f"invalid {source}: {self.problems[0]}"
        else:
            message = f"invalid {source} ({len(self.problems)} problems): " + "; ".join(self.problems)
        super().__init__(message)


class ModelLoadError(InputError):
    """A model file that cannot be loaded, or a checkpoint that does not fit its architecture."""


class DataError(InputError):
    """A dataset named by a recipe that cannot be built or read."""


class CheckFailedError(SlimmerError):
    """A verification that failed: ONNX parity outside tolerance, a broken compressed model. Exit code 3."""

    exit_code = 3


class FinetuneInterrupted(KeyboardInterrupt):
    """Ctrl-C during fine-tuning, raised after the checkpoint of the last finished step was saved.

    It is a ``KeyboardInterrupt``, so code that stops on Ctrl-C still stops.
    """

    def __init__(self, step: int, total_steps: int):
        super().__init__(f"interrupted after fine-tune step {step} of {total_steps}")
        self.step = step
        self.total_steps = total_steps
