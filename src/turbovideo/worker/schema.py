"""The request a job carries and the response it gets, as pydantic models.

Requests are validated strictly (no "81" for 81, no 1 for true, no unknown fields) so that a client
finds its mistake in the first answer, and every validation error is flattened into one line that
names the field and the limit. Model-level limits (which resolutions a model has, how many frames
fit) are the pipeline's to check; this module only knows the limits every model shares.
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from turbovideo.catalog import (
    DEFAULT_BOUNDARY,
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_SLA_TOPK,
    DEFAULT_STEPS,
    MAX_FPS,
    MAX_FRAMES,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_STEPS,
    MIN_FRAMES,
    SIGMA_MAX_RANGE,
)
from turbovideo.errors import InputError
from turbovideo.models.tokenizer import is_blank

MAX_PROMPT_CHARS = 2000
# Presigned URLs live at most 7 days (S3 and R2 both refuse longer); longer requests are clamped.
MAX_EXPIRES_S = 7 * 24 * 3600
DEFAULT_EXPIRES_S = 24 * 3600


def _four_k_plus_one(frames: int) -> int:
    if frames % 4 != 1:
        raise ValueError(f"num_frames must be 4k+1 between {MIN_FRAMES} and {MAX_FRAMES}, got {frames}")
    return frames


def _not_blank(prompt: str) -> str:
    if is_blank(prompt):
        raise ValueError("prompt must not be empty")
    return prompt


def _image_given(image: str) -> str:
    if not image.strip():  # a form's empty field: the client most likely meant no image at all
        raise ValueError("image must not be empty; leave it out (or null) for text-to-video")
    return image


class VideoRequest(BaseModel):
    """The ``input`` of a job. Omitted optional fields take the served model's defaults."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_not_blank)]
    # http(s) URL, data URI or base64; size limits live in inputs.py
    image: Annotated[str, AfterValidator(_image_given)] | None = None
    task: Literal["t2v", "i2v"] | None = None
    # "" names no model (leave the field out for the default).
    model: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    resolution: Literal["480p", "720p", "tiny"] | None = None
    aspect_ratio: Literal["16:9", "9:16", "4:3", "3:4", "1:1"] = "16:9"
    adaptive_resolution: bool = False
    num_frames: Annotated[int, Field(ge=MIN_FRAMES, le=MAX_FRAMES), AfterValidator(_four_k_plus_one)] = (
        DEFAULT_FRAMES
    )
    num_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = DEFAULT_STEPS
    sigma_max: Annotated[float, Field(ge=SIGMA_MAX_RANGE[0], le=SIGMA_MAX_RANGE[1])] | None = None
    seed: Annotated[int, Field(ge=-1, le=MAX_SEED)] | None = None  # None or -1: a random seed
    num_samples: Annotated[int, Field(ge=1, le=MAX_SAMPLES)] = 1
    attention: Literal["auto", "sagesla", "sla"] = "auto"
    sla_topk: Annotated[float, Field(gt=0.0, le=1.0)] = DEFAULT_SLA_TOPK
    ode: bool = False
    boundary: Annotated[float, Field(gt=0.0, lt=1.0)] = DEFAULT_BOUNDARY
    fps: Annotated[int, Field(ge=1, le=MAX_FPS)] = DEFAULT_FPS
    expires_in: Annotated[int, Field(ge=1)] = DEFAULT_EXPIRES_S
    return_base64: bool = False


class VideoResponse(BaseModel):
    """A finished job. URLs when a bucket is configured, local paths otherwise."""

    model_config = ConfigDict(extra="forbid")

    video_url: str | None = None
    videos: list[str] | None = None  # every sample's URL, when there are several
    thumbnail_url: str | None = None
    video_path: str | None = None
    video_paths: list[str] | None = None
    thumbnail_path: str | None = None
    video_base64: str | None = None
    videos_base64: list[str] | None = None
    thumbnail_base64: str | None = None
    seed: int
    width: int
    height: int
    num_frames: int
    fps: int
    duration_s: float
    model: str
    attention_backend: str
    timings: dict[str, float]
    warnings: list[str] | None = None  # the job succeeded, but not quite as asked (one line each)


def parse_request(payload: Any) -> VideoRequest:
    """Validate a job's ``input``; raises ``InputError`` with one line naming each bad field."""
    try:
        return VideoRequest.model_validate(payload)
    except ValidationError as exc:
        raise InputError(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    parts: list[str] = []
    hints: set[str] = set()  # width and height share theirs: said once
    for error in exc.errors(include_url=False):
        part = _describe(error)
        if error["type"] == "extra_forbidden" and error["loc"]:
            hint = _hint(str(error["loc"][0]))
            part += "" if hint in hints else hint
            hints.add(hint)
        parts.append(part)
    return "; ".join(parts)


def _describe(error: Any) -> str:
    kind, loc, value = error["type"], error["loc"], error.get("input")
    ctx = error.get("ctx") or {}
    if not loc:
        if kind == "string_unicode":  # a field name: pydantic reports bad keys without a location
            return f"field names must be valid Unicode text, got {_show(value)} with an unpaired surrogate"
        return f"input must be a JSON object of request fields, got {_json_kind(value)}"
    field = str(loc[0])
    if kind == "extra_forbidden":
        return f"unknown field {field!r}"  # describe_errors adds the hint
    if kind == "missing":
        return f"{field} is required"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "string_too_long":
        return f"{field} must be at most {ctx['max_length']} characters, got {len(value)}"
    if kind == "string_unicode":
        return f"{field} must be valid Unicode text, got an unpaired surrogate"
    if kind == "string_too_short":
        return f"{field} must not be empty"
    if kind == "literal_error":
        return f"{field} must be one of {ctx['expected']}, got {_show(value)}"
    return f"{field} must be {_expectation(field)}, got {_show(value)}"


# Fields other video APIs have, and where this request says the same thing.
_ELSEWHERE = {
    "width": "the size comes from resolution and aspect_ratio",
    "height": "the size comes from resolution and aspect_ratio",
    "size": "the size comes from resolution and aspect_ratio",
    "duration": "the length comes from num_frames and fps",
    "steps": "did you mean 'num_steps'?",
    "frames": "did you mean 'num_frames'?",
    "aspect": "did you mean 'aspect_ratio'?",
    "image_url": "did you mean 'image'? it takes a URL",
    "init_image": "did you mean 'image'? it takes a URL or base64",
    "input_image": "did you mean 'image'? it takes a URL or base64",
    "image_base64": "did you mean 'image'? it takes a URL or base64",
    "num_inference_steps": "did you mean 'num_steps'? rCM samples in 1 to 4",
    "num_videos": "did you mean 'num_samples'?",
    "num_outputs": "did you mean 'num_samples'?",
    "batch_size": "did you mean 'num_samples'?",
    "negative_prompt": "rCM's distilled sampling uses no classifier-free guidance, so no negative prompt",
    "guidance_scale": "rCM's distilled sampling uses no classifier-free guidance",
    "cfg_scale": "rCM's distilled sampling uses no classifier-free guidance",
    "input": 'the request fields go directly in the job\'s input: {"input": {"prompt": ...}}',
}


def _hint(field: str) -> str:
    """' (did you mean 'num_steps'?)' for a misspelt or differently named field, else ''."""
    key = field.strip().lower().replace("-", "_").replace(" ", "_")
    if key in _ELSEWHERE:
        return f" ({_ELSEWHERE[key]})"
    close = difflib.get_close_matches(key, VideoRequest.model_fields, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _expectation(field: str) -> str:
    """'an integer between 1 and 4', read from the field's own annotation so it cannot drift."""
    info = VideoRequest.model_fields.get(field)
    if info is None:
        return "valid"
    annotation = info.annotation
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    kinds, metadata = [], list(info.metadata)
    for member in members:
        if get_origin(member) is Annotated:
            member, *extra = get_args(member)
            metadata += [m for item in extra for m in getattr(item, "metadata", [item])]
        if member in _KINDS:
            kinds.append(_KINDS[member])
    expectation = " or ".join(kinds) or "valid"
    bounds = _bounds(metadata)
    optional = type(None) in members
    return f"{expectation}{bounds}" + (" or null" if optional else "")


_BOUND_WORDS = (
    (annotated_types.Ge, "ge", "at least"),
    (annotated_types.Gt, "gt", "greater than"),
    (annotated_types.Le, "le", "at most"),
    (annotated_types.Lt, "lt", "less than"),
)


def _bounds(metadata: list[Any]) -> str:
    found = {
        attr: (word, getattr(item, attr))
        for item in metadata
        for cls, attr, word in _BOUND_WORDS
        if isinstance(item, cls)
    }
    if "ge" in found and "le" in found:
        return f" between {found['ge'][1]} and {found['le'][1]}"
    phrases = [f"{word} {limit}" for word, limit in found.values()]
    return " " + " and ".join(phrases) if phrases else ""


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _show(value: Any) -> str:
    """The offending value as the client wrote it, short enough for one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) or value is None:
        text = "null" if value is None else repr(value)
        return text if len(text) <= 24 else text[:20] + "..."
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:37] + "...")
    return _json_kind(value)
