"""Text/image to video: the request types and the pipeline that runs them."""

from turbovideo.pipeline.pipeline import HostMemoryError, VideoPipeline
from turbovideo.pipeline.request import GenerationRequest, GenerationResult, ProgressEvent

__all__ = ["GenerationRequest", "GenerationResult", "HostMemoryError", "ProgressEvent", "VideoPipeline"]
