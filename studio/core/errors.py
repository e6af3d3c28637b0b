"""Errors meant for the user: one paragraph that says what went wrong and what to do."""


class StudioError(Exception):
    """A failure the user can act on. The CLI prints it without a traceback; the GUI shows it in a dialog."""


class ModelLoadError(StudioError):
    pass


class RecipeError(StudioError):
    pass


class ExportError(StudioError):
    pass


class EvaluationError(StudioError):
    pass


class Cancelled(Exception):
    """Raised inside a run when the user asked to stop; the runner turns it into a RunCancelled event."""
