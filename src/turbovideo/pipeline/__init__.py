"""Text/image to video: the request types and the pipeline that runs them."""

from turbovideo.pipeline.pipeline import VideoPipeline
from turbovideo.pipeline.request import GenerationRequest, GenerationResult, ProgressEvent

__all__ = ["GenerationRequest", "GenerationResult", "ProgressEvent", "VideoPipeline"]
