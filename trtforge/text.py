"""Text from outside (a manifest, a recipe, a model's files) as it may be shown on a terminal."""

from __future__ import annotations


def printable(text: object) -> str:
    """One line with control characters escaped: text from a manifest or a recipe is data, and may
    not move the cursor, clear the screen or forge lines of our own."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
