"""GPU placement policy (pure decision logic) and the pinned-memory mover."""

import dataclasses
import re

import pytest
import torch
from PIL import Image
from torch import nn

from turbovideo.catalog import MODELS, prefer_quantized
from turbovideo.errors import InputError
from turbovideo.pipeline import GenerationRequest, HostMemoryError, VideoPipeline
from turbovideo.pipeline import pipeline as pipeline_module
from turbovideo.pipeline.device_slots import (
    _LIVE_SLOTS,
    DeviceSlot,
    _host_copies,
    module_bytes,
    pack_pinned,
    pinned_bytes,
)
from turbovideo.pipeline.host_memory import GIB, HostMemory
from turbovideo.pipeline.memory import (
    TEXT_ACTIVATION_BYTES,
    Stage,
    dit_activation_bytes,
    plan,
    text_keys_bytes,
    usable_bytes,
    vae_activation_bytes,
)

GB = 10**9
UMT5 = 11_400_000_000
VAE = 254_000_000
DIT_13B_QUANT = 1_450_000_000
DIT_14B = 28_600_000_000
DIT_14B_QUANT = 14_500_000_000
DIM_13B, FFN_13B, DIM_14B, FFN_14B = 1536, 8960, 5120, 13824


def _t2v_stages(width, height, frames, dim, ffn):
    latent_frames = 1 + (frames - 1) // 4
    tokens = latent_frames * (height // 16) * (width // 16)
    latent = 16 * latent_frames * (height // 8) * (width // 8)
    return [
        Stage("text", ("text_encoder",), TEXT_ACTIVATION_BYTES),
        Stage("denoise", ("dit",), dit_activation_bytes(1, tokens, dim, ffn, latent)),
        Stage("decode", ("vae",), vae_activation_bytes(frames, height, width)),
    ]


def test_13b_quant_with_umt5_and_vae_stay_resident_on_a_24gb_card():
    sizes = {"text_encoder": UMT5, "dit": DIT_13B_QUANT, "vae": VAE}
    placement = plan(
        usable_bytes(24 * GB),
        sizes,
        _t2v_stages(832, 480, 81, DIM_13B, FFN_13B),
        ["text_encoder", "dit", "vae"],
    )
    assert placement.fits
    assert placement.resident == {"text_encoder", "dit", "vae"} and not placement.swapped


def test_720p_on_a_24gb_card_offloads_the_text_encoder_first():
    sizes = {"text_encoder": UMT5, "dit": DIT_13B_QUANT, "vae": VAE}
    placement = plan(
        usable_bytes(24 * GB),
        sizes,
        _t2v_stages(1280, 720, 81, DIM_13B, FFN_13B),
        ["text_encoder", "dit", "vae"],
    )
    assert placement.fits
    assert placement.swapped == {"text_encoder"}
    assert placement.resident == {"dit", "vae"}


def test_14b_quant_720p_on_a_24gb_card_moves_each_idle_module_and_161_frames_do_not_fit():
    sizes = {"text_encoder": UMT5, "dit": DIT_14B_QUANT, "vae": VAE}
    order = ["text_encoder", "dit", "vae"]
    placement = plan(usable_bytes(24 * GB), sizes, _t2v_stages(1280, 720, 81, DIM_14B, FFN_14B), order)
    assert placement.fits and placement.swapped == {"text_encoder", "dit"}
    placement = plan(usable_bytes(24 * GB), sizes, _t2v_stages(1280, 720, 161, DIM_14B, FFN_14B), order)
    assert not placement.fits
    assert placement.resident == frozenset()
    assert placement.peak_bytes > usable_bytes(24 * GB)


def test_everything_resident_on_an_80gb_card_for_13b():
    sizes = {"text_encoder": UMT5, "dit": 2_840_000_000, "vae": VAE}
    placement = plan(
        usable_bytes(80 * GB),
        sizes,
        _t2v_stages(832, 480, 81, DIM_13B, FFN_13B),
        ["text_encoder", "dit", "vae"],
    )
    assert placement.fits and not placement.swapped


def test_a14b_i2v_on_80gb_keeps_both_experts_and_offloads_umt5():
    sizes = {"text_encoder": UMT5, "dit_high": DIT_14B, "dit_low": DIT_14B, "vae": VAE}
    tokens, latent = 21 * 45 * 80, 16 * 21 * 90 * 160
    dit = dit_activation_bytes(1, tokens, DIM_14B, FFN_14B, latent)
    vae = vae_activation_bytes(81, 720, 1280)
    stages = [
        Stage("text", ("text_encoder",), TEXT_ACTIVATION_BYTES),
        Stage("image", ("vae",), vae),
        Stage("denoise-high", ("dit_high",), dit),
        Stage("denoise-low", ("dit_low",), dit),
        Stage("decode", ("vae",), vae),
    ]
    order = ["text_encoder", "dit_high", "dit_low", "vae"]
    placement = plan(usable_bytes(80 * GB), sizes, stages, order)
    assert placement.fits and placement.swapped == {"text_encoder"}
    # On a 48 GB card only one expert fits at a time: the high one visits, the low one stays.
    placement = plan(usable_bytes(48 * GB), sizes, stages, order)
    assert placement.fits and placement.swapped == {"text_encoder", "dit_high", "dit_low"}
    assert placement.peak_bytes == VAE + DIT_14B + dit


def test_stage_peak_counts_visiting_modules_only_while_active():
    sizes = {"a": 10, "b": 10}
    stages = [Stage("one", ("a",), 0), Stage("two", ("b",), 10)]
    assert plan(30, sizes, stages, ["a", "b"]).swapped == frozenset()
    placement = plan(25, sizes, stages, ["a", "b"])
    assert placement.swapped == {"a"} and placement.peak_bytes == 20 and placement.fits
    placement = plan(15, sizes, stages, ["a", "b"])
    assert placement.swapped == {"a", "b"} and placement.peak_bytes == 20 and not placement.fits


def test_a_stage_that_fills_the_budget_exactly_fits():
    placement = plan(100, {"a": 60}, [Stage("one", ("a",), 40)], ["a"])
    assert placement.fits and placement.swapped == frozenset() and placement.peak_bytes == 100


def test_offload_order_names_a_model_does_not_have_are_never_swapped():
    # One offload order serves T2V and I2V models: a T2V model has no second expert to move.
    sizes = {"text_encoder": 10, "dit": 10, "vae": 10}
    stages = [Stage("denoise", ("dit",), 10)]
    placement = plan(15, sizes, stages, ["text_encoder", "dit_high", "dit_low", "dit", "vae"])
    assert placement.swapped == {"text_encoder", "dit", "vae"} and not placement.fits


def test_the_dit_estimate_counts_the_float64_sampler_state():
    # fp64 latent + fp32 noise + fp32 velocity + the bf16 input: 18 bytes a latent element.
    assert dit_activation_bytes(1, 0, 1536, 8960, 1000) == 18_000
    assert dit_activation_bytes(2, 10, 1536, 8960, 0) == 2 * 10 * (4 * 1536 + 2 * 8960) * 2


def test_quantized_choice_follows_card_size():
    assert prefer_quantized(24 * GB)
    assert not prefer_quantized(80 * GB)
    assert not prefer_quantized(None)


def test_activation_estimates_grow_with_the_request():
    small = vae_activation_bytes(81, 480, 832)
    assert vae_activation_bytes(81, 720, 1280) > small
    assert vae_activation_bytes(161, 480, 832) > small
    assert dit_activation_bytes(1, 32760, DIM_13B, FFN_13B, 0) < dit_activation_bytes(
        1, 75600, DIM_13B, FFN_13B, 0
    )


def test_the_text_keys_are_counted_for_every_sample_and_block():
    assert text_keys_bytes(1, 30, 64, DIM_13B) == 11_796_480  # k and v, bf16
    assert text_keys_bytes(2, 40, 512, DIM_14B) == 2 * 40 * text_keys_bytes(1, 1, 512, DIM_14B)


def test_device_slot_on_cpu_keeps_weights_in_place():
    module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    module.register_buffer("table", torch.arange(3.0))
    before = [t.data_ptr() for t in module.state_dict().values()]
    slot = DeviceSlot(module, torch.device("cpu"))
    assert slot.on_device and slot.nbytes == module_bytes(module) == (16 + 4 + 4 + 4 + 3) * 4
    slot.to_host()
    slot.to_device()
    assert [t.data_ptr() for t in module.state_dict().values()] == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_slot_round_trip_through_pinned_memory():
    module = nn.Linear(256, 256).cuda()
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    slot = DeviceSlot(module, torch.device("cuda"))
    slot.to_host()
    assert not slot.on_device and module.weight.is_pinned()
    host_ptr = module.weight.data_ptr()
    slot.to_device()
    assert slot.on_device
    assert all(torch.equal(v, expected[k]) for k, v in module.state_dict().items())
    slot.to_host()
    assert module.weight.data_ptr() == host_ptr  # the pinned copy is made once and reused


class _SimulatedGPU:
    """Just enough of torch.cuda for VideoPipeline._place_for on a CPU: free memory is what the slots
    placed on cuda:0 leave of ``total``; moving a slot flips its flag instead of copying. The host has
    ``host`` bytes free (``limit``: its container's limit, if any) less what the pinned copies take."""

    def __init__(self, monkeypatch, total: int, host: int = 1 << 50, limit: int | None = None) -> None:
        self.total, self.host, self.limit, self.monkeypatch = total, host, limit, monkeypatch
        self.slots: dict[int, DeviceSlot] = {}
        # A fresh card and host: the slots of earlier tests' pipelines (alive until garbage-collected) are
        # not on them.
        for slot in [slot for slot in list(_LIVE_SLOTS) if slot.device.type == "cuda"]:
            monkeypatch.setattr(slot, "_on_device", False)
            monkeypatch.setattr(slot, "_host", None)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.total - self.used(), total))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
        monkeypatch.setattr(DeviceSlot, "to_device", lambda slot: setattr(slot, "_on_device", True))
        monkeypatch.setattr(DeviceSlot, "to_host", lambda slot: self._copy(slot, on_device=False))
        monkeypatch.setattr(DeviceSlot, "pin", lambda slot: self._copy(slot, on_device=slot.on_device))
        monkeypatch.setattr(pipeline_module, "read_host_memory", self.host_memory)

    def used(self) -> int:
        return sum(slot.nbytes for slot in self.slots.values() if slot.on_device)

    def pinned(self) -> int:
        return sum(slot.host_bytes for slot in self.slots.values() if slot.has_host_copy)

    def host_memory(self) -> HostMemory:
        room = None if self.limit is None else self.limit - self.pinned()
        return HostMemory(available=self.host - self.pinned(), limit_room=room)

    def _copy(self, slot: DeviceSlot, on_device: bool) -> None:
        # A host copy now exists (nothing is copied); undone after the test, so that later tests' count of
        # pinned copies (held_host_bytes) does not meet these slots, alive until garbage-collected.
        self.monkeypatch.setattr(slot, "_host", slot._host or {})
        slot._on_device = on_device

    def adopt(self, pipe: VideoPipeline, sizes: dict[str, int]) -> VideoPipeline:
        pipe.device = torch.device("cuda", 0)
        for name, slot in pipe._slots.items():
            slot.device, slot._on_device, slot.nbytes = pipe.device, False, sizes[name]
            self.slots[id(slot)] = slot
        return pipe


def test_a_second_served_model_moves_the_first_ones_idle_weights_off_the_gpu(monkeypatch):
    # MODELS=<14B T2V>,<A14B I2V> on a 48 GB card: the T2V model fits whole and stays resident; the
    # I2V request must not then stack an expert on top of it (68.9 GB) but move the idle T2V weights.
    gpu = _SimulatedGPU(monkeypatch, total=48 * GB)
    t2v = gpu.adopt(
        VideoPipeline.random(MODELS["tiny-t2v"]), {"text_encoder": UMT5, "dit": DIT_14B, "vae": VAE}
    )
    i2v_sizes = {"text_encoder": UMT5, "dit_high": DIT_14B, "dit_low": DIT_14B, "vae": VAE}
    i2v = gpu.adopt(VideoPipeline.random(MODELS["tiny-i2v"]), i2v_sizes)
    t2v._place_for(GenerationRequest(prompt="-", task="t2v"))
    assert gpu.used() > 40 * GB
    i2v._place_for(GenerationRequest(prompt="-", task="i2v"))
    i2v._enter({"dit_high"})  # the first denoising step
    assert gpu.used() <= 48 * GB
    assert not any(slot.on_device for slot in t2v._slots.values())
    t2v._place_for(GenerationRequest(prompt="-", task="t2v"))  # the T2V model takes its place back
    assert all(slot.on_device for name, slot in t2v._slots.items() if name in t2v.placement.resident)
    assert gpu.used() <= 48 * GB


def _meta_pipeline(name: str, quantized: bool) -> VideoPipeline:
    """A catalog model at its real shapes, on the meta device (no memory behind it): enough to plan."""
    return VideoPipeline.planning(MODELS[name], quantized=quantized, device=torch.device("meta"))


def _adopt_real_sizes(gpu: _SimulatedGPU, pipe: VideoPipeline) -> VideoPipeline:
    return gpu.adopt(pipe, {name: module_bytes(slot.module) for name, slot in pipe._slots.items()})


def test_a_request_that_fits_no_placement_is_refused_saying_what_fits(monkeypatch):
    gpu = _SimulatedGPU(monkeypatch, total=24 * GB)
    pipe = _adopt_real_sizes(gpu, _meta_pipeline("TurboWan2.1-T2V-1.3B-480P", quantized=True))
    pipe._place_for(GenerationRequest(prompt="-"))
    used = gpu.used()
    request = GenerationRequest(prompt="-", resolution="720p", num_frames=161, num_samples=4)
    with pytest.raises(InputError) as refused:
        pipe._place_for(request)
    message = str(refused.value)
    assert "\n" not in message
    assert re.search(r"needs about \d+\.\d GiB of GPU memory and this GPU has 21\.\d GiB", message)
    assert re.search(r"it fits with num_samples at most 2 or num_frames at most \d+$", message)
    assert gpu.used() == used  # nothing moved for a refused request
    frames = int(message.rsplit(" ", 1)[1])
    pipe._place_for(GenerationRequest(prompt="-", resolution="720p", num_frames=161, num_samples=2))
    pipe._place_for(GenerationRequest(prompt="-", resolution="720p", num_frames=frames, num_samples=4))
    with pytest.raises(InputError):
        pipe._place_for(
            GenerationRequest(prompt="-", resolution="720p", num_frames=frames + 4, num_samples=4)
        )


def test_a_model_too_big_for_its_default_request_loads_and_says_what_fits(monkeypatch, caplog):
    # 14B int8 on a 20 GB card: 81 frames at 720p do not fit even with every other module off the GPU.
    gpu = _SimulatedGPU(monkeypatch, total=20 * GB)
    pipe = _adopt_real_sizes(gpu, _meta_pipeline("TurboWan2.1-T2V-14B-720P", quantized=True))
    pipe._place_default()
    assert (
        "the default request does not fit on this GPU (81 frames at 720p 16:9, one sample); each"
        in caplog.text
    )
    with pytest.raises(InputError, match=r"it fits with num_frames at most \d+$"):
        pipe._place_for(GenerationRequest(prompt="-"))
    # On a 16 GB card no 720p video fits, but a 480p one does; the bf16 files fit no size at all.
    gpu.total = 16 * GB
    with pytest.raises(InputError, match="it fits at resolution 480p$"):
        pipe._place_for(GenerationRequest(prompt="-", num_frames=5))
    pipe._place_for(GenerationRequest(prompt="-", resolution="480p", num_frames=5))
    # At 480p neither one sample of 161 frames nor four of 5 fit; one with fewer frames does.
    with pytest.raises(InputError, match=r"it fits with num_samples 1 and num_frames at most \d+$"):
        pipe._place_for(GenerationRequest(prompt="-", resolution="480p", num_frames=161, num_samples=4))
    gpu = _SimulatedGPU(monkeypatch, total=24 * GB)
    pipe = _adopt_real_sizes(gpu, _meta_pipeline("TurboWan2.1-T2V-14B-720P", quantized=False))
    with pytest.raises(
        InputError,
        match="model TurboWan2.1-T2V-14B-720P does not fit on this GPU, not even one 480p 16:9 sample of 5 frames$",
    ):
        pipe._place_for(GenerationRequest(prompt="-", resolution="480p", num_frames=5))


def test_a_refused_request_leaves_the_other_served_models_on_the_gpu(monkeypatch):
    # MODELS=<1.3B>,<14B 720P> on an 80 GB card: a 14B request too big even with the 1.3B model's weights
    # off the GPU is refused, and the 1.3B model keeps its place (its next job would reload 14 GB).
    gpu = _SimulatedGPU(monkeypatch, total=80 * GB)
    small = _adopt_real_sizes(gpu, _meta_pipeline("TurboWan2.1-T2V-1.3B-480P", quantized=False))
    small._place_for(GenerationRequest(prompt="-"))
    used = gpu.used()
    big = _adopt_real_sizes(gpu, _meta_pipeline("TurboWan2.1-T2V-14B-720P", quantized=False))
    with pytest.raises(InputError, match=r"it fits with num_samples at most 3 or num_frames at most \d+$"):
        big._place_for(GenerationRequest(prompt="-", num_frames=161, num_samples=4))
    assert gpu.used() == used
    assert all(slot.on_device for slot in small._slots.values())
    # A request that fits only without them still moves them.
    big._place_for(GenerationRequest(prompt="-", num_frames=161, num_samples=3))
    assert not any(slot.on_device for slot in small._slots.values())
    assert gpu.used() <= 80 * GB


def test_a_refusal_suggests_only_changes_the_request_can_make(monkeypatch):
    # 14B int8 on a 16 GB card. One 720p sample of the fewest frames: fewer frames or samples cannot be
    # asked for; 81 of them fit at 480p only as fewer frames (one sample is the fewest samples).
    gpu = _SimulatedGPU(monkeypatch, total=16 * GB)
    pipe = _adopt_real_sizes(gpu, _meta_pipeline("TurboWan2.1-T2V-14B-720P", quantized=True))
    with pytest.raises(InputError, match="; it fits at resolution 480p$"):
        pipe._place_for(GenerationRequest(prompt="-", num_frames=5))
    with pytest.raises(InputError) as refused:
        pipe._place_for(GenerationRequest(prompt="-", num_frames=81))
    found = re.search(r"; it fits at resolution 480p with num_frames at most (\d+)$", str(refused.value))
    assert found, refused.value
    pipe._place_for(GenerationRequest(prompt="-", resolution="480p", num_frames=int(found[1])))
    with pytest.raises(InputError):
        pipe._place_for(GenerationRequest(prompt="-", resolution="480p", num_frames=int(found[1]) + 4))
    # At 480p, the lowest resolution, only fewer samples and frames together fit: it says how many.
    request = GenerationRequest(prompt="-", resolution="480p", num_frames=81, num_samples=4)
    with pytest.raises(InputError) as refused:
        pipe._place_for(request)
    found = re.search(r"; it fits with num_samples 1 and num_frames at most (\d+)$", str(refused.value))
    assert found, refused.value
    frames = int(found[1])
    pipe._place_for(GenerationRequest(prompt="-", resolution="480p", num_frames=frames))
    with pytest.raises(InputError):
        pipe._place_for(GenerationRequest(prompt="-", resolution="480p", num_frames=frames + 4))


def test_a_model_too_big_for_any_adaptive_request_names_no_aspect_ratio(monkeypatch):
    # A14B int8 on an 8 GB card fits no video at all; an adaptive request's shape is the image's, so the
    # refusal must not name the request's (unused) aspect_ratio field.
    gpu = _SimulatedGPU(monkeypatch, total=8 * GB)
    pipe = _adopt_real_sizes(gpu, _meta_pipeline("TurboWan2.2-I2V-A14B-720P", quantized=True))
    image = Image.new("RGB", (900, 400))
    for adaptive, shape in ((True, ""), (False, " 16:9")):
        request = GenerationRequest(prompt="-", task="i2v", image=image, adaptive_resolution=adaptive)
        with pytest.raises(InputError, match=f"not even one 480p{shape} sample of 5 frames$"):
            pipe._place_for(request)


def test_pinned_copies_are_packed_into_power_of_two_blocks():
    # torch's pinned allocator rounds each block up to a power of two: one block per tensor took a 14B
    # DiT 1.53x its weights (a 141.6 MB FFN weight, 256 MiB). Packed into 1 GiB blocks it takes 1.03x.
    sizes = [5120 * 13824 * 2, 10, 4096, 4097, 0, 3 << 30]
    layout = pack_pinned(sizes)
    assert all(block & (block - 1) == 0 and block >= 4096 for block in layout.blocks)
    assert layout.blocks == (4 << 30,)  # the 3 GiB tensor's block (a power of two) has room for the rest
    assert pack_pinned([700 << 20, 700 << 20, 10]).blocks == (1 << 30, 1 << 30)
    placed = [
        (block, offset, offset + size) for (block, offset), size in zip(layout.places, sizes, strict=True)
    ]
    assert all(offset % 512 == 0 and end <= layout.blocks[block] for block, offset, end in placed)
    spans = sorted(placed)
    for (block, _, end), (next_block, start, _) in zip(spans, spans[1:], strict=False):
        assert block != next_block or end <= start  # no two copies overlap
    assert pinned_bytes([10, 4096, 4097, 0]) == 16384
    dit = _meta_pipeline("TurboWan2.1-T2V-14B-720P", quantized=False)._slots["dit"]
    assert dit.nbytes < dit.host_bytes < 1.04 * dit.nbytes


def test_host_copies_keep_values_dtypes_and_dense_strides():
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    tensors = [
        conv.weight.detach(),
        conv.bias.detach(),
        torch.arange(5),
        torch.tensor([True, False, True]),
        torch.empty(0, 4),
        torch.arange(12.0).view(3, 4).t(),  # dense, transposed
        torch.arange(12.0)[::2],  # not dense: copied contiguous
    ]
    copies = _host_copies(tensors, pin=False)
    for tensor, copy in zip(tensors, copies, strict=True):
        assert torch.equal(copy, tensor) and copy.dtype == tensor.dtype and copy.shape == tensor.shape
    assert copies[0].stride() == conv.weight.stride() and copies[5].stride() == (1, 4)
    assert copies[6].stride() == (1,)
    storage = {copy.untyped_storage().data_ptr() for copy in copies if copy.numel()}
    assert len(storage) == 1  # all cut from one block


def test_idle_weights_that_do_not_fit_in_host_memory_fail_the_load_before_any_copy(monkeypatch):
    # A14B bf16 on an 80 GB card keeps both experts on the GPU and the umT5 in pinned host memory: with
    # less free than that copy takes, the kernel's OOM killer would have ended the worker mid-load.
    gpu = _SimulatedGPU(monkeypatch, total=80 * GB, host=int(10.85 * GIB))
    pipe = _adopt_real_sizes(gpu, _meta_pipeline("TurboWan2.2-I2V-A14B-720P", quantized=False))
    umt5 = pipe._slots["text_encoder"].host_bytes
    assert umt5 > 10.8 * GIB > pipe._slots["text_encoder"].nbytes  # the weights alone would seem to fit
    with pytest.raises(HostMemoryError) as refused:
        pipe._place_default()
    assert str(refused.value) == (
        f"model TurboWan2.2-I2V-A14B-720P moves its text encoder to host memory while idle, in pinned copies that "
        f"need about {umt5 / GIB:.1f} GiB more, and the host has 10.8 GiB free; use a machine with more memory, "
        "or a GPU with more, which keeps more of them there"
    )
    assert gpu.used() == 0 and gpu.pinned() == 0  # nothing moved, nothing copied
    gpu.host = umt5
    pipe._place_default()
    assert pipe.placement.swapped == {"text_encoder"} and gpu.pinned() == umt5
    pipe._place_for(GenerationRequest(prompt="-", task="i2v"))  # the copy is made once: nothing more needed


def test_a_refused_requests_advice_counts_the_prompts_tokens_once(monkeypatch):
    # The plan sizes the prompt's text keys; the advice plans many sizes of the same request.
    gpu = _SimulatedGPU(monkeypatch, total=20 * GB)
    pipe = _adopt_real_sizes(gpu, _meta_pipeline("TurboWan2.1-T2V-14B-720P", quantized=True))
    counted: list[str] = []
    count = pipe.tokenizer.token_count
    monkeypatch.setattr(pipe.tokenizer, "token_count", lambda text: counted.append(text) or count(text))
    with pytest.raises(InputError, match=r"it fits with num_frames at most \d+$"):
        pipe._place_for(GenerationRequest(prompt="a red fox in the snow " * 40))
    assert len(counted) == 1


def test_a_request_whose_idle_weights_do_not_fit_in_host_memory_is_refused_and_moves_nothing(monkeypatch):
    # MODELS=<1.3B>,<14B 720P> on an 80 GB card in a 24 GiB container: the 14B request that fits only with
    # the 1.3B model's weights off the GPU needs their pinned copies too, more than the container has left.
    gpu = _SimulatedGPU(monkeypatch, total=80 * GB, limit=24 * GIB)
    small = _adopt_real_sizes(gpu, _meta_pipeline("TurboWan2.1-T2V-1.3B-480P", quantized=False))
    small._place_for(GenerationRequest(prompt="-"))
    big = _adopt_real_sizes(gpu, _meta_pipeline("TurboWan2.1-T2V-14B-720P", quantized=False))
    request = GenerationRequest(prompt="-", num_frames=161, num_samples=3)
    used = gpu.used()
    with pytest.raises(HostMemoryError) as refused:
        big._place_for(request)
    assert re.fullmatch(
        r"model TurboWan2\.1-T2V-14B-720P moves its text encoder and the other served models' weights to host "
        r"memory while idle, in pinned copies that need about \d+\.\d GiB more, and its container's memory limit "
        r"leaves 24\.0 GiB free; it fits with num_samples at most 2 or num_frames at most 121",
        str(refused.value),
    )
    assert isinstance(refused.value, InputError)  # the worker answers it as E_INPUT
    assert gpu.used() == used and gpu.pinned() == 0
    # The advice holds: each suggested size passes every check, one step more does not.
    for fits in (dict(num_samples=2), dict(num_frames=121)):
        big._place_for(dataclasses.replace(request, **fits), move=False)
    for too_big in (dict(num_samples=3), dict(num_frames=125)):
        with pytest.raises(HostMemoryError):
            big._place_for(dataclasses.replace(request, **too_big), move=False)
    assert gpu.used() == used and gpu.pinned() == 0
    assert all(slot.on_device for slot in small._slots.values())
    big._place_for(GenerationRequest(prompt="-"))  # the default request fits beside the 1.3B model
    assert gpu.pinned() == 0
    gpu.limit = 64 * GIB
    big._place_for(request)
    assert not any(slot.on_device for slot in small._slots.values())
    assert 24 * GIB < gpu.pinned() <= 64 * GIB


def test_a_host_memory_shortfall_never_reads_as_enough(monkeypatch):
    # 20 MiB short of the umT5's 11.0 GiB copy read "need about 11.0 GiB more, and the host has 11.0 GiB free".
    pipe = _meta_pipeline("TurboWan2.2-I2V-A14B-720P", quantized=False)
    gpu = _SimulatedGPU(monkeypatch, total=80 * GB)
    pipe = _adopt_real_sizes(gpu, pipe)
    umt5 = pipe._slots["text_encoder"].host_bytes
    gpu.host = umt5 - (20 << 20)
    with pytest.raises(HostMemoryError, match=r"need about 11\.0 GiB more, and the host has 10\.9 GiB free;"):
        pipe._place_default()


def test_a_full_gpu_leaves_nothing_to_plan_with_not_less():
    # A refusal said "this GPU has -0.5 GiB for it".
    assert usable_bytes(0) == 0 and usable_bytes(100 * 2**20) == 0
    assert usable_bytes(24 * GB) > 0
