"""What a refused request is told: the nearest request that would be accepted."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from turbovideo import catalog
from turbovideo.catalog import ModelSpec
from turbovideo.pipeline.request import GenerationRequest, supported_resolutions


def what_fits(
    request: GenerationRequest, spec: ModelSpec, accepts: Callable[[GenerationRequest], bool], nowhere: str
) -> str:
    """Advice for a refused request: the largest ``num_samples`` or ``num_frames`` that ``accepts``
    with the rest unchanged; else both together, a lower resolution (with the same numbers there),
    or that not even the smallest request fits (``nowhere`` says where: "does not fit on this GPU,
    not even"). It only suggests a change the request can still make."""

    def fits(**change: int | str) -> bool:
        return accepts(dataclasses.replace(request, **change))

    def most_frames(**change: int | str) -> int | None:
        below = range(request.num_frames - 4, catalog.MIN_FRAMES - 1, -4)
        return next((f for f in below if fits(num_frames=f, **change)), None)

    def limits(**change: str) -> str | None:
        """The largest num_samples or num_frames that fit with ``change``, else one sample's frames."""
        samples = next(
            (n for n in range(request.num_samples - 1, 0, -1) if fits(num_samples=n, **change)), None
        )
        frames = most_frames(**change)
        found = [f"num_samples at most {samples}"] if samples else []
        found += [f"num_frames at most {frames}"] if frames else []
        if found:
            return " or ".join(found)
        if request.num_samples > 1 and (together := most_frames(num_samples=1, **change)):
            return f"num_samples 1 and num_frames at most {together}"
        return None

    lowest = supported_resolutions(spec)[0]
    above_lowest = (request.resolution or spec.default_resolution) != lowest
    if found := limits():
        return f"it fits with {found}"
    if above_lowest and fits(resolution=lowest):
        return f"it fits at resolution {lowest}"
    if above_lowest and (found := limits(resolution=lowest)):
        return f"it fits at resolution {lowest} with {found}"
    shape = "" if request.adaptive_resolution else f" {request.aspect_ratio}"
    return f"model {spec.name} {nowhere} one {lowest}{shape} sample of {catalog.MIN_FRAMES} frames"
