"""The one exception type for user mistakes: the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """A mistake in the user's input (config, file, argument), not a bug in amc.

    The message names the file, the field and the problem, e.g.
    ``configs/x.yaml: search.target: must be in (0, 1], got 1.5``.
    """

    def __init__(self, message: str, *, where: str | None = None, field: str | None = None):
        parts = [p for p in (where, field) if p]
        super().__init__(": ".join(parts + [message]))
