"""User-facing errors.

Every problem a user can cause (bad path, wrong checkpoint, unreadable image, ...) is raised
as a ``VitcError`` whose message is one line that says what was wrong and what to do.
The CLI prints that line and exits non-zero; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations


class VitcError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class MissingExtraError(VitcError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str):
        super().__init__(f"{module} is not installed", f"install it with: pip install 'vitc[{extra}]'")


def require(module: str, extra: str):
    """Import an optional heavy dependency, or fail with the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module, extra) from exc
