"""The one error type for bad input.

Anything a person typed (a model name, a flag, a scenario field, a dataset) that cannot be
used raises ``InputError`` with a message that says what would be valid. The CLI turns it
into exit code 2 and ``{"error": "..."}``; the UI shows it next to the field.
"""


class InputError(ValueError):
    """Bad input, with a message a person can act on."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def to_json(self) -> dict:
        out = {"error": str(self)}
        if self.field:
            out["field"] = self.field
        return out


def choices(name: str, value, allowed) -> InputError:
    """An InputError for a value outside a known set, listing the set."""
    allowed = sorted(allowed)
    shown = ", ".join(map(str, allowed[:60])) + (" ..." if len(allowed) > 60 else "")
    return InputError(f"unknown {name} {value!r}; known: {shown}", field=name)
