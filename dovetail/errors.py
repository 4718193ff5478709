"""Errors that reach the user as a one-line message (exit status 2 on the CLI)."""


class UserError(ValueError):
    """Bad input or an impossible request: shown as one line, never as a traceback."""


class EngineError(RuntimeError):
    """A request failed inside the engine (a worker failed or died); the engine itself recovers."""
