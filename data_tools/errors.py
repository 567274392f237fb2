"""The one base of the errors a user can fix: a bad file, row, option or run id, missing weights.

Step entry points show these as one line naming the problem (`pipelines.common.cli_step`);
any other exception is a bug in the workbench and keeps its traceback.
"""


class UserError(Exception):
    """Something the user gave is wrong or missing; the message names it (and what to do)."""


class ConfigError(UserError, ValueError):
    """A parameter value is wrong or does not fit the data or runs it refers to."""
