"""VideoPipeline: prompt (and image) in, mp4 files out, with the models loaded once.

A request runs four stages: encode (prompt through umT5, cached; the I2V image through the VAE),
denoise (rCM sampling with the DiT, switching I2V experts at the boundary), decode (VAE) and mux
(mp4 files and a thumbnail). Before each stage the memory plan decides which modules sit on the GPU.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch import nn

from turbovideo.catalog import ModelSpec
from turbovideo.errors import InputError
from turbovideo.models import (
    DIT_CONFIGS,
    CheckpointError,
    TextKeys,
    build_dit,
    build_text_encoder,
    build_vae,
    encode_prompts,
    latent_shape,
    load_dit,
    load_tokenizer,
    prompt_rows,
    vae_dtype,
)
from turbovideo.models.attention import select_attention
from turbovideo.models.text_padding import context_lengths, context_rows, key_count
from turbovideo.models.tokenizer import PromptTokenizer
from turbovideo.pipeline.assets import pick_variant, shared_assets
from turbovideo.pipeline.conditioning import image_condition
from turbovideo.pipeline.device_slots import DeviceSlot, canonical_device, held_host_bytes, slot_for, slots_on
from turbovideo.pipeline.forward_graphs import graphs_on
from turbovideo.pipeline.host_memory import HostMemory, HostMemoryError, gib_text, read_host_memory
from turbovideo.pipeline.memory import (
    GIB,
    TEXT_ACTIVATION_BYTES,
    Placement,
    Stage,
    dit_activation_bytes,
    plan,
    text_keys_bytes,
    usable_bytes,
    vae_activation_bytes,
)
from turbovideo.pipeline.prompt_cache import PromptCache
from turbovideo.pipeline.refusals import what_fits
from turbovideo.pipeline.request import (
    GenerationRequest,
    GenerationResult,
    ProgressEvent,
    check_request,
    frame_size,
)
from turbovideo.pipeline.sampler import expert_per_step, network_timestep, rf_times, sample
from turbovideo.pipeline.video import SampleMuxer

log = logging.getLogger(__name__)

Progress = Callable[[ProgressEvent], None]
TEXT_ENCODER = "text_encoder"
VAE = "vae"


# How a refusal names the modules it would move to host memory.
_MODULE_LABELS = {
    TEXT_ENCODER: "text encoder",
    "dit": "DiT",
    "dit_high": "high-noise DiT",
    "dit_low": "low-noise DiT",
    VAE: "VAE",
}


class _Fit(NamedTuple):
    """A request's placement, the memory it may use, the other served models' slots that must go to
    host memory first, and whether the DiT's forwards replay as CUDA graphs (whose pool it counts)."""

    placement: Placement
    budget: int
    evict: list[DeviceSlot]
    graphed: bool


class VideoPipeline:
    """The loaded models of one catalog entry; ``generate`` turns a request into videos."""

    def __init__(
        self,
        spec: ModelSpec,
        experts: Sequence[nn.Module],
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: PromptTokenizer,
        device: torch.device,
        *,
        encoder_id: str,
        prompt_cache: PromptCache | None = None,
        gpu_memory_limit: int | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.experts = list(experts)
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.encoder_id = encoder_id
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache()
        self._expert_names = ["dit"] if len(self.experts) == 1 else ["dit_high", "dit_low"]
        named = {
            TEXT_ENCODER: text_encoder,
            **dict(zip(self._expert_names, self.experts, strict=True)),
            VAE: vae,
        }
        self._slots = {name: slot_for(module, device) for name, module in named.items()}
        # Cheapest to offload first: the text encoder is idle after encoding, the small VAE is kept longest.
        self._offload_order = [TEXT_ENCODER, *self._expert_names, VAE]
        self._placement: Placement | None = None
        self._dit_shards = 1
        # A cap below what the card has free, e.g. when another process shares the GPU.
        self.gpu_memory_limit = gpu_memory_limit
        # Replay the DiT's forwards as CUDA graphs where its experts stay on one GPU (forward_graphs.py).
        self.cuda_graphs = True
        self._graphs = graphs_on(device)
        self._graphed = False  # whether this request's placement leaves room for the graphs
        self._counted: tuple[str | None, int] = (None, 0)  # (prompt, its tokens), see _prompt_tokens
        # A request sets the experts' attention and moves modules between devices: one at a time.
        self._running = threading.Lock()

    # ----------------------------------------------------------------- construction

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        checkpoint_dir: Path | None = None,
        *,
        device: str | torch.device | None = None,
        quantized: bool | None = None,
        attention: str = "auto",
        prompt_cache_dir: Path | None = None,
    ) -> VideoPipeline:
        """Load ``spec``'s files from ``checkpoint_dir`` (laid out as their Hub filenames).

        Random-weight specs (``tiny-*``) need no folder. ``quantized=None`` picks the int8 files on
        cards under 40 GB, and falls back to the other variant when only that one is on disk.
        ``attention`` is checked here, so that a backend this machine cannot run fails before any
        loading; each request then runs the backend it names (``GenerationRequest.attention``).
        ``prompt_cache_dir`` keeps prompt embeddings across processes (``PromptCache``).
        """
        device = resolve_device(device)
        select_attention(attention, device)  # an unavailable backend fails before any loading
        prompt_cache = PromptCache(directory=None if prompt_cache_dir is None else Path(prompt_cache_dir))
        if spec.is_random:
            return cls.random(
                spec, device, quantized=bool(quantized), attention=attention, prompt_cache=prompt_cache
            )
        if checkpoint_dir is None:
            raise CheckpointError(
                f"model {spec.name} needs its checkpoints: run python scripts/download_checkpoints.py "
                f"--model {spec.name} --dest DIR, then pass that folder as the checkpoint directory"
            )
        folder = Path(checkpoint_dir)
        quantized = pick_variant(spec, folder, quantized, device)
        experts = [
            load_dit(folder / f.filename, name=spec.dit_config, device="cpu", quantized=quantized)
            for f in spec.dit_files(quantized)
        ]
        vae, text_encoder, tokenizer, encoder_id = shared_assets(folder, spec, device)
        pipe = cls(
            spec,
            experts,
            vae,
            text_encoder,
            tokenizer,
            device,
            encoder_id=encoder_id,
            prompt_cache=prompt_cache,
        )
        pipe._place_default()
        return pipe

    @classmethod
    def random(
        cls,
        spec: ModelSpec,
        device: str | torch.device | None = None,
        *,
        quantized: bool = False,
        attention: str = "auto",
        blocks: int | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> VideoPipeline:
        """Seeded random weights at ``spec``'s shapes (tiny models, tests and benchmarks).

        ``blocks`` keeps only the first N DiT blocks of each expert (benchmarks of models too big to
        hold twice; their DiT times scale with the block count).
        """
        device = resolve_device(device)
        experts = []
        for stem in spec.experts:
            expert = build_dit(
                spec.dit_config,
                device,
                quantized=quantized,
                attention=attention,
                seed=zlib.crc32(stem.encode()),
            )
            if blocks is not None:
                expert.blocks = expert.blocks[:blocks]
            experts.append(expert)
        tokenizer = load_tokenizer(None)
        pipe = cls(
            spec,
            experts,
            build_vae(spec.vae_config, device, dtype=vae_dtype(device)),
            build_text_encoder(spec.text_encoder_config, device),
            tokenizer,
            device,
            encoder_id=f"random:{spec.text_encoder_config}:{tokenizer.source}",
            prompt_cache=prompt_cache,
        )
        pipe._place_default()
        return pipe

    @classmethod
    def planning(cls, spec: ModelSpec, *, quantized: bool, device: torch.device) -> VideoPipeline:
        """``spec``'s modules at their real shapes on the meta device (no memory, no files), to plan
        their placement on ``device`` with: nothing to run."""
        meta = torch.device("meta")
        experts = [build_dit(spec.dit_config, meta, quantized=quantized) for _ in spec.experts]
        vae = build_vae(spec.vae_config, meta, dtype=vae_dtype(device))
        text_encoder = build_text_encoder(spec.text_encoder_config, meta)
        return cls(spec, experts, vae, text_encoder, load_tokenizer(None), device, encoder_id="meta")

    @classmethod
    def check_host_room(
        cls, specs: Sequence[ModelSpec], *, quantized: bool, device: str | torch.device | None = None
    ) -> None:
        """Raise the HostMemoryError ``load`` would raise, before any checkpoint is fetched: each model's
        default placement is planned as at load (``planning``) against this GPU's free memory. Each model
        is planned alone, as the first to load (the least it can move to the host); the load checks again
        with the others in place. Nothing to check on the CPU, where nothing is pinned."""
        device = resolve_device(device)
        if device.type != "cuda":
            return
        for spec in specs:
            cls.planning(spec, quantized=quantized, device=device)._place_default(move=False)

    def run_experts_with(self, wrap: Callable[[nn.Module], nn.Module], shards: int = 1) -> None:
        """Call each DiT expert through ``wrap(expert)`` from now on (e.g. the multi-GPU runner of
        turbovideo.parallel, which splits the tokens into ``shards``). The wrapper must use the
        expert's own weights: the memory plan keeps moving those."""
        self.experts = [wrap(expert) for expert in self.experts]
        self.cuda_graphs = False  # what the wrapper does (collectives across GPUs) is not captured
        self._dit_shards = shards
        self._place_default()  # the load planned for every token on this GPU

    # ----------------------------------------------------------------- requests

    def validate(self, request: GenerationRequest) -> None:
        """Raise ``InputError`` with one line for an invalid request; touches no model."""
        check_request(request, self.spec)
        select_attention(request.attention, self.device, DIT_CONFIGS[self.spec.dit_config].head_dim)

    @torch.inference_mode()
    def generate(
        self, request: GenerationRequest, out_dir: Path, progress: Progress | None = None
    ) -> GenerationResult:
        """``request``'s videos in ``out_dir``. Calls from several threads run one after another."""
        with self._running:
            return self._generate(request, out_dir, progress)

    def _generate(
        self, request: GenerationRequest, out_dir: Path, progress: Progress | None
    ) -> GenerationResult:
        self.validate(request)
        report = progress or (lambda event: None)
        width, height = frame_size(request, self.spec)
        clock = _StageClock(self.device)
        self._place_for(request)

        image = request.image if request.task == "i2v" else None
        encode_total = 1 if image is None else 2
        context = self._encode_prompt(request.prompt).repeat(request.num_samples, 1, 1)
        report(ProgressEvent("encode", 1, encode_total))
        condition = None
        if image is not None:
            self._enter({VAE})
            y = image_condition(
                self.vae.encode, image, width, height, request.num_frames, self.device, self.vae.dtype
            )
            condition = y.repeat(request.num_samples, 1, 1, 1, 1)
            report(ProgressEvent("encode", 2, encode_total))
        clock.lap("encode")

        latent, attention_backend = self._denoise(request, context, condition, width, height, report)
        clock.lap("denoise")

        self._enter({VAE})
        muxer = SampleMuxer(Path(out_dir), request.num_samples, width, height, request.fps)
        decoded = False

        def on_muxed(done: int, total: int) -> None:
            if decoded:  # a decode that failed (or was stopped) finished no video: report none as muxed
                report(ProgressEvent("mux", done, total))

        try:
            num_frames = self._decode(latent, muxer, report)
            decoded = True
            clock.lap("decode")
        finally:  # also on failure: no ffmpeg process is left behind
            paths = muxer.close(on_muxed)
        clock.lap("mux")
        return GenerationResult(
            videos=paths,
            thumbnail=muxer.thumbnail,
            width=width,
            height=height,
            num_frames=num_frames,
            fps=request.fps,
            duration_s=num_frames / request.fps,
            seed=request.seed,
            attention_backend=attention_backend,
            timings=clock.timings(),
            warnings=self._prompt_warnings(request.prompt),
        )

    def _decode(self, latent: torch.Tensor, muxer: SampleMuxer, report: Progress) -> int:
        """Decode the samples into ``muxer`` one after the other; returns a video's frame count. One
        at a time needs a quarter of the memory for four samples and is no slower (H200, 480p: 2.86 s
        against 2.98 s for four at once)."""
        samples, num_latent = latent.shape[0], latent.shape[2]
        total = samples * num_latent
        for index in range(samples):
            # Only the frame count is kept: holding a sample's video (fp32, on the GPU) while the next one
            # decodes would need two videos' memory, and the plan counts one.
            num_frames = self.vae.decode(
                latent[index : index + 1],
                lambda done, _, before=index * num_latent: report(
                    ProgressEvent("decode", before + done, total)
                ),
                lambda frames, index=index: muxer.add(frames, index),
            ).shape[2]
        return num_frames

    def warm_up(self, progress: Progress | None = None) -> float:
        """Generate one throwaway video of the default request with one step (or two); returns seconds.

        A process's first request also pays for loading the compiled kernels, cuDNN's convolution
        search and CUDA's lazy module loading (H200, 1.3B int8: 4.6 s instead of 1.6 s with Triton's
        cache warm, 27 s with it empty); a worker pays that before it takes jobs. One step of one
        expert is enough (every expert runs the same kernels at the same shapes), and the frame count
        and size are the default request's, whose shapes are the ones Triton and cuDNN specialize on.
        The prompt goes through the text encoder (so it warms up too) without entering the prompt cache.
        ``progress`` hears each step, as in ``generate`` (and may raise to stop the warm-up there).
        Where the DiT's forwards replay as CUDA graphs it runs two steps: the second captures them (a
        T2V model's, for prompts of up to 48 tokens), and then the prompt's text keys are made a second
        time, which captures theirs, so that a first such request replays both. Then one DiT block runs
        at each other prompt length (``_warm_context_lengths``).
        """
        image = Image.new("RGB", (16, 9), (128, 128, 128)) if self.spec.task == "i2v" else None
        steps = 2 if self.cuda_graphs and self.device.type == "cuda" else 1
        request = GenerationRequest(prompt="warm-up", task=self.spec.task, image=image, num_steps=steps)
        started = time.perf_counter()
        kept, self.prompt_cache = self.prompt_cache, PromptCache(capacity=1)
        try:
            with tempfile.TemporaryDirectory(prefix="turbovideo-warm-up-") as scratch:
                self.generate(request, Path(scratch), progress=progress)
            self._warm_text_keys(request.prompt)
        finally:
            self.prompt_cache = kept
        self._warm_context_lengths(request)
        return time.perf_counter() - started

    @torch.inference_mode()
    def _warm_text_keys(self, prompt: str) -> None:
        """Make the text keys of ``prompt`` (just generated) again for each expert whose forward the
        generation captured: their graph is captured at this second call, as a forward's is."""
        for expert in self.experts:
            if self._graphed and self._graphs.captured(expert):
                self._graphs(expert, self._encode_prompt(prompt), method="text_keys")

    @torch.inference_mode()
    def _warm_context_lengths(self, request: GenerationRequest) -> None:
        """Run the first expert's first block at ``request``'s size with every other context length
        (text_padding.context_lengths): cuDNN builds an attention plan the first time it sees a key
        count, which a first request of that prompt length would otherwise wait for (H200, 1.3B 480p:
        0.74 s for 128 keys, 0.07 s for 192). Not where the experts' cross-attention is a Triton kernel
        (int8 models), whose one compiled launch takes every key count."""
        name, expert = self._expert_names[0], self.experts[0]
        if self._dit_shards != 1 or expert.blocks[0].cross_attn.writes_int8:
            return  # a multi-GPU wrapper runs the experts with its own shapes; or no cuDNN plans to make
        width, height = frame_size(request, self.spec)
        config = expert.config
        self._enter({name})
        channels, *grid = latent_shape(request.num_frames, width, height)
        x = torch.zeros((1, channels, *grid), dtype=torch.bfloat16, device=self.device)
        y = None
        if config.task == "i2v":
            y = torch.zeros((1, config.cond_dim, *grid), dtype=torch.bfloat16, device=self.device)
        t = network_timestep(0.5, 1, self.device)
        for rows in context_lengths(config.text_len)[1:]:  # the warm-up's prompt ran the shortest
            context = torch.zeros((1, rows, config.text_dim), dtype=torch.bfloat16, device=self.device)
            tokens, inputs = expert.embed(x, t, context, y)
            expert.blocks[0](tokens, inputs.e0, inputs.text.of_block(0), inputs.rope)

    def _prompt_warnings(self, prompt: str) -> list[str]:
        tokens, keep = self.tokenizer.token_count(prompt), self.tokenizer.max_length - 1
        if tokens <= keep:
            return []
        return [f"the prompt has {tokens} tokens; the text encoder read only its first {keep}"]

    def _prompt_tokens(self, prompt: str) -> int:
        """``prompt``'s token count, kept for the last prompt: a refused request's advice plans many sizes."""
        if self._counted[0] != prompt:
            self._counted = (prompt, self.tokenizer.token_count(prompt))
        return self._counted[1]

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        text = self.tokenizer.clean(prompt)
        cached = self.prompt_cache.get(self.encoder_id, text)
        if cached is None:
            self._enter({TEXT_ENCODER})
            # The raw prompt: the tokenizer cleans it (once, as upstream); cleaning the clean text again
            # can change it (HTML entities one level deeper unescaped).
            cached = encode_prompts([prompt], self.tokenizer, self.text_encoder).cpu()
            self.prompt_cache.put(self.encoder_id, text, cached)
        # The prompt's rows only (the DiT attends to the zero padding after them at less cost), and the
        # zero rows up to the next of a few lengths, so that prompts of similar length share shapes.
        rows = context_rows(prompt_rows(cached).shape[1], self.experts[0].config.text_len)
        return cached[:, :rows].to(self.device, non_blocking=True)

    def _denoise(
        self,
        request: GenerationRequest,
        context: torch.Tensor,
        condition: torch.Tensor | None,
        width: int,
        height: int,
        report: Progress,
    ) -> tuple[torch.Tensor, str]:
        """The denoised latent, and the attention backend of the expert that ran the last step (an
        I2V request whose boundary sits above the first step's time never runs the high-noise one)."""
        sigma_max = request.sigma_max if request.sigma_max is not None else self.spec.default_sigma_max
        times = rf_times(sigma_max, request.num_steps)
        expert_index = (
            expert_per_step(times, request.boundary) if len(self.experts) > 1 else [0] * request.num_steps
        )
        shape = (request.num_samples, *latent_shape(request.num_frames, width, height))

        keys: dict[int, TextKeys] = {}  # the running expert's keys of the prompt, the same at every step

        def velocity(step: int, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            index = expert_index[step]
            self._enter({self._expert_names[index]})
            expert = self.experts[index]
            expert.set_attention(request.attention, request.sla_topk)
            if self._dit_shards != 1:  # the multi-GPU wrapper takes the umT5 rows
                return expert(x, timestep, context, condition)
            if index not in keys:
                keys.clear()  # the experts take turns once: the one before is done
                if self._graphed:
                    keys[index] = self._graphs(expert, context, method="text_keys")
                else:
                    keys[index] = expert.text_keys(context)
            if self._graphed:
                return self._graphs(expert, x, timestep, keys[index], condition)
            return expert(x, timestep, keys[index], condition)

        generator = torch.Generator(device=self.device).manual_seed(request.seed)
        total = request.num_steps
        latent = sample(
            velocity,
            shape,
            times,
            generator,
            ode=request.ode,
            on_step=lambda i: report(ProgressEvent("denoise", i + 1, total)),
        )
        return latent, self.experts[expert_index[-1]].attention_backend

    # ----------------------------------------------------------------- memory

    @property
    def graphed_forwards(self) -> int:
        """How many (expert, input shape) DiT forwards replay as CUDA graphs now."""
        return sum(self._graphs.captured(expert) for expert in self.experts)

    @property
    def placement(self) -> Placement | None:
        """The last request's GPU placement (None on the CPU, where everything stays put)."""
        return self._placement

    def _place_default(self, *, move: bool = True) -> None:
        """Place the modules for the default request at load (``move=False``: only check that it can). If
        even that does not fit, each request decides (and says what would fit) instead of the load failing."""
        default = GenerationRequest(prompt="-", task=self.spec.task)
        try:
            self._place_for(default, move=move, at_load=True)
        except HostMemoryError:  # an InputError too, but it fails the load: no default-size request could run
            raise
        except InputError as exc:
            if not move:  # said at load
                return
            # Said as a note on the model, not on the caller's request, which may well fit (e.g. the CLI's).
            log.warning(
                "the default request does not fit on this GPU (%d frames at %s %s, one sample); each request "
                "is checked as it comes: %s",
                default.num_frames,
                self.spec.default_resolution,
                default.aspect_ratio,
                exc,
            )

    def _stages(self, request: GenerationRequest, width: int, height: int, graphed: bool) -> list[Stage]:
        """The request's stages; ``graphed``: with the CUDA graphs' pool held throughout (up to what it
        holds now plus this request's forward, should that be a new shape), the denoising's activations in it."""
        config = self.experts[0].config
        channels, *grid = latent_shape(request.num_frames, width, height)
        tokens = math.prod(n // p for n, p in zip(grid, config.patch_size, strict=True))
        latent = request.num_samples * channels * math.prod(grid)
        # Over several GPUs each holds its share of the tokens; the sampler state stays whole here.
        dit = dit_activation_bytes(
            request.num_samples, -(-tokens // self._dit_shards), config.dim, config.ffn_dim, latent
        )
        keys = key_count(self._prompt_tokens(request.prompt) + 1, config.text_len)  # with </s>
        dit += text_keys_bytes(request.num_samples, config.num_layers, keys, config.dim)
        # The VAE encodes the one image and decodes one sample at a time.
        vae = vae_activation_bytes(request.num_frames, height, width)
        held = self._graphs.pool_bytes + dit if graphed else 0
        stages = [Stage("text", (TEXT_ENCODER,), TEXT_ACTIVATION_BYTES + held)]
        if request.task == "i2v":
            stages.append(Stage("image", (VAE,), vae + held))
        stages += [Stage(f"denoise-{name}", (name,), max(dit, held)) for name in self._expert_names]
        stages.append(Stage("decode", (VAE,), vae + held))
        return stages

    def _plan(self, request: GenerationRequest) -> _Fit:
        """Where ``request`` runs (moves nothing: a request that is refused must leave the other models
        where they are). CUDA graphs only where every expert stays resident with their pool counted;
        else the request runs eagerly, as it would without them."""
        width, height = frame_size(request, self.spec)
        sizes = {name: slot.nbytes for name, slot in self._slots.items()}
        if self.cuda_graphs:
            fit = _Fit(*self._fit(sizes, self._stages(request, width, height, True)), graphed=True)
            if fit.placement.fits and not fit.placement.swapped & set(self._expert_names):
                return fit
        return _Fit(*self._fit(sizes, self._stages(request, width, height, False)), graphed=False)

    def _fit(self, sizes: dict[str, int], stages: list[Stage]) -> tuple[Placement, int, list[DeviceSlot]]:
        """The placement, its budget, and the other served models' slots that must go to host memory
        first for it to fit (each brings its own back when it runs)."""
        budget = self._budget()
        placement = plan(budget, sizes, stages, self._offload_order)
        own = {id(slot) for slot in self._slots.values()}
        others = [slot for slot in slots_on(self.device) if id(slot) not in own]
        if placement.fits or not others:
            return placement, budget, []
        budget = self._budget(freed=sum(slot.nbytes for slot in others))
        return plan(budget, sizes, stages, self._offload_order), budget, others

    def _too_big(self, request: GenerationRequest, placement: Placement, budget: int) -> str:
        """One line for a request no placement fits: what it needs, what the GPU has, and what fits."""
        advice = what_fits(
            request,
            self.spec,
            lambda changed: self._plan(changed).placement.fits,
            "does not fit on this GPU, not even",
        )
        return (
            f"this request needs about {placement.peak_bytes / GIB:.1f} GiB of GPU memory and this GPU has "
            f"{budget / GIB:.1f} GiB for it; {advice}"
        )

    def _place_for(self, request: GenerationRequest, *, move: bool = True, at_load: bool = False) -> None:
        """Decide ``request``'s placement and move the resident modules onto the device (``move=False``:
        only the checks). A request that does not fit raises InputError before any module moves
        (``at_load``: the load's default request, whose host-memory refusal fails the load)."""
        if self.device.type != "cuda":
            self._placement = None
            return
        placement, budget, evict, graphed = self._plan(request)
        if not placement.fits:
            raise InputError(self._too_big(request, placement, budget))
        self._refuse_if_host_short(request, placement, evict, at_load)
        if not move:
            return
        for slot in evict:
            slot.to_host()
        before = self._placement
        if before is None or (before.resident, before.swapped) != (placement.resident, placement.swapped):
            log.info(
                "GPU placement: resident %s, moved on demand %s",
                sorted(placement.resident),
                sorted(placement.swapped),
            )
        self._placement = placement
        self._graphed = graphed
        if not graphed:  # its pool's memory is counted free
            self._graphs.clear()
        self._enter(set())
        for name in placement.swapped:
            self._slots[name].pin()

    def _host_shortfall(self, placement: Placement, evict: list[DeviceSlot]) -> tuple[int, HostMemory] | None:
        """The bytes of new pinned host copies ``placement`` would make (of its swapped modules, and of
        the other models' weights in ``evict``) and the host memory there is, when they do not fit in
        what this process has left: the host's MemAvailable or, if tighter, its container's limit less
        what the container holds. Copies made earlier are kept (and counted in what is held).
        Loading is not counted: the checkpoint files are memory-mapped (page cache, which the kernel drops
        before it kills), and only small casts (the VAE's fp32 weights to bf16) allocate."""
        moved = [self._slots[name] for name in self._offload_order if name in placement.swapped]
        needed = sum(slot.host_bytes for slot in moved + evict if not slot.has_host_copy)
        host = read_host_memory() if needed else None
        return None if host is None or needed <= host.room else (needed, host)

    def _refuse_if_host_short(
        self, request: GenerationRequest, placement: Placement, evict: list[DeviceSlot], at_load: bool
    ) -> None:
        """Raise HostMemoryError, before anything moves, when the pinned host copies ``placement`` would
        make do not fit in host memory (``_host_shortfall``): with the largest request that fits, or at
        load (nothing smaller than the default request to suggest) with what the machine needs."""
        shortfall = self._host_shortfall(placement, evict)
        if shortfall is None:
            return
        needed, host = shortfall
        moved = [name for name in self._offload_order if name in placement.swapped]
        names = [_MODULE_LABELS.get(name, name) for name in moved]
        names += ["the other served models' weights"] if evict else []
        what = ("its " if moved else "") + " and ".join(
            [", ".join(names[:-1]), names[-1]] if len(names) > 1 else names
        )
        limit = "its container's memory limit leaves" if host.room < host.available else "the host has"
        held = held_host_bytes()
        made = f" (the copies made so far take {held / GIB:.1f} GiB)" if held else ""

        def accepts(changed: GenerationRequest) -> bool:
            changed_placement, _, changed_evict, _ = self._plan(changed)
            return changed_placement.fits and self._host_shortfall(changed_placement, changed_evict) is None

        if at_load:
            advice = "use a machine with more memory, or a GPU with more, which keeps more of them there"
        else:
            advice = what_fits(
                request, self.spec, accepts, "needs more host memory than this worker has, even for"
            )
        raise HostMemoryError(
            f"model {self.spec.name} moves {what} to host memory while idle, in pinned copies that need about "
            f"{gib_text(needed, up=True)} GiB more, and {limit} {gib_text(host.room)} GiB free{made}",
            advice,
        )

    def _budget(self, freed: int = 0) -> int:
        """What this pipeline's placement may use: free memory, the allocator's cache and its own weights,
        plus ``freed`` bytes of other weights that would go to host memory first."""
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        ours = sum(slot.nbytes for slot in self._slots.values() if slot.on_device)
        budget = usable_bytes(free + cached + ours + freed)
        if self.gpu_memory_limit is not None:
            budget = min(budget, self.gpu_memory_limit)
        return budget

    def _enter(self, active: set[str]) -> None:
        """Put ``active`` and the resident modules on the device and the other modules on the host."""
        if self._placement is None:
            return
        wanted = active | self._placement.resident
        for name, slot in self._slots.items():
            if name not in wanted:
                slot.to_host()
        for name in wanted:
            self._slots[name].to_device()


class _StageClock:
    """Seconds per stage, with the GPU synchronised at each boundary so queued work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.stages[stage] = now - self.last
        self.last = now

    def timings(self) -> dict[str, float]:
        return {**self.stages, "total": self.last - self.start}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> the current CUDA device if there is one, else the CPU; "cuda" gets its index."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return canonical_device(device)
