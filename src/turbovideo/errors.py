"""Errors a user can act on. Each message is one sentence naming the field and the limit."""


class InputError(ValueError):
    """The request asks for something invalid (answered as ``E_INPUT: <message>``)."""
