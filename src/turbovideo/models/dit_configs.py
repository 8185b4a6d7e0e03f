"""Named Wan DiT configurations (spec §3.1) and the tiny ones used for CPU tests and the embedded default."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiTConfig:
    name: str
    label: str  # how error messages name the architecture, e.g. "Wan2.1-1.3B"
    task: str  # "t2v" or "i2v"
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    # Rows upstream pads the text context to with zeros (spec §3.3 step 5); a shorter context given to
    # the DiT stands for that padding (models/text_padding.py).
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    @property
    def cond_dim(self) -> int:
        """Channels of the I2V conditioning ``y`` (mask + image latent); 0 for T2V."""
        return self.in_dim - self.out_dim


DIT_CONFIGS: dict[str, DiTConfig] = {
    c.name: c
    for c in (
        DiTConfig("wan2.1-t2v-1.3b", "Wan2.1-1.3B", "t2v", 1536, 8960, 12, 30, 16),
        DiTConfig("wan2.1-t2v-14b", "Wan2.1-14B", "t2v", 5120, 13824, 40, 40, 16),
        DiTConfig("wan2.2-i2v-a14b", "Wan2.2-I2V-A14B", "i2v", 5120, 13824, 40, 40, 36),
        DiTConfig("tiny-t2v", "tiny T2V", "t2v", 64, 128, 2, 2, 16, text_dim=32),
        DiTConfig("tiny-i2v", "tiny I2V", "i2v", 64, 128, 2, 2, 36, text_dim=32),
    )
}
