"""The one exception type for user mistakes.

Every error a user can cause (bad flag, missing file, a plan for another model, a budget
below the smallest feasible one) is raised as :class:`BitsearchError` with a one-line message;
the CLI prints it and exits non-zero without a traceback.
"""

__all__ = ["BitsearchError"]


class BitsearchError(Exception):
    """A user-facing error: the message is one line that names the problem."""
