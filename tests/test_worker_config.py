"""Worker settings from the environment: defaults that run anywhere, one sentence for each mistake."""

from pathlib import Path

import pytest

from turbovideo.worker import config as config_module
from turbovideo.worker.config import (
    BucketConfig,
    ConfigError,
    load_config,
    sdk_log_level,
    use_quantized,
)

BUCKET_ENV = {
    "BUCKET_ENDPOINT_URL": "https://acct.r2.cloudflarestorage.com",
    "BUCKET_ACCESS_KEY_ID": "key-id",
    "BUCKET_SECRET_ACCESS_KEY": "secret",
    "BUCKET_NAME": "videos",
}


@pytest.fixture(autouse=True)
def no_volume(monkeypatch, tmp_path):
    monkeypatch.setattr(config_module, "RUNPOD_VOLUME", tmp_path / "not-mounted")


def test_a_fresh_machine_serves_the_tiny_models_locally(tmp_path):
    config = load_config({"CACHE_DIR": str(tmp_path / "cache")})
    assert [spec.name for spec in config.models] == ["tiny-t2v", "tiny-i2v"]
    assert config.variant == "auto" and config.bucket is None and not config.offline
    assert config.output_dir == Path("outputs") and config.durable_dir == Path("outputs")
    assert config.cache_dir == tmp_path / "cache"
    assert not config.on_runpod and not config.report_progress


@pytest.mark.parametrize("marker", ["RUNPOD_POD_ID", "RUNPOD_WEBHOOK_GET_JOB"])
def test_on_runpod_models_must_be_named(marker):
    with pytest.raises(ConfigError, match="MODELS is not set; set it in the endpoint's environment"):
        load_config({marker: "x", "CACHE_DIR": "/tmp/c"})


def test_models_are_resolved_in_order_with_aliases():
    config = load_config({"MODELS": "TurboWan2.1-T2V-1.3B-480P, tiny", "CACHE_DIR": "/tmp/c"})
    assert [s.name for s in config.models] == ["TurboWan2.1-T2V-1.3B-480P", "tiny-t2v", "tiny-i2v"]


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ConfigError) as caught:
        load_config({"MODELS": "wan-9000", "CACHE_DIR": "/tmp/c"})
    assert "MODELS='wan-9000' is not valid: unknown model 'wan-9000'" in str(caught.value)
    assert "TurboWan2.2-I2V-A14B-720P" in str(caught.value)


def test_checkpoint_variant_is_checked():
    assert load_config({"CHECKPOINT_VARIANT": "QUANT", "CACHE_DIR": "/tmp/c"}).variant == "quant"
    with pytest.raises(
        ConfigError, match="CHECKPOINT_VARIANT='fp8' is not valid; use one of auto, bf16, quant"
    ):
        load_config({"CHECKPOINT_VARIANT": "fp8", "CACHE_DIR": "/tmp/c"})


def test_a_bucket_prefix_pasted_with_spaces_is_trimmed_of_them_and_its_slashes():
    config = load_config({**BUCKET_ENV, "BUCKET_PREFIX": " /renders/2026/ ", "CACHE_DIR": "/tmp/c"})
    assert config.bucket.prefix == "renders/2026"


def test_a_complete_bucket_is_used_and_the_prefix_trimmed():
    config = load_config({**BUCKET_ENV, "BUCKET_PREFIX": "/renders/", "CACHE_DIR": "/tmp/c"})
    assert config.bucket == BucketConfig(
        "https://acct.r2.cloudflarestorage.com", "key-id", "secret", "videos", "renders"
    )


def test_pasted_bucket_settings_are_trimmed():
    # A key pasted with a trailing newline would be sent as is, and every upload refused as unsigned.
    padded = {name: f" {value}\n" for name, value in BUCKET_ENV.items()}
    config = load_config({**padded, "CACHE_DIR": "/tmp/c"})
    assert config.bucket == BucketConfig(
        "https://acct.r2.cloudflarestorage.com", "key-id", "secret", "videos", ""
    )


@pytest.mark.parametrize("path", ["/videos", "/videos/"])
def test_the_bucket_s3_api_url_cloudflare_shows_is_taken_as_its_endpoint(path):
    url = "https://acct.r2.cloudflarestorage.com" + path  # the dashboard's URL ends in the bucket's name
    config = load_config({**BUCKET_ENV, "BUCKET_ENDPOINT_URL": url, "CACHE_DIR": "/tmp/c"})
    assert config.bucket.endpoint_url == "https://acct.r2.cloudflarestorage.com"


def test_an_endpoint_path_that_is_not_the_bucket_is_kept():
    url = "https://s3.example.com/storage"  # a service behind a path: botocore keeps it
    assert (
        load_config({**BUCKET_ENV, "BUCKET_ENDPOINT_URL": url, "CACHE_DIR": "/tmp/c"}).bucket.endpoint_url
        == url
    )


@pytest.mark.parametrize(
    "url", ["https://acct.r2.cloudflarestorage.com/renders", "https://s3.eu-west-1.amazonaws.com/renders/x"]
)
def test_an_endpoint_path_naming_another_bucket_at_r2_or_aws_is_refused(url):
    with pytest.raises(ConfigError) as info:
        load_config({**BUCKET_ENV, "BUCKET_ENDPOINT_URL": url, "CACHE_DIR": "/tmp/c"})
    assert str(info.value).startswith(f"BUCKET_ENDPOINT_URL={url!r} has a path (/")
    assert "the videos would go to bucket 'renders'" in str(info.value)


def test_an_endpoint_with_a_password_is_refused_without_echoing_it():
    url = "https://user:pa55word@acct.r2.cloudflarestorage.com"
    with pytest.raises(ConfigError, match="^BUCKET_ENDPOINT_URL holds a user name or password") as info:
        load_config({**BUCKET_ENV, "BUCKET_ENDPOINT_URL": url, "CACHE_DIR": "/tmp/c"})
    assert "pa55word" not in str(info.value)


@pytest.mark.parametrize("name", ["BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY"])
@pytest.mark.parametrize("value", ["AKIA\n0001", "AKIA 0001", "AKIA\u00a00001"])
def test_a_bucket_key_with_spaces_or_odd_characters_is_refused_without_echoing_it(name, value):
    value = value.encode().decode("unicode_escape")
    with pytest.raises(
        ConfigError, match=f"^{name} contains spaces or characters other than printable ASCII"
    ):
        load_config({**BUCKET_ENV, name: value, "CACHE_DIR": "/tmp/c"})


@pytest.mark.parametrize("prefix", ["./renders", "a/../b", "renders/.."])
def test_a_prefix_with_dot_folders_is_refused(prefix):
    with pytest.raises(ConfigError, match="^BUCKET_PREFIX=.* has a '.' or '..' folder"):
        load_config({**BUCKET_ENV, "BUCKET_PREFIX": prefix, "CACHE_DIR": "/tmp/c"})


@pytest.mark.parametrize("name", ["videos/renders", "s3://videos", "my videos", "arn:videos/renders"])
def test_a_bucket_name_no_s3_client_can_send_is_refused_at_start(name):
    with pytest.raises(
        ConfigError, match="BUCKET_NAME=.* is not a bucket name .* put a folder inside it in BUCKET_PREFIX"
    ):
        load_config({**BUCKET_ENV, "BUCKET_NAME": name, "CACHE_DIR": "/tmp/c"})


def test_an_access_point_arn_is_a_bucket_name():
    arn = "arn:aws:s3:us-east-1:123456789012:accesspoint/videos"
    assert load_config({**BUCKET_ENV, "BUCKET_NAME": arn, "CACHE_DIR": "/tmp/c"}).bucket.name == arn


def test_a_blank_bucket_setting_counts_as_missing():
    with pytest.raises(ConfigError, match="but BUCKET_ACCESS_KEY_ID missing"):
        load_config({**BUCKET_ENV, "BUCKET_ACCESS_KEY_ID": "  ", "CACHE_DIR": "/tmp/c"})
    assert load_config({k: " " for k in BUCKET_ENV} | {"CACHE_DIR": "/tmp/c"}).bucket is None


def test_a_partial_bucket_is_a_config_error_naming_what_is_missing():
    env = {k: v for k, v in BUCKET_ENV.items() if k != "BUCKET_NAME"}
    with pytest.raises(ConfigError, match="but BUCKET_NAME missing"):
        load_config({**env, "CACHE_DIR": "/tmp/c"})


def test_failed_uploads_are_kept_on_the_volume_when_one_is_mounted(monkeypatch, tmp_path):
    monkeypatch.setattr(config_module, "RUNPOD_VOLUME", tmp_path)
    config = load_config({"CACHE_DIR": str(tmp_path / "turbovideo"), "OUTPUT_DIR": "/tmp/o"})
    assert config.durable_dir == tmp_path / "turbovideo" / "outputs"
    assert config.output_dir == Path("/tmp/o")


def test_offline_and_progress_flags():
    config = load_config(
        {"HF_HUB_OFFLINE": "1", "RUNPOD_WEBHOOK_POST_OUTPUT": "https://x", "CACHE_DIR": "/c"}
    )
    assert config.offline and config.report_progress


@pytest.mark.parametrize(
    "value, warm_up", [("", None), ("auto", None), ("1", True), (" On", True), ("0", False), ("false", False)]
)
def test_warm_up_is_automatic_unless_set(value, warm_up):
    assert load_config({"WARMUP": value, "CACHE_DIR": "/c"}).warm_up is warm_up


def test_an_unknown_warm_up_value_is_a_config_error():
    with pytest.raises(ConfigError, match=r"WARMUP='later' is not valid; use auto .*, 1 .* or 0"):
        load_config({"WARMUP": "later", "CACHE_DIR": "/c"})


@pytest.mark.parametrize(
    "variant, gpu_bytes, quantized",
    [
        ("auto", None, False),  # CPU
        ("auto", 80 * 10**9, False),  # H100
        ("auto", 24 * 10**9, True),  # RTX 4090
        ("bf16", 24 * 10**9, False),
        ("quant", 80 * 10**9, True),
    ],
)
def test_checkpoint_variant_follows_gpu_memory_unless_set(variant, gpu_bytes, quantized):
    assert use_quantized(variant, gpu_bytes) is quantized


@pytest.mark.parametrize("token", ["hf_abcdefghijklmnop\n", " hf_abcdefghijklmnop "])
def test_hf_token_is_trimmed(token):
    assert load_config({"HF_TOKEN": token, "CACHE_DIR": "/tmp/c"}).hf_token == "hf_abcdefghijklmnop"


@pytest.mark.parametrize("token", ["hf_abc defghijklmnop", "hf_abcdéfghijklmnop", "hf_abc\x00defghijklmnop"])
def test_a_hf_token_no_header_can_carry_is_refused_without_echoing_it(token):
    with pytest.raises(ConfigError, match=r"^HF_TOKEN contains spaces or characters") as info:
        load_config({"HF_TOKEN": token, "CACHE_DIR": "/tmp/c"})
    assert "hf_abc" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "r2.example.com",
        "acct.r2.cloudflarestorage.com/videos",
        "ftp://x.example",
        # botocore refuses these only when the client is made (a traceback at start) or at the first
        # upload (every job's video kept instead of delivered).
        "https://[oops",
        "https://acct.r2.cloudflarestorage.com:abc",
        "https://exa mple.com",
        "https://acct.r2.cloudflarestorage.com?x=1",
    ],
)
def test_a_bucket_endpoint_without_scheme_is_a_config_error(url):
    with pytest.raises(ConfigError, match=r"^BUCKET_ENDPOINT_URL=.* is not an http\(s\) URL"):
        load_config({**BUCKET_ENV, "BUCKET_ENDPOINT_URL": url, "CACHE_DIR": "/tmp/c"})


@pytest.mark.parametrize("inside", ["file", "file/videos"])
def test_an_output_dir_that_cannot_be_a_directory_is_a_config_error(tmp_path, inside, monkeypatch):
    (tmp_path / "file").write_text("")
    env = {"OUTPUT_DIR": str(tmp_path / inside), "CACHE_DIR": "/tmp/c"}
    with pytest.raises(
        ConfigError, match=rf"^OUTPUT_DIR=.* cannot be a directory: {tmp_path / 'file'} is a file$"
    ):
        load_config(env)
    # With a bucket it keeps what a failed upload leaves, unless a network volume does: a video was
    # lost when the folder turned out unusable only then.
    with pytest.raises(ConfigError, match=r"is a file \(it keeps the videos whose upload failed"):
        load_config({**BUCKET_ENV, **env})
    (tmp_path / "volume").mkdir()
    monkeypatch.setattr(config_module, "RUNPOD_VOLUME", tmp_path / "volume")
    assert load_config({**BUCKET_ENV, **env}).durable_dir == tmp_path / "volume" / "turbovideo" / "outputs"


def test_an_output_dir_no_folder_can_be_made_in_is_a_config_error_even_for_root():
    # os.access says yes to root for any folder; /proc takes no new one.
    with pytest.raises(ConfigError, match=r"^OUTPUT_DIR='/proc/x' is not writable \(/proc: "):
        load_config({"OUTPUT_DIR": "/proc/x", "CACHE_DIR": "/tmp/c"})


@pytest.mark.parametrize(
    "value", ["http://localhost ", " https://huggingface.co", "http://127.0.0.1:80a", "hf.co"]
)
def test_an_hf_endpoint_huggingface_hub_would_misread_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"^HF_ENDPOINT=.* is not an http\(s\) URL of a host"):
        load_config({"HF_ENDPOINT": value, "CACHE_DIR": "/tmp/c"})
    assert load_config({"HF_ENDPOINT": "http://127.0.0.1:8080", "CACHE_DIR": "/tmp/c"})


@pytest.mark.parametrize("name", ["HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"])
@pytest.mark.parametrize("value", ["-1", "0", "ten", ""])
def test_a_hub_timeout_that_is_no_positive_whole_number_is_a_config_error(name, value):
    # huggingface_hub reads it with int(); its HTTP client then refuses 0 or less at every request
    with pytest.raises(
        ConfigError, match=f"^{name}='{value}' is not valid; set it to a whole number of seconds"
    ):
        load_config({name: value, "CACHE_DIR": "/tmp/c"})
    assert load_config({name: "60", "CACHE_DIR": "/tmp/c"})


@pytest.mark.parametrize("below", ["", "cache"])
def test_a_cache_dir_that_is_or_sits_under_a_file_is_a_config_error(tmp_path, below):
    blocking = tmp_path / "file"
    blocking.write_text("x")
    cache = blocking / below if below else blocking
    with pytest.raises(
        ConfigError, match=f"^CACHE_DIR='{cache}' cannot be a directory: {blocking} is a file$"
    ):
        load_config({"CACHE_DIR": str(cache)})


def test_videos_kept_on_a_runpod_workers_own_disk_are_known_as_such(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "RUNPOD_VOLUME", tmp_path / "volume")
    on_runpod = {"RUNPOD_POD_ID": "pod", "MODELS": "tiny", "CACHE_DIR": str(tmp_path / "cache")}
    assert load_config({**on_runpod, "OUTPUT_DIR": str(tmp_path / "outputs")}).outputs_on_worker_disk
    assert not load_config(
        {"OUTPUT_DIR": str(tmp_path / "outputs"), "CACHE_DIR": "/tmp/c"}
    ).outputs_on_worker_disk
    (tmp_path / "volume").mkdir()
    on_volume = load_config({**on_runpod, "OUTPUT_DIR": str(tmp_path / "volume" / "outputs")})
    assert not on_volume.outputs_on_worker_disk


def test_the_output_dir_check_creates_nothing(tmp_path):
    assert load_config({"OUTPUT_DIR": str(tmp_path / "a" / "b"), "CACHE_DIR": "/tmp/c"})
    assert list(tmp_path.iterdir()) == []


def test_failed_uploads_go_to_the_volume_when_the_cache_is_baked_into_the_image(monkeypatch, tmp_path):
    monkeypatch.setattr(config_module, "RUNPOD_VOLUME", tmp_path / "volume")
    (tmp_path / "volume").mkdir()
    config = load_config({"CACHE_DIR": str(tmp_path / "models"), "OUTPUT_DIR": str(tmp_path / "o")})
    assert config.durable_dir == tmp_path / "volume" / "turbovideo" / "outputs"


def test_an_output_dir_behind_a_broken_link_is_a_config_error(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"^OUTPUT_DIR=.* cannot be a directory: .*/out is a broken link"):
        load_config({"OUTPUT_DIR": str(tmp_path / "out" / "videos"), "CACHE_DIR": "/tmp/c"})


def test_cache_and_output_dirs_are_trimmed_like_every_other_setting(tmp_path):
    # A value pasted with a trailing newline or space must not become a second, empty cache on the volume.
    config = load_config({"CACHE_DIR": f" {tmp_path}/cache\n", "OUTPUT_DIR": f"{tmp_path}/out "})
    assert config.cache_dir == tmp_path / "cache"
    assert config.output_dir == tmp_path / "out"


@pytest.mark.parametrize(
    "env, percent",
    [
        ({}, 0.0),  # local: the SDK runs no fitness checks
        ({"RUNPOD_POD_ID": "pod"}, 0.0),  # a pod: no job loop, no checks
        ({"RUNPOD_WEBHOOK_GET_JOB": "https://api/job"}, 10.0),
        ({"RUNPOD_WEBHOOK_GET_JOB": "https://api/job", "RUNPOD_MIN_DISK_PERCENT": "5"}, 5.0),
        # The SDK runs its job loop (and its checks) when the variable is set, even empty.
        ({"RUNPOD_WEBHOOK_GET_JOB": ""}, 10.0),
        # A negative share asks for nothing: never less than nothing kept free for the check.
        ({"RUNPOD_WEBHOOK_GET_JOB": "https://api/job", "RUNPOD_MIN_DISK_PERCENT": "-5"}, 0.0),
        ({"RUNPOD_WEBHOOK_GET_JOB": "https://api/job", "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "True"}, 0.0),
    ],
)
def test_the_sdk_disk_check_is_known_to_the_start(env, percent, tmp_path):
    config = load_config({"MODELS": "tiny", "CACHE_DIR": str(tmp_path), **env})
    assert config.disk_check_percent == percent


@pytest.mark.parametrize(
    "env, gib",
    [
        ({}, 0.0),  # local: the SDK runs no fitness checks
        ({"RUNPOD_WEBHOOK_GET_JOB": "https://api/job"}, 4.0),
        ({"RUNPOD_WEBHOOK_GET_JOB": "https://api/job", "RUNPOD_MIN_MEMORY_GB": "16.5"}, 16.5),
        ({"RUNPOD_WEBHOOK_GET_JOB": "https://api/job", "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true"}, 0.0),
    ],
)
def test_the_sdk_memory_check_is_known_to_the_start(env, gib, tmp_path):
    config = load_config({"MODELS": "tiny", "CACHE_DIR": str(tmp_path), **env})
    assert config.memory_check_gib == gib


@pytest.mark.parametrize(
    "name, value, kind",
    [
        ("RUNPOD_MIN_MEMORY_GB", "4GB", "a number"),
        ("RUNPOD_MIN_DISK_PERCENT", "10%", "a number"),
        ("RUNPOD_NETWORK_CHECK_TIMEOUT", "5.5", "a whole number"),
        ("RUNPOD_GPU_BENCHMARK_TIMEOUT", "", "a whole number"),
    ],
)
def test_a_fitness_check_setting_the_sdk_cannot_read_is_refused_where_the_checks_run(
    name, value, kind, tmp_path
):
    # The SDK reads them only once the models have loaded, and stopped the worker with a traceback then.
    env = {"MODELS": "tiny", "CACHE_DIR": str(tmp_path), name: value}
    load_config(env)  # locally the checks do not run, so the value is never read
    load_config(
        {**env, "RUNPOD_WEBHOOK_GET_JOB": "https://api/job", "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true"}
    )
    with pytest.raises(
        ConfigError, match=rf"^{name}='{value}' is not valid: the runpod SDK reads it as {kind} "
    ):
        load_config({**env, "RUNPOD_WEBHOOK_GET_JOB": "https://api/job"})


@pytest.mark.parametrize("name", ["RUNPOD_GPU_TEST_TIMEOUT", "RUNPOD_GPU_MAX_ERROR_MESSAGES"])
def test_a_gpu_check_setting_the_sdk_cannot_read_is_refused_in_the_job_loop_even_with_checks_skipped(
    name, tmp_path
):
    # The SDK imports its GPU check (int() of these) in every job loop: skipping its checks does not help.
    env = {"MODELS": "tiny", "CACHE_DIR": str(tmp_path), name: "1.5"}
    load_config(env)  # locally it is never read
    for skip in ({}, {"RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true"}):
        with pytest.raises(
            ConfigError, match=rf"^{name}='1\.5' is not valid: the runpod SDK reads it as a whole"
        ):
            load_config({**env, "RUNPOD_WEBHOOK_GET_JOB": "https://api/job", **skip})


@pytest.mark.parametrize(
    "value, level",
    [("", "INFO"), ("debug", "DEBUG"), (" warn\n", "WARN"), ("ERROR", "ERROR"), ("WARNING", "INFO")],
)
def test_the_sdk_log_level_is_info_unless_a_level_of_its_own_is_set(value, level):
    # Not the SDK's default, DEBUG, which logs every answer, presigned URLs included.
    assert sdk_log_level({"RUNPOD_LOG_LEVEL": value}) == level
    assert sdk_log_level({}) == "INFO"


@pytest.mark.parametrize("value", ["debug", " Warn\n", "trace"])
def test_a_log_level_in_any_case_or_padded_is_accepted_at_start(value):
    assert load_config({"RUNPOD_LOG_LEVEL": value, "CACHE_DIR": "/tmp/c"})
