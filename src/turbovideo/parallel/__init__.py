"""Multi-GPU inference: Ulysses sequence parallelism for the DiT, one process per GPU (issue 8).

Only the DiT is spread. Rank 0 alone encodes the prompt, decodes the latent and writes the mp4
while the other ranks idle: the VAE decodes latent frames one after another through a causal
cache, so splitting it would need spatial tiles with a halo exchange at every convolution, for a
stage of ~1.8 s (480p) / ~4.7 s (720p) on one H100 against ~24 s of 14B 720p DiT work that the
GPUs do share (performance.md).

Public names are resolved lazily, so that ``ParallelError`` can be imported without loading the models.
"""

from turbovideo.lazy import lazy_exports

_EXPORTS = {
    "ParallelError": "errors",
    "MULTICAST_OFF": "launcher",
    "ParallelDiT": "launcher",
    "SequenceParallelGroup": "launcher",
    "choose_degree": "launcher",
    "visible_ranks": "launcher",
    "UlyssesAttention": "ulysses",
    "check_head_split": "ulysses",
    "sharded_forward": "ulysses",
    "valid_degrees": "ulysses",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
