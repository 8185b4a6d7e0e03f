"""The advice a refused request gets: the nearest request that would be accepted, never one it cannot make."""

from turbovideo.catalog import MODELS
from turbovideo.pipeline.refusals import what_fits
from turbovideo.pipeline.request import GenerationRequest

SPEC = MODELS["TurboWan2.1-T2V-14B-720P"]
NOWHERE = "does not fit on this GPU, not even"


def request(**fields) -> GenerationRequest:
    return GenerationRequest(prompt="a fox", task="t2v", **{"num_frames": 81, "num_samples": 2, **fields})


def test_fewer_samples_or_frames_are_named_first():
    advice = what_fits(request(), SPEC, lambda r: r.num_samples * r.num_frames <= 81, NOWHERE)
    assert advice == "it fits with num_samples at most 1 or num_frames at most 37"


def test_both_together_when_neither_alone_fits():
    advice = what_fits(request(), SPEC, lambda r: r.num_samples == 1 and r.num_frames <= 45, NOWHERE)
    assert advice == "it fits with num_samples 1 and num_frames at most 45"


def test_a_lower_resolution_with_its_own_limits():
    def accepts(r: GenerationRequest) -> bool:
        return r.resolution == "480p" and r.num_frames <= 61

    advice = what_fits(request(resolution="720p"), SPEC, accepts, NOWHERE)
    assert advice == "it fits at resolution 480p with num_frames at most 61"


def test_nothing_fits():
    advice = what_fits(request(), SPEC, lambda r: False, NOWHERE)
    assert advice == f"model {SPEC.name} {NOWHERE} one 480p 16:9 sample of 5 frames"
