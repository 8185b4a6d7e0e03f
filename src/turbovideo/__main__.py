"""Command line: ``python -m turbovideo generate --model NAME --prompt TEXT [--image PATH] --out FILE``.

Option names follow upstream's inference scripts. ``--model tiny`` runs the whole path with seeded
random weights (no download; tiny-i2v when an image is given). Bad values end with one line on
stderr and exit code 2; failures while loading or generating with one line and exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import secrets
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from PIL import Image

from turbovideo.catalog import (
    ALIASES,
    ATTENTION_CHOICES,
    DEFAULT_BOUNDARY,
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_SLA_TOPK,
    DEFAULT_STEPS,
    MAX_FPS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_STEPS,
    MODELS,
    ModelSpec,
)
from turbovideo.errors import InputError
from turbovideo.files import write_failure
from turbovideo.pipeline.resolution import ASPECT_RATIOS

if TYPE_CHECKING:
    from turbovideo.pipeline.request import GenerationRequest, GenerationResult, ProgressEvent

# Tiny models default to 17 frames (about 1 s), which keeps a CPU run to seconds.
TINY_DEFAULT_FRAMES = 17
USAGE_ERROR = 2
RUN_ERROR = 1


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(f"{self.prog}: {message}", USAGE_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="turbovideo", description="TurboDiffusion video generation")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    gen = commands.add_parser("generate", help="generate a video from a prompt (and an image)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument(  # a str: Path makes "https://..." a path "https:/..."
        "--image", help="input image file for image-to-video (the endpoint also takes URLs; this takes files)"
    )
    gen.add_argument("--model", default="tiny", help=f"one of {', '.join([*MODELS, *ALIASES])}")
    gen.add_argument(  # a str: Path drops a trailing "/"
        "--out", default="output/generated_video.mp4", help="the .mp4 to write; default: %(default)s"
    )
    gen.add_argument("--checkpoint_dir", type=Path, help="folder with the model's files (Hub filenames)")
    gen.add_argument(
        "--num_steps", type=int, default=DEFAULT_STEPS, help=f"1 to {MAX_STEPS}; default %(default)s"
    )
    gen.add_argument("--sigma_max", type=float, help="default: 80 for T2V, 200 for I2V")
    gen.add_argument("--resolution", help="480p or 720p (tiny for tiny models); default: the model's")
    gen.add_argument(
        "--aspect_ratio", default="16:9", help=f"{', '.join(ASPECT_RATIOS)}; default %(default)s"
    )
    gen.add_argument(
        "--num_frames", type=int, help=f"4k+1; default {DEFAULT_FRAMES} ({TINY_DEFAULT_FRAMES} for tiny)"
    )
    gen.add_argument(
        "--seed",
        type=int,
        default=0,
        help=f"0 to {MAX_SEED}, or -1 for a random one (as the endpoint draws when given none); default 0 "
        "(as upstream): the same seed, the same video",
    )
    gen.add_argument(
        "--num_samples",
        type=int,
        default=1,
        help=f"1 to {MAX_SAMPLES} videos of one prompt; default %(default)s",
    )
    gen.add_argument("--fps", type=int, default=DEFAULT_FPS, help=f"1 to {MAX_FPS}; default %(default)s")
    gen.add_argument(
        "--attention_type",
        default="auto",
        help=f"{', '.join(ATTENTION_CHOICES)} (upstream's 'original' is dense); default %(default)s",
    )
    gen.add_argument(
        "--sla_topk",
        type=float,
        default=DEFAULT_SLA_TOPK,
        help="share of key blocks SLA attends to, in (0, 1]",
    )
    gen.add_argument(
        "--boundary", type=float, default=DEFAULT_BOUNDARY, help="I2V expert switch time, in (0, 1)"
    )
    gen.add_argument("--ode", action="store_true", help="deterministic ODE sampling instead of SDE")
    gen.add_argument(
        "--adaptive_resolution", action="store_true", help="I2V: follow the image's aspect ratio"
    )
    gen.add_argument(
        "--quant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="int8 DiT files (default: by GPU memory)",
    )
    return parser


class _Terminated(BaseException):
    """SIGTERM (`kill`, `timeout`): the run stops as on Ctrl-C, so that its scratch folder goes too."""


def _terminate(signum: int, frame: object) -> NoReturn:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    on_term = None  # a SIGTERM the caller set to be ignored, or handles itself, is left alone
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        on_term = signal.signal(signal.SIGTERM, _terminate)
    # A cut prompt is said once, among the run's warnings ("turbovideo: warning: the prompt has ...");
    # the logger is set back afterwards for a caller that runs main() in its own process.
    tokenizer_log = logging.getLogger("turbovideo.models.tokenizer")
    tokenizer_level = tokenizer_log.level
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        tokenizer_log.setLevel(logging.ERROR)
        return _generate(args)
    except KeyboardInterrupt:
        _fail("turbovideo: interrupted; no video was written", 130)
    except _Terminated:
        _fail("turbovideo: terminated; no video was written", 128 + signal.SIGTERM)
    finally:
        tokenizer_log.setLevel(tokenizer_level)
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def _generate(args: argparse.Namespace) -> int:
    spec = _spec(args.model, with_image=args.image is not None)
    _check_checkpoint_dir(args, spec)
    out = _check_out(args.out)
    # Heavy imports (torch, the models) only once the command line is known to be usable; the helpers
    # below import from these modules again, at no cost.
    with _interrupt_held():
        from turbovideo.models import CheckpointError
        from turbovideo.pipeline import VideoPipeline  # noqa: F401
        from turbovideo.pipeline.request import check_request
        from turbovideo.pipeline.video import EncodeError

    request = _request(args, spec)
    try:
        check_request(request, spec)
        targets = _targets(out, request.num_samples)
        _check_targets(out, targets)
        result = _run(spec, args, request, out, targets)
    except InputError as err:
        _fail(f"turbovideo: {_as_option(str(err))}", USAGE_ERROR)
    except EncodeError as err:  # its path is the scratch folder's, gone by now
        _fail(f"turbovideo: could not write the video for --out {out}: {err.reason}", RUN_ERROR)
    except (CheckpointError, OSError) as err:
        _fail(f"turbovideo: {err}", RUN_ERROR)
    except (RuntimeError, MemoryError) as err:  # torch's out-of-memory and CUDA errors among them
        _fail(f"turbovideo: generation failed ({type(err).__name__}): {str(err).strip()}", RUN_ERROR)
    _report(result, targets)
    return 0


def _check_checkpoint_dir(args: argparse.Namespace, spec: ModelSpec) -> None:
    """Random weights take no --checkpoint_dir; the published models need one that is a folder."""
    if spec.is_random and args.checkpoint_dir is not None:
        _fail(
            f"turbovideo: --checkpoint_dir is for the published models; {spec.name} has seeded random "
            f"weights (--model defaults to tiny): name the model, e.g. --model {next(iter(MODELS))}",
            USAGE_ERROR,
        )
    if not spec.is_random and (args.checkpoint_dir is None or not args.checkpoint_dir.is_dir()):
        variant = "quant" if args.quant else "bf16"
        missing = f"model {spec.name} needs its checkpoints"
        if args.checkpoint_dir is not None:
            missing = f"--checkpoint_dir {args.checkpoint_dir} is not a folder"
        _fail(
            f"turbovideo: {missing}: run python scripts/download_checkpoints.py "
            f"--model {spec.name} --variant {variant} --dest DIR, then pass "
            f"--checkpoint_dir DIR/models/{spec.name}-{variant}",
            USAGE_ERROR,
        )


def _check_out(text: str) -> Path:
    """``--out`` as a path: an .mp4 file's name, not a folder's."""
    out = Path(text)
    try:
        is_dir = out.is_dir()
    except OSError as err:  # e.g. a name longer than the file system takes
        _fail(f"turbovideo: --out {out}: {err.strerror}", USAGE_ERROR)
    if is_dir or os.path.basename(text) in ("", ".", ".."):  # "new/" or "new/.": a folder
        _fail(
            f"turbovideo: --out {out} is a directory; name the video file, e.g. {out / 'video.mp4'}",
            USAGE_ERROR,
        )
    if out.suffix.lower() != ".mp4":  # the file is H.264 in MP4 whatever it is named
        _fail(f"turbovideo: --out must name an .mp4 file (the video is H.264 MP4), got {out}", USAGE_ERROR)
    return out


def _request(args: argparse.Namespace, spec: ModelSpec) -> GenerationRequest:
    from turbovideo.pipeline.request import GenerationRequest

    return GenerationRequest(
        prompt=args.prompt,
        task=spec.task,
        image=_open_image(args.image),
        resolution=args.resolution,
        aspect_ratio=args.aspect_ratio,
        adaptive_resolution=args.adaptive_resolution,
        num_frames=_default_frames(spec) if args.num_frames is None else args.num_frames,
        num_steps=args.num_steps,
        sigma_max=args.sigma_max,
        seed=secrets.randbelow(MAX_SEED + 1) if args.seed == -1 else args.seed,
        num_samples=args.num_samples,
        attention="dense" if args.attention_type == "original" else args.attention_type,
        sla_topk=args.sla_topk,
        ode=args.ode,
        boundary=args.boundary,
        fps=args.fps,
    )


def _check_targets(out: Path, targets: list[Path]) -> None:
    """A file the video cannot take is refused now, not once the run is done."""
    for target in targets:
        if target.is_dir():
            raise InputError(f"--out {out}: a sample's file {target} is a directory; name another file")
        if not _replaceable(target):
            raise InputError(
                f"--out {out}: {target} is another user's file in a folder that only lets owners replace "
                "theirs (sticky, like /tmp); name another file"
            )


def _run(
    spec: ModelSpec, args: argparse.Namespace, request: GenerationRequest, out: Path, targets: list[Path]
) -> GenerationResult:
    """Load, generate into a scratch folder beside ``out`` and move the videos to ``targets``."""
    from turbovideo.pipeline import VideoPipeline

    # The folders this run makes for --out, deepest first: a failed run removes them again.
    made = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]
    try:  # before loading: a folder that cannot take the video fails in a second, not after minutes
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch_dir = tempfile.TemporaryDirectory(dir=out.parent, prefix=".turbovideo-")
    except OSError as err:
        _fail(f"turbovideo: cannot write --out {out}: {write_failure(out, err)}", USAGE_ERROR)
    try:
        with scratch_dir as scratch:
            pipe = VideoPipeline.load(
                spec, args.checkpoint_dir, quantized=args.quant, attention=request.attention
            )
            bar = ProgressBar(sys.stderr)
            try:
                result = pipe.generate(request, Path(scratch), bar)
            finally:  # a run that fails mid-stage: its message must not land on the bar's line
                bar.end_line()
            for video, target in zip(result.videos, targets, strict=True):
                os.replace(video, target)  # same folder; refuses a directory instead of filling it
    except BaseException:  # no video: the folders made for it go too, unless something else is in them
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return result


def _report(result: GenerationResult, targets: list[Path]) -> None:
    """The run's summary and warnings on stderr; the videos' paths on stdout, one a line."""
    timings = ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in result.timings.items())
    _note(
        f"{result.width}x{result.height}, {result.num_frames} frames at {result.fps} fps, seed {result.seed}, "
        f"attention {result.attention_backend}: {timings}"
    )
    for warning in result.warnings:
        _note(f"turbovideo: warning: {warning}")
    try:
        for target in targets:
            _print_path(target)
    except BrokenPipeError:  # read by something that stopped early (`| head -1`): the videos are written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second failure at exit


@contextlib.contextmanager
def _interrupt_held() -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM that arrives during the block until it ends. Inside torch's import it
    would be lost (torch catches a failed numpy import and runs on) or abort the process from C++."""
    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _terminate}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # A signal the shell set to be ignored (`nohup`, `&`) stays ignored.
    ours = {signum: handler for signum, handler in ours.items() if signal.getsignal(signum) is handler}
    held: list[int] = []
    for signum in ours:
        signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for signum, handler in ours.items():
            signal.signal(signum, handler)
    if signal.SIGTERM in held:
        raise _Terminated
    if held:
        raise KeyboardInterrupt


def _spec(name: str, with_image: bool) -> ModelSpec:
    """The named model; an alias (``tiny``) names its models, chosen among by task as the worker does."""
    names = ALIASES.get(name, (name,))
    if not all(n in MODELS for n in names):
        _fail(
            f"turbovideo: unknown model {name!r}; choose one of {', '.join([*MODELS, *ALIASES])}", USAGE_ERROR
        )
    specs = [MODELS[n] for n in names]
    task = "i2v" if with_image else "t2v"
    return next((spec for spec in specs if spec.task == task), specs[0])


def _default_frames(spec: ModelSpec) -> int:
    return TINY_DEFAULT_FRAMES if spec.is_random else DEFAULT_FRAMES


# The option that sets each request field: check_request's messages start with the field.
_OPTION_OF_FIELD = {
    name: f"--{name}"
    for name in (
        "prompt", "image", "resolution", "aspect_ratio", "adaptive_resolution", "num_frames", "num_steps",
        "sigma_max", "seed", "num_samples", "sla_topk", "boundary", "fps",
    )
} | {"attention": "--attention_type"}  # fmt: skip


def _as_option(message: str) -> str:
    """A request check's message as the command line says it: the field it starts with named as the
    option that sets it ("num_steps must be ..." -> "--num_steps must be ...")."""
    field, space, rest = message.partition(" ")
    option = _OPTION_OF_FIELD.get(field)
    return f"{option}{space}{rest}" if option else message


def _open_image(text: str | None) -> Image.Image | None:
    """The image as the endpoint would use it: upright by its EXIF orientation, within its limits."""
    if text is None:
        return None
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        _fail(
            f"turbovideo: --image takes an image file, got the URL {text}; download it first (the endpoint's "
            "image field takes URLs)",
            USAGE_ERROR,
        )
    path = Path(text)
    from turbovideo.images import MAX_IMAGE_BYTES, open_image

    try:
        with path.open("rb") as file:  # bounded: a device file or a huge file is not read whole
            data = file.read(MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            _fail(f"turbovideo: {path}: image must be at most {MAX_IMAGE_BYTES // 2**20} MB", USAGE_ERROR)
        return open_image(data)
    except OSError as err:
        _fail(f"turbovideo: cannot read image {path}: {err}", USAGE_ERROR)
    except InputError as err:
        _fail(f"turbovideo: {path}: {err}", USAGE_ERROR)


def _replaceable(path: Path) -> bool:
    """Whether this user may rename a file over ``path``: in a sticky folder (/tmp) only root and the
    owners of the file or of the folder may replace it (an immutable file is root's doing, not checked)."""
    try:
        file, folder = path.lstat(), path.parent.stat()
    except OSError:  # no file to replace (or none this user can see), the folder's own check follows
        return True
    return not folder.st_mode & stat.S_ISVTX or os.geteuid() in (0, file.st_uid, folder.st_uid)


def _print_path(path: Path) -> None:
    try:
        print(path, flush=True)
    except UnicodeEncodeError:  # a name that is not text in stdout's encoding: its bytes, as given
        sys.stdout.buffer.write(os.fsencode(path) + b"\n")
        sys.stdout.flush()


def _targets(out: Path, count: int) -> list[Path]:
    """``out`` for one video; ``name_0.mp4``, ``name_1.mp4``, ... next to it for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


class ProgressBar:
    """A plain-text bar per stage on a stream; redrawn in place on a terminal, one line per event otherwise."""

    WIDTH = 24

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream  # None: stderr closed (`2>&-`), nothing to draw on
        self.redraw = stream is not None and stream.isatty()
        self._line_open = False  # a redrawn bar whose stage has not finished: no newline after it yet

    def __call__(self, event: ProgressEvent) -> None:
        filled = round(self.WIDTH * event.step / event.total)
        line = f"{event.stage:<8}[{'#' * filled}{'.' * (self.WIDTH - filled)}] {event.step}/{event.total}"
        if self.redraw:
            finished = event.step == event.total
            self._write("\r" + line + ("\n" if finished else ""))
            self._line_open = not finished
        else:
            self._write(line + "\n")

    def end_line(self) -> None:
        """End a bar left unfinished, so that what is printed next starts a line of its own."""
        if self._line_open:
            self._line_open = False
            self._write("\n")

    def _write(self, text: str) -> None:
        # The bar is only a view: a stream closed under it (stderr piped into `head`) must not stop the run.
        if self.stream is None:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self.stream = None


def _note(text: str) -> None:
    """A line on stderr; a closed stderr must not change how the run ends (its exit code says it)."""
    if sys.stderr is None:  # started with stderr closed: print() would put the line on stdout
        return
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


def _fail(message: str, code: int) -> NoReturn:
    _note(message.splitlines()[0] if message else "turbovideo: failed")
    raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
