"""Errors a user can act on. Each message is one sentence naming the field and the limit."""


class InputError(ValueError):
    """The request asks for something invalid (answered as ``E_INPUT: <message>``)."""


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with its whitespace collapsed onto one line and cut to ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
