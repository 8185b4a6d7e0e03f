"""The RunPod serverless worker around the pipeline.

``startup.create_handler`` reads the settings (``config``), loads every served model once and
returns the job handler (``service``), which validates a request (``schema``, ``inputs``), runs the
pipeline and delivers the video (``storage``). ``checkpoints`` and ``compile_cache`` keep weights
and compiled kernels on the cache volume.
"""
