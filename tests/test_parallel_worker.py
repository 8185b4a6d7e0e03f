"""The worker with SP_DEGREE=2 on the CPU: the handler process leads a 2-process gloo group through real jobs.

A job runs end to end with every DiT forward shared by both ranks; a follower that dies makes the
next job answer E_CUDA with refresh_worker; bad SP_DEGREE values are start-up sentences.
"""

from __future__ import annotations

import pytest

from turbovideo.parallel import ParallelDiT
from turbovideo.worker.config import ConfigError, load_config
from turbovideo.worker.service import VideoService

FAST = {"num_frames": 5, "num_steps": 2}


def _config(tmp_path, **env):
    return load_config(
        {"MODELS": "tiny-t2v", "CACHE_DIR": str(tmp_path), "OUTPUT_DIR": str(tmp_path / "out"), **env}
    )


def test_jobs_run_on_both_ranks_until_one_dies(tmp_path):
    service = VideoService.from_config(_config(tmp_path, SP_DEGREE="2"))
    expert = service.pipelines["tiny-t2v"].experts[0]
    assert isinstance(expert, ParallelDiT)
    group = expert.group
    try:
        assert group.world_size == 2
        assert service.pipelines["tiny-t2v"]._dit_shards == 2  # the memory plan counts half the tokens
        answer = service.handle({"id": "sp-job", "input": {"prompt": "a red fox", "seed": 5, **FAST}})
        assert "error" not in answer, answer
        assert answer["num_frames"] == 5

        group._processes[0].kill()
        answer = service.handle({"id": "sp-dead", "input": {"prompt": "a red fox", **FAST}})
        assert answer["error"].startswith(
            "E_CUDA: the multi-GPU group failed (GPU rank 1 exited unexpectedly"
        )
        assert answer["refresh_worker"] is True
    finally:
        group.close()


def test_sp_degree_is_checked_at_start(tmp_path):
    for value in ("two", "\u00b2", "0"):  # "²" passes str.isdigit
        with pytest.raises(ConfigError, match=f"SP_DEGREE='{value}' is not valid"):
            _config(tmp_path, SP_DEGREE=value)
    # The tiny DiT has 2 heads: 3 ranks cannot share them (refused before any process starts).
    with pytest.raises(
        ConfigError, match="tiny T2V has 2 attention heads, which 3 GPUs cannot split evenly; use 2 GPUs"
    ):
        VideoService.from_config(_config(tmp_path, SP_DEGREE="3"))


def test_an_sp_degree_the_model_cannot_split_is_refused_before_any_download(tmp_path):
    # Was found after the checkpoints (tens of GB) had downloaded and loaded; offline here, so any
    # download would fail first with a missing-file sentence.
    config = _config(tmp_path, MODELS="TurboWan2.1-T2V-1.3B-480P", SP_DEGREE="5", HF_HUB_OFFLINE="1")
    with pytest.raises(
        ConfigError, match="Wan2.1-1.3B has 12 attention heads, which 5 GPUs cannot split evenly"
    ):
        VideoService.from_config(config)
    assert not list(tmp_path.glob("**/*.pth"))
