"""The request schema: strict types, every bound enforced, every error one line naming field and limit."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbovideo.errors import InputError
from turbovideo.worker.schema import VideoRequest, VideoResponse, parse_request


def test_minimal_request_takes_the_defaults():
    request = parse_request({"prompt": "a red fox"})
    assert request.prompt == "a red fox"
    assert (request.num_frames, request.num_steps, request.num_samples, request.fps) == (81, 4, 1, 16)
    assert request.seed is None and request.task is None and request.model is None
    assert request.attention == "auto" and request.return_base64 is False
    # README's request table: the rest of the defaults.
    assert (request.boundary, request.sla_topk, request.aspect_ratio, request.expires_in) == (
        0.9,
        0.1,
        "16:9",
        86400,
    )
    assert request.ode is False and request.adaptive_resolution is False and request.sigma_max is None


def test_every_field_accepts_a_valid_value():
    payload = {
        "prompt": "p",
        "image": "https://example.com/a.png",
        "task": "i2v",
        "model": "tiny-i2v",
        "resolution": "720p",
        "aspect_ratio": "9:16",
        "adaptive_resolution": True,
        "num_frames": 161,
        "num_steps": 1,
        "sigma_max": 200,  # an integer is a fine number
        "seed": -1,
        "num_samples": 4,
        "attention": "sla",
        "sla_topk": 0.05,
        "ode": True,
        "boundary": 0.5,
        "fps": 24,
        "expires_in": 10**9,  # clamped later, not refused
        "return_base64": True,
    }
    assert parse_request(payload).model_dump() == {**payload, "sigma_max": 200.0}


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"prompt": "a", "num_frames": 80}, "num_frames must be 4k+1 between 5 and 161, got 80"),
        ({"prompt": "a", "num_frames": 165}, "num_frames must be an integer between 5 and 161, got 165"),
        ({"prompt": "a", "num_frames": "81"}, "num_frames must be an integer between 5 and 161, got '81'"),
        ({"prompt": "a", "num_frames": 81.0}, "num_frames must be an integer between 5 and 161, got 81.0"),
        ({"prompt": "a", "foo": 1}, "unknown field 'foo'"),
        ({"prompt": "a", "steps": 2}, "unknown field 'steps' (did you mean 'num_steps'?)"),
        ({"prompt": "a", "numFrames": 33}, "unknown field 'numFrames' (did you mean 'num_frames'?)"),
        ({"Prompt": "a"}, "prompt is required; unknown field 'Prompt' (did you mean 'prompt'?)"),
        (
            {"prompt": "a", "num_inference_steps": 4},
            "unknown field 'num_inference_steps' (did you mean 'num_steps'? rCM samples in 1 to 4)",
        ),
        (
            {"prompt": "a", "init_image": "x"},
            "unknown field 'init_image' (did you mean 'image'? it takes a URL or base64)",
        ),
        (
            {"prompt": "a", "negative_prompt": "blur"},
            "unknown field 'negative_prompt' (rCM's distilled sampling uses no classifier-free guidance, so no "
            "negative prompt)",
        ),
        (
            {"prompt": "a", "width": 832, "height": 480},
            "unknown field 'width' (the size comes from resolution and aspect_ratio); unknown field 'height'",
        ),
        (
            {"input": {"prompt": "a"}},
            """prompt is required; unknown field 'input' (the request fields go directly in the job's input: """
            """{"input": {"prompt": ...}})""",
        ),
        ({"prompt": "a", "image": ""}, "image must not be empty; leave it out (or null) for text-to-video"),
        (
            {"prompt": "a", "image": " \n"},
            "image must not be empty; leave it out (or null) for text-to-video",
        ),
        ({"prompt": "x" * 5000}, "prompt must be at most 2000 characters, got 5000"),
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": " \n\t"}, "prompt must not be empty"),
        ({"prompt": "&amp;nbsp; \ufeff"}, "prompt must not be empty"),  # nothing left once cleaned
        ({"prompt": "\u200b\u200d"}, "prompt must not be empty"),  # zero-width characters only
        ({"prompt": "a \ud800"}, "prompt must be valid Unicode text, got an unpaired surrogate"),
        ({}, "prompt is required"),
        ({"prompt": None}, "prompt must be a string, got null"),
        ({"prompt": ["a"]}, "prompt must be a string, got a list"),
        ({"prompt": "a", "num_steps": 5}, "num_steps must be an integer between 1 and 4, got 5"),
        ({"prompt": "a", "num_steps": True}, "num_steps must be an integer between 1 and 4, got true"),
        ({"prompt": "a", "num_samples": 5}, "num_samples must be an integer between 1 and 4, got 5"),
        ({"prompt": "a", "seed": -2}, "seed must be an integer between -1 and 4294967295 or null, got -2"),
        (
            {"prompt": "a", "sigma_max": "80"},
            "sigma_max must be a number between 0.1 and 10000.0 or null, got '80'",
        ),
        ({"prompt": "a", "sla_topk": 0}, "sla_topk must be a number greater than 0.0 and at most 1.0, got 0"),
        (
            {"prompt": "a", "boundary": 1.0},
            "boundary must be a number greater than 0.0 and less than 1.0, got 1.0",
        ),
        ({"prompt": "a", "fps": 0}, "fps must be an integer between 1 and 60, got 0"),
        ({"prompt": "a", "expires_in": 0}, "expires_in must be an integer at least 1, got 0"),
        ({"prompt": "a", "ode": "yes"}, "ode must be true or false, got 'yes'"),
        ({"prompt": "a", "return_base64": 1}, "return_base64 must be true or false, got 1"),
        ({"prompt": "a", "task": "v2v"}, "task must be one of 't2v' or 'i2v', got 'v2v'"),
        (
            {"prompt": "a", "attention": "dense"},
            "attention must be one of 'auto', 'sagesla' or 'sla', got 'dense'",
        ),
        (
            {"prompt": "a", "aspect_ratio": "2:1"},
            "aspect_ratio must be one of '16:9', '9:16', '4:3', '3:4' or '1:1', got '2:1'",
        ),
        ({"prompt": "a", "model": 3}, "model must be a string or null, got 3"),
        ({"prompt": "a", "model": ""}, "model must not be empty"),
        ({"prompt": "a", "model": "m" * 101}, "model must be at most 100 characters, got 101"),
        ({"prompt": "a", "image": {"url": "x"}}, "image must be a string or null, got an object"),
        # JSON can carry a lone surrogate in a key too; pydantic reports it without a location.
        (
            {"prompt": "a", "x\ud800": 1},
            "field names must be valid Unicode text, got 'x\\ud800' with an unpaired surrogate",
        ),
        ([], "input must be a JSON object of request fields, got a list"),
        ("a red fox", "input must be a JSON object of request fields, got a string"),
        (None, "input must be a JSON object of request fields, got null"),
    ],
)
def test_bad_requests_get_one_line_naming_the_field_and_limit(payload, message):
    with pytest.raises(InputError) as caught:
        parse_request(payload)
    assert str(caught.value) == message


def test_several_errors_are_joined_on_one_line():
    with pytest.raises(InputError) as caught:
        parse_request({"prompt": "a", "num_steps": 9, "bar": 1, "baz\nqux": 2})
    text = str(caught.value)
    assert "\n" not in text
    assert "num_steps must be an integer between 1 and 4, got 9" in text
    assert "unknown field 'bar'" in text and "unknown field 'baz\\nqux'" in text


@pytest.mark.parametrize(
    "field", [{"resolution": "z" * 10_000}, {"seed": 10**1000}], ids=["string", "number"]
)
def test_long_values_are_cut_short_in_messages(field):
    with pytest.raises(InputError) as caught:
        parse_request({"prompt": "a", **field})
    assert len(str(caught.value)) < 200


def test_response_drops_absent_fields():
    response = VideoResponse(
        video_path="/o/a.mp4",
        thumbnail_path="/o/t.jpg",
        seed=1,
        width=64,
        height=64,
        num_frames=5,
        fps=16,
        duration_s=0.3125,
        model="tiny-t2v",
        attention_backend="sla-torch",
        timings={"total": 1.0},
    )
    dumped = response.model_dump(exclude_none=True)
    assert "video_url" not in dumped and dumped["video_path"] == "/o/a.mp4"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=8,
)
field_names = st.sampled_from([*VideoRequest.model_fields, "foo"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.dictionaries(field_names, json_values, max_size=6)))
def test_any_json_is_either_a_request_or_one_line_error(payload):
    json.dumps(payload)  # the strategy only makes what a job can carry
    try:
        parse_request(payload)
    except InputError as exc:
        text = str(exc)
        assert text and "\n" not in text and len(text) < 2000
