"""User-facing errors: each message is one line naming the problem and the valid choices."""


class KVStackError(ValueError):
    """Base of every error caused by bad input; the CLI prints it in one line and exits with status 2."""


class InputError(KVStackError):
    """Bad input (prompt, model): the message is one line naming the problem and the valid choices."""
