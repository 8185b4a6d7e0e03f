"""The tiny models end to end: request -> mp4 files, on the CPU with seeded random weights."""

import gc
import re
import threading
import weakref
from dataclasses import replace

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from turbovideo import catalog
from turbovideo.catalog import MODELS
from turbovideo.errors import InputError
from turbovideo.models import CheckpointError, vae_dtype
from turbovideo.models.text_padding import context_rows
from turbovideo.models.tokenizer import load_tokenizer, tiny_tokenizer
from turbovideo.pipeline import GenerationRequest, GenerationResult, ProgressEvent, VideoPipeline


@pytest.fixture(scope="module")
def t2v() -> VideoPipeline:
    return VideoPipeline.load(MODELS["tiny-t2v"], device="cpu")


@pytest.fixture(scope="module")
def i2v() -> VideoPipeline:
    return VideoPipeline.load(MODELS["tiny-i2v"], device="cpu")


def _read(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return meta, np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_t2v_two_samples_to_mp4(t2v, tmp_path):
    events: list[ProgressEvent] = []
    request = GenerationRequest(prompt="a red fox", num_frames=9, num_samples=2, fps=12, seed=5)
    result = t2v.generate(request, tmp_path, events.append)

    assert isinstance(result, GenerationResult)
    assert [p.name for p in result.videos] == ["sample_0.mp4", "sample_1.mp4"]
    assert (result.width, result.height, result.num_frames, result.fps) == (112, 64, 9, 12)
    assert result.duration_s == pytest.approx(9 / 12)
    assert result.seed == 5
    assert result.attention_backend == t2v.experts[0].attention_backend
    assert set(result.timings) == {"encode", "denoise", "decode", "mux", "total"}
    assert result.timings["total"] >= result.timings["denoise"] > 0
    frames = []
    for path in result.videos:
        meta, video = _read(path)
        assert meta["size"] == (112, 64) and meta["fps"] == pytest.approx(12)
        assert video.shape == (9, 64, 112, 3)
        frames.append(video)
    assert not np.array_equal(frames[0], frames[1])  # the samples have their own noise
    with Image.open(result.thumbnail) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (112, 64)

    stages = [(e.stage, e.step, e.total) for e in events]
    assert stages == [
        ("encode", 1, 1),
        *[("denoise", i, 4) for i in range(1, 5)],
        *[("decode", i, 6) for i in range(1, 7)],  # three latent frames, one sample after the other
        ("mux", 1, 2),
        ("mux", 2, 2),
    ]


def test_same_seed_same_video_other_seed_other_video(t2v, tmp_path):
    def run(seed, name):
        request = GenerationRequest(
            prompt="a red fox", num_frames=5, num_steps=2, seed=seed, aspect_ratio="1:1"
        )
        return _read(t2v.generate(request, tmp_path / name).videos[0])[1]

    first, again, other = run(3, "a"), run(3, "b"), run(4, "c")
    assert first.shape == (5, 64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_requests_from_two_threads_give_the_videos_they_give_one_after_another(t2v, tmp_path):
    # Each step sets the shared experts' attention from its request: interleaved, each ran the other's.
    requests = {
        "sla": GenerationRequest(prompt="a fox", num_frames=9, num_steps=2, seed=1, attention="sla"),
        "dense": GenerationRequest(prompt="a fox", num_frames=9, num_steps=2, seed=2, attention="dense"),
    }
    alone = {
        name: _read(t2v.generate(r, tmp_path / f"alone-{name}").videos[0])[1] for name, r in requests.items()
    }
    together: dict[str, GenerationResult] = {}

    def run(name):
        together[name] = t2v.generate(requests[name], tmp_path / f"together-{name}")

    threads = [threading.Thread(target=run, args=(name,)) for name in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in requests:
        assert np.array_equal(_read(together[name].videos[0])[1], alone[name]), name
    assert together["sla"].attention_backend != together["dense"].attention_backend


def test_a_prompt_cache_folder_given_as_text_keeps_the_tiny_models_prompts(tmp_path):
    pipe = VideoPipeline.load(MODELS["tiny-t2v"], device="cpu", prompt_cache_dir=str(tmp_path / "prompts"))
    pipe.generate(GenerationRequest(prompt="a fox", num_frames=5, num_steps=1), tmp_path / "out")
    assert len(list((tmp_path / "prompts").glob("*.safetensors"))) == 1


def test_the_sampler_options_of_the_request_are_used(t2v, tmp_path):
    # Two steps: with one, the SDE and ODE updates coincide (the last step adds no noise). 9 frames at
    # 16:9 make 84 tokens, two key blocks of 64: top-k 0.1 keeps one of them, top-k 1.0 both.
    base = dict(prompt="a red fox", num_frames=9, num_steps=2, seed=3)
    assert t2v.spec.default_sigma_max != 1600.0

    def run(name, **changes):
        return _read(t2v.generate(GenerationRequest(**base, **changes), tmp_path / name).videos[0])[1]

    default = run("default")
    for changes in ({"ode": True}, {"sigma_max": 1600.0}, {"sla_topk": 1.0}):
        assert not np.array_equal(run(str(changes), **changes), default), changes


def test_repeated_prompt_skips_the_text_encoder(t2v, tmp_path):
    calls = _count_calls(t2v.text_encoder)
    request = GenerationRequest(prompt="a  blue\n whale", num_frames=5, num_steps=1)
    t2v.generate(request, tmp_path / "a")
    t2v.generate(GenerationRequest(prompt="a blue whale ", num_frames=5, num_steps=1), tmp_path / "b")
    assert calls[0] == 1  # the second prompt cleans to the same text


@pytest.mark.parametrize("words", [5, 60])
def test_the_dit_gets_the_prompt_rows_and_zero_rows_up_to_a_shared_length_once_a_request(
    t2v, tmp_path, words, monkeypatch
):
    prompt = " ".join(["a red fox in the snow"] * (words // 5))
    expert = t2v.experts[0]
    contexts: list[torch.Tensor] = []
    text_keys = expert.text_keys
    monkeypatch.setattr(expert, "text_keys", lambda context: contexts.append(context) or text_keys(context))
    steps: list = []
    hook = expert.register_forward_pre_hook(lambda module, args: steps.append(args[2]))
    try:
        t2v.generate(GenerationRequest(prompt=prompt, num_frames=5, num_steps=2), tmp_path)
    finally:
        hook.remove()
    # The cross-attention keys of the prompt are made once; both steps read them.
    assert len(contexts) == 1 and len(steps) == 2 and steps[0] is steps[1]
    prompt_length = int(t2v.tokenizer.encode([prompt]).lengths[0])
    assert contexts[0].shape[1] == context_rows(prompt_length, 512)
    assert contexts[0][:, prompt_length - 1].any() and not contexts[0][:, prompt_length:].any()


def test_each_sample_decodes_once_the_previous_ones_video_is_freed(t2v, tmp_path, monkeypatch):
    # The memory plan counts one sample's decoded fp32 video (0.9 GB at 720p, 81 frames): the one before
    # must be gone when the next sample's decode starts.
    decode = t2v.vae.decode
    videos: list[weakref.ref] = []
    earlier_alive: list[bool] = []

    def tracked(latent, *args):
        earlier_alive.append(any(video() is not None for video in videos))
        video = decode(latent, *args)
        videos.append(weakref.ref(video))
        return video

    monkeypatch.setattr(t2v.vae, "decode", tracked)
    request = GenerationRequest(prompt="a red fox", num_frames=5, num_steps=1, num_samples=3)
    result = t2v.generate(request, tmp_path)
    assert earlier_alive == [False, False, False]
    assert result.num_frames == 5 and len(result.videos) == 3


def test_the_text_encoder_reads_the_prompt_cleaned_once(t2v, tmp_path):
    # Upstream cleans a prompt once (ftfy, then HTML-unescaping twice). ftfy leaves entities alone in
    # text with a tag, so cleaning twice unescaped "&amp;amp;lt;" one level further, to "<".
    prompt = "a <b> sign that reads &amp;amp;lt;"
    seen: list[torch.Tensor] = []
    hook = t2v.text_encoder.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        t2v.generate(GenerationRequest(prompt=prompt, num_frames=5, num_steps=1), tmp_path)
    finally:
        hook.remove()
    assert len(seen) == 1
    assert torch.equal(seen[0], t2v.tokenizer.encode([prompt]).ids)


def test_i2v_adaptive_resolution_and_expert_switch(i2v, tmp_path):
    high, low = (_count_calls(expert) for expert in i2v.experts)
    # Tiny 16:9 is 112x64 (area 7168). A 4:3 image: w = sqrt(7168 * 4/3) = 97.8 -> 6.11 strides -> 96;
    # h = sqrt(7168 * 3/4) = 73.3 -> 4.58 strides -> 80.
    image = Image.new("RGB", (400, 300), (180, 40, 20))
    request = GenerationRequest(
        prompt="a red fox", task="i2v", image=image, num_frames=5, adaptive_resolution=True
    )
    events = []
    result = i2v.generate(request, tmp_path, events.append)
    meta, video = _read(result.videos[0])
    assert (result.width, result.height) == (96, 80) and meta["size"] == (96, 80)
    assert video.shape == (5, 80, 96, 3)
    assert (high[0], low[0]) == (2, 2)  # 4 steps: two high-noise, two low-noise
    assert [(e.stage, e.step) for e in events if e.stage == "encode"] == [("encode", 1), ("encode", 2)]

    i2v.generate(
        GenerationRequest(prompt="a red fox", task="i2v", image=image, num_frames=5, num_steps=2), tmp_path
    )
    assert (high[0], low[0]) == (4, 2)  # 2 steps stay on the high-noise expert


def test_the_result_names_the_attention_of_the_expert_that_ran(i2v, tmp_path):
    i2v.experts[0].set_attention("auto")
    # The boundary above the first step's time: the high-noise expert never runs.
    request = GenerationRequest(
        prompt="x", task="i2v", image=Image.new("RGB", (64, 64)), num_frames=5, num_steps=1,
        attention="dense", boundary=0.999,
    )  # fmt: skip
    result = i2v.generate(request, tmp_path)
    assert result.attention_backend == i2v.experts[1].attention_backend == "dense"
    assert i2v.experts[0].attention_backend != "dense"


def test_a_failing_sample_leaves_no_encoder_running(t2v, tmp_path):
    (tmp_path / "sample_0.mp4").mkdir()  # ffmpeg cannot write the first sample
    request = GenerationRequest(prompt="a red fox", num_frames=5, num_steps=1, num_samples=3)
    with pytest.raises(OSError):
        t2v.generate(request, tmp_path)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("mux-")]
    for name in ("sample_1.mp4", "sample_2.mp4"):  # the others were finished, not abandoned
        assert _read(tmp_path / name)[1].shape[0] == 5


def test_a_progress_callback_that_fails_leaves_no_encoder_running(t2v, tmp_path):
    def report(event):
        if event.stage == "mux":  # e.g. a progress bar writing to a closed pipe
            raise BrokenPipeError

    request = GenerationRequest(prompt="a red fox", num_frames=5, num_steps=1, num_samples=3)
    with pytest.raises(BrokenPipeError):
        t2v.generate(request, tmp_path, report)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("mux-")]


def test_a_run_stopped_during_decode_reports_no_video_muxed(t2v, tmp_path):
    events: list[tuple[str, int]] = []

    def report(event):  # e.g. the worker's stop check once the job is cancelled
        events.append((event.stage, event.step))
        if event.stage == "decode":
            raise KeyboardInterrupt

    request = GenerationRequest(prompt="a red fox", num_frames=9, num_steps=1, num_samples=2)
    with pytest.raises(KeyboardInterrupt):
        t2v.generate(request, tmp_path, report)
    assert events == [("encode", 1), ("denoise", 1), ("decode", 1)]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("mux-")]


def test_i2v_fixed_size_distorts_the_image(i2v, tmp_path):
    image = Image.new("RGB", (30, 90), (0, 0, 0))
    request = GenerationRequest(
        prompt="x", task="i2v", image=image, num_frames=5, num_steps=1, aspect_ratio="4:3"
    )
    result = i2v.generate(request, tmp_path)
    assert (result.width, result.height) == (80, 64)


class _MustNotRun(nn.Module):
    """Stands in for every model: any use fails the test."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, *args, **kwargs):
        raise AssertionError("a model ran for an invalid request")

    encode = decode = forward


@pytest.mark.parametrize(
    ("spec", "changes", "message"),
    [
        ("tiny-t2v", {"num_frames": 80}, "num_frames must be 4k+1 between 5 and 161, got 80"),
        ("tiny-t2v", {"aspect_ratio": "1:2"}, "aspect_ratio must be one of"),
        ("tiny-t2v", {"num_steps": 5}, "num_steps must be between 1 and 4, got 5"),
        ("tiny-i2v", {"task": "i2v"}, "task 'i2v' needs an input image"),
        ("tiny-t2v", {"attention": "sagesla"}, "sagesla"),
    ],
)
def test_invalid_requests_fail_before_any_model_work(spec, changes, message, tmp_path):
    spec = MODELS[spec]
    experts = [_MustNotRun() for _ in spec.experts]
    pipe = VideoPipeline(
        spec,
        experts,
        _MustNotRun(),
        _MustNotRun(),
        load_tokenizer(None),
        torch.device("cpu"),
        encoder_id="none",
    )
    request = GenerationRequest(**{"prompt": "a red fox", "task": spec.task, **changes})
    with pytest.raises(InputError, match=re.escape(message)):
        pipe.generate(request, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_request_gives_the_same_video_with_and_without_cuda_graphs(tmp_path):
    pipe = VideoPipeline.load(MODELS["tiny-t2v"], device="cuda")
    request = GenerationRequest(prompt="a red fox", num_frames=5, num_steps=4)
    videos = []
    for graphs in (False, True, True):
        pipe.cuda_graphs = graphs
        videos.append(_read(pipe.generate(request, tmp_path / str(len(videos))).videos[0])[1])
    assert pipe.graphed_forwards == 1  # captured in the first graphed request, replayed in the second
    for video in videos[1:]:
        assert np.abs(video.astype(int) - videos[0].astype(int)).max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_warm_up_on_a_gpu_leaves_the_forward_and_the_text_keys_captured():
    pipe = VideoPipeline.load(MODELS["tiny-t2v"], device="cuda")
    pipe.warm_up()
    expert = pipe.experts[0]
    assert pipe.graphed_forwards == 1 and pipe._graphs.captured(expert, "text_keys") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_pipeline_after_a_freed_one_still_captures_its_forwards():
    old = VideoPipeline.load(MODELS["tiny-t2v"], device="cuda")
    old.warm_up()  # its graphs were the only ones in the device's memory pool
    del old
    gc.collect()
    pipe = VideoPipeline.load(MODELS["tiny-t2v"], device="cuda")
    pipe.warm_up()
    assert pipe.graphed_forwards == 1 and pipe._graphs.captured(pipe.experts[0], "text_keys") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offloading_every_module_gives_the_same_video_on_gpu(tmp_path):
    resident = VideoPipeline.load(MODELS["tiny-i2v"], device="cuda")
    offloaded = VideoPipeline.load(MODELS["tiny-i2v"], device="cuda")
    image = Image.new("RGB", (64, 64), (90, 30, 200))
    request = GenerationRequest(prompt="a red fox", task="i2v", image=image, num_frames=5)
    offloaded.gpu_memory_limit = 1
    frugal = offloaded._plan(request).placement  # what the request needs with every module visiting
    offloaded.gpu_memory_limit = frugal.peak_bytes
    first = _read(resident.generate(request, tmp_path / "a").videos[0])[1]
    second = _read(offloaded.generate(request, tmp_path / "b").videos[0])[1]
    assert resident.placement.fits and not resident.placement.swapped
    assert offloaded.placement.swapped >= {"text_encoder", "dit_high", "dit_low"}
    assert not any(slot.on_device for name, slot in offloaded._slots.items() if name != "vae")
    # Same weights wherever they sat; cuDNN may pick other kernels, so allow a rounding step.
    assert np.abs(first.astype(int) - second.astype(int)).max() <= 2


def _write_checkpoint_dir(folder, pipe: VideoPipeline, spec, quantized: bool) -> None:
    """Save a pipeline's weights in the Hub layout ``VideoPipeline.load`` reads."""
    for expert, hub_file in zip(pipe.experts, spec.dit_files(quantized), strict=True):
        torch.save(expert.state_dict(), folder / hub_file.filename)
    torch.save(pipe.vae.state_dict(), folder / catalog.VAE_FILE)
    torch.save(pipe.text_encoder.state_dict(), folder / catalog.TEXT_ENCODER_FILE)
    (folder / catalog.TOKENIZER_DIR).mkdir(parents=True)
    tiny_tokenizer().save(str(folder / catalog.TOKENIZER_DIR / "tokenizer.json"))


def test_load_from_a_checkpoint_folder_matches_the_weights_in_memory(tmp_path):
    # A downloadable-style spec whose files hold the tiny models' weights.
    spec = replace(MODELS["tiny-t2v"], name="tiny-files", repo="local/tiny-files")
    in_memory = VideoPipeline.random(spec, "cpu")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _write_checkpoint_dir(folder, in_memory, spec, quantized=False)

    loaded = VideoPipeline.load(spec, folder, device="cpu", prompt_cache_dir=tmp_path / "prompts")
    request = GenerationRequest(prompt="a red fox", num_frames=5, num_steps=2)
    expected = _read(in_memory.generate(request, tmp_path / "a").videos[0])[1]
    assert np.array_equal(_read(loaded.generate(request, tmp_path / "b").videos[0])[1], expected)
    assert len(list((tmp_path / "prompts").glob("*.safetensors"))) == 1
    assert loaded.encoder_id.startswith(catalog.TEXT_ENCODER_FILE)


def test_the_vae_runs_in_float32_on_a_cpu_and_in_bf16_on_a_gpu(tmp_path):
    # PyTorch's bf16 3D convolutions take a slow path on CPUs without AVX512-BF16 or AMX: the tiny
    # default job decoded for 40 s on such a CPU, against 2 s in float32.
    spec = replace(MODELS["tiny-t2v"], name="tiny-files", repo="local/tiny-files")
    in_memory = VideoPipeline.random(spec, "cpu")
    _write_checkpoint_dir(tmp_path, in_memory, spec, quantized=False)
    loaded = VideoPipeline.load(spec, tmp_path, device="cpu")
    planned = VideoPipeline.planning(spec, quantized=False, device=torch.device("cpu"))
    assert in_memory.vae.dtype == loaded.vae.dtype == planned.vae.dtype == torch.float32
    gpu = VideoPipeline.planning(spec, quantized=False, device=torch.device("cuda", 0))
    assert gpu.vae.dtype == vae_dtype("cuda") == torch.bfloat16


def test_load_falls_back_to_the_variant_on_disk(tmp_path):
    spec = replace(MODELS["tiny-t2v"], name="tiny-files", repo="local/tiny-files")
    _write_checkpoint_dir(tmp_path, VideoPipeline.random(spec, "cpu", quantized=True), spec, quantized=True)
    assert VideoPipeline.load(spec, tmp_path, device="cpu").experts[0].quantized  # CPU prefers bf16 files
    with pytest.raises(CheckpointError, match="tiny-t2v.pth does not exist"):
        VideoPipeline.load(spec, tmp_path, device="cpu", quantized=False)


def test_real_model_without_checkpoints_says_how_to_get_them():
    with pytest.raises(
        CheckpointError, match="scripts/download_checkpoints.py --model TurboWan2.1-T2V-1.3B-480P"
    ):
        VideoPipeline.load(MODELS["TurboWan2.1-T2V-1.3B-480P"], None, device="cpu")


def test_models_of_one_cache_share_the_text_encoder_and_vae(tmp_path):
    spec_a = replace(MODELS["tiny-t2v"], name="tiny-a", repo="local/a", experts=("tiny-a",))
    spec_b = replace(MODELS["tiny-t2v"], name="tiny-b", repo="local/b", experts=("tiny-b",))
    shared = tmp_path / "shared"
    shared.mkdir()
    _write_checkpoint_dir(shared, VideoPipeline.random(spec_a, "cpu"), spec_a, quantized=False)
    torch.save(VideoPipeline.random(spec_b, "cpu").experts[0].state_dict(), shared / "tiny-b.pth")
    # Per-model folders of symlinks, as the worker's checkpoint cache lays them out.
    for spec in (spec_a, spec_b):
        folder = tmp_path / spec.name
        (folder / catalog.TOKENIZER_DIR).mkdir(parents=True)
        for name in (f"{spec.experts[0]}.pth", catalog.VAE_FILE, catalog.TEXT_ENCODER_FILE):
            (folder / name).symlink_to(shared / name)
        tokenizer = f"{catalog.TOKENIZER_DIR}/tokenizer.json"
        (folder / tokenizer).symlink_to(shared / tokenizer)
    a = VideoPipeline.load(spec_a, tmp_path / "tiny-a", device="cpu")
    b = VideoPipeline.load(spec_b, tmp_path / "tiny-b", device="cpu")
    assert a.text_encoder is b.text_encoder and a.vae is b.vae
    assert a.experts[0] is not b.experts[0]
    assert a._slots["text_encoder"] is b._slots["text_encoder"]
    # Held while a pipeline uses them, no longer (11 GB of host memory for the real umT5).
    encoder = weakref.ref(a.text_encoder)
    del a, b
    gc.collect()
    assert encoder() is None
    # A file rewritten in place (same inode, new bytes) is read again, not served from memory.
    first = VideoPipeline.load(spec_a, tmp_path / "tiny-a", device="cpu")
    state = first.text_encoder.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1
    with open(shared / catalog.TEXT_ENCODER_FILE, "r+b") as file:  # same inode
        torch.save(state, file)
        file.truncate()
    again = VideoPipeline.load(spec_a, tmp_path / "tiny-a", device="cpu")
    assert again.text_encoder is not first.text_encoder
    assert torch.equal(again.text_encoder.state_dict()[name], state[name])


@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v"])
def test_a_warm_up_runs_the_default_shape_and_leaves_no_trace(name, t2v, i2v, tmp_path, monkeypatch):
    pipe = t2v if name == "tiny-t2v" else i2v
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    cached = dict(pipe.prompt_cache._entries)
    steps: list[int] = []
    keys: set[int] = set()
    expert = pipe.experts[0]
    hooks = [
        expert.register_forward_hook(lambda module, args, out: steps.append(args[0].shape[2])),
        expert.blocks[0].cross_attn.register_forward_pre_hook(
            lambda module, args: keys.add(args[1].k.shape[1])
        ),
    ]
    try:
        assert pipe.warm_up() > 0
    finally:
        for hook in hooks:
            hook.remove()
    # One step at the default request's latent frame count (81 frames -> 21).
    assert steps == [21]
    # And the cross-attention at every key count a prompt can give (cuDNN plans one per count).
    assert keys == {64, 128, 192, 256, 320, 384, 448, 512}
    assert pipe.prompt_cache._entries == cached  # the warm-up prompt took no cache slot
    assert not list(tmp_path.iterdir())  # its video went with its scratch folder


def test_a_warmed_up_pipeline_gives_the_same_video(t2v, tmp_path):
    request = GenerationRequest(prompt="a red fox", num_frames=5, num_steps=1, seed=11)
    fresh = VideoPipeline.load(MODELS["tiny-t2v"], device="cpu")
    before = _read(fresh.generate(request, tmp_path / "fresh").videos[0])[1]
    t2v.warm_up()
    after = _read(t2v.generate(request, tmp_path / "warmed").videos[0])[1]
    assert np.array_equal(before, after)


@pytest.mark.parametrize(("name", "sigma_max"), [("tiny-t2v", 80.0), ("tiny-i2v", 200.0)])
def test_the_first_step_sees_the_seeds_noise_at_the_models_default_sigma_max(
    t2v, i2v, tmp_path, name, sigma_max
):
    # Upstream: x = randn(seed) * t0 with t0 from sigma_max (80 text-to-video, 200 image-to-video), fed as bf16.
    from turbovideo.pipeline.sampler import rf_times

    pipe = t2v if name == "tiny-t2v" else i2v
    image = Image.new("RGB", (64, 48), "orange") if name == "tiny-i2v" else None
    request = GenerationRequest(
        prompt="a fox", task=pipe.spec.task, image=image, num_frames=5, num_steps=2, seed=1234
    )
    seen = []
    hook = pipe.experts[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        result = pipe.generate(request, tmp_path)
    finally:
        hook.remove()
    noise = torch.randn(
        (1, 16, 2, result.height // 8, result.width // 8), generator=torch.Generator().manual_seed(1234)
    )
    t0 = rf_times(sigma_max, 2)[0].item()
    assert torch.equal(seen[0], (noise.double() * t0).bfloat16())
