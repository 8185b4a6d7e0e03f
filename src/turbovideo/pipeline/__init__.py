"""Text/image to video: the request types and the pipeline that runs them.

Public names are resolved lazily, so that the request types can be imported without loading the models.
"""

from turbovideo.lazy import lazy_exports

_EXPORTS = {
    "GenerationRequest": "request",
    "GenerationResult": "request",
    "ProgressEvent": "request",
    "HostMemoryError": "host_memory",
    "VideoPipeline": "pipeline",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
