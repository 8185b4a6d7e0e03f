"""The one error of the multi-GPU runtime, importable without torch.distributed (the worker's start-up needs it)."""


class ParallelError(RuntimeError):
    """The multi-GPU group failed; the worker cannot serve again and asks to be replaced."""
