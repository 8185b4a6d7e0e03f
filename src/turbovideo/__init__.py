"""turbovideo: fast TurboDiffusion video generation as a RunPod serverless worker."""

__version__ = "0.1.0"
