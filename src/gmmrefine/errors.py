"""User-facing errors.

Anything wrong with what the user gave us (files, columns, values, options) is raised as
:class:`InputError` with one sentence naming the file, the field and what was expected. The CLI turns
it into ``error: <sentence>`` on stderr and exit code 2, with no traceback and nothing written.
"""

from __future__ import annotations

EXIT_INPUT_ERROR = 2


class InputError(Exception):
    """Bad input: one sentence that names the file, the field and what was expected."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        self.path = path
        self.field = field
        super().__init__(message)
