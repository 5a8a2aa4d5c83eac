"""User-facing errors: each carries the problem and the fix, printed as one line by the CLI."""


class CalqError(Exception):
    """A problem the user can fix. `fix` says how."""

    exit_code = 2

    def __init__(self, problem: str, fix: str = ""):
        # One line whatever the message quotes (a library's multi-line text, a file's contents).
        self.problem = " ".join(str(problem).split())
        self.fix = " ".join(str(fix).split())
        super().__init__(self.problem + (f" — {self.fix}" if self.fix else ""))


class RecipeError(CalqError):
    pass


class DatasetError(CalqError):
    pass


class ModelError(CalqError):
    pass


class ExpectationFailed(CalqError):
    """A recipe's `expect:` block was not met (exit 3)."""

    exit_code = 3
