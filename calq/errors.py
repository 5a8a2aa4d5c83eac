"""User-facing errors: each carries the problem and the fix, printed as one line by the CLI."""


class CalqError(Exception):
    """A problem the user can fix. `fix` says how."""

    exit_code = 2

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" — {fix}" if fix else ""))


class RecipeError(CalqError):
    pass


class DatasetError(CalqError):
    pass


class ModelError(CalqError):
    pass


class ExpectationFailed(CalqError):
    """A recipe's `expect:` block was not met (exit 3)."""

    exit_code = 3
