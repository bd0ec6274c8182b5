"""The container image: the repository's Dockerfile, built on a CPU stand-in for its CUDA base
image, installs the package for a non-root user and trains (``speedrun train --train.max_steps 5``)
with the run landing in the mounted runs volume.

No image registry is reachable here, so the stand-in base is made from Debian's packages
(debootstrap, imported into Docker) plus the CPU torch wheel pip resolves on this machine
(tests/docker/cpu-base.Dockerfile); both are kept as images and reused by later runs.
Needs a Docker daemon (DOCKER_HOST or the default socket). Without one the test is skipped, unless
SPEEDRUN_DOCKER_TESTS=1 (CI starts a daemon and sets it), which makes that a failure.
"""
import json
import os
import shutil
import ssl
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBIAN_IMAGE = "speedrun-test/debian:bookworm"
IMAGE = "speedrun-test/speedrun:latest"


def _need(what: str):
    if os.environ.get("SPEEDRUN_DOCKER_TESTS") == "1":
        pytest.fail(f"SPEEDRUN_DOCKER_TESTS=1 but {what}")
    pytest.skip(f"{what} (SPEEDRUN_DOCKER_TESTS=1 makes this a failure)")


def _run(*cmd, timeout=900, **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout


def _docker() -> str:
    docker = shutil.which("docker")
    if docker is None:
        _need("there is no docker command")
    if subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode != 0:
        _need("no Docker daemon answers (docker info)")
    return docker


def _exists(docker: str, image: str) -> bool:
    return subprocess.run([docker, "image", "inspect", image], capture_output=True).returncode == 0


def _debian_image(docker: str, work) -> None:
    """Debian bookworm with python3 and pip, from Debian's packages (a few minutes, once)."""
    if _exists(docker, DEBIAN_IMAGE):
        return
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        _need(f"image {DEBIAN_IMAGE} is missing and making it needs root and debootstrap")
    rootfs = work / "rootfs"
    _run("debootstrap", "--variant=minbase", "--include=python3,python3-pip,ca-certificates",
         "bookworm", str(rootfs), timeout=1800)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    _run(docker, "import", "-", DEBIAN_IMAGE, stdin=tar.stdout)
    assert tar.wait() == 0


def _cpu_base(docker: str, work) -> str:
    """The stand-in base: the Debian image + the CPU torch this test runs with."""
    tag = f"speedrun-test/cpu-base:torch-{torch.__version__.replace('+', '-')}"
    if _exists(docker, tag):
        return tag
    _debian_image(docker, work)
    context = work / "cpu-base"
    context.mkdir()
    # bookworm's Python is 3.11: the wheel must be built for it, whatever runs this test
    _run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.11", f"torch=={torch.__version__}", "-d", str(context))
    cafile = os.environ.get("PIP_CERT") or ssl.get_default_verify_paths().cafile
    shutil.copy(cafile, context / "ca-certificates.crt")
    shutil.copy(os.path.join(ROOT, "tests", "docker", "cpu-base.Dockerfile"), context / "Dockerfile")
    _run(docker, "build", "-q", "--network", "host", "-t", tag, str(context))
    return tag


@pytest.mark.slow
@pytest.mark.docker
def test_image_trains_as_a_non_root_user_into_the_runs_volume(tmp_path):
    docker = _docker()
    base = _cpu_base(docker, tmp_path)
    # the build itself installs what the base lacks (compiler, Python headers) and the package
    _run(docker, "build", "-q", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "-t", IMAGE, ROOT)
    config = json.loads(_run(docker, "image", "inspect", "--format", "{{json .Config}}", IMAGE))
    assert config["Entrypoint"] == ["speedrun"] and config["Cmd"] == ["train"]
    assert config["User"] == "1000" and config["WorkingDir"] == "/workspace"
    assert set(config["Volumes"]) == {"/workspace/data", "/workspace/runs", "/cache"}

    runs = tmp_path / "runs"
    runs.mkdir()
    os.chmod(runs, 0o777)   # a bind mount keeps the host's ownership; the image's user is uid 1000
    # no network: the default recipe trains on the corpus and tokenizer shipped in the package, and
    # torch.compile builds its CPU kernels with the compiler the build added
    log = _run(docker, "run", "--rm", "--network", "none", "-v", f"{runs}:/workspace/runs", IMAGE,
               "train", "--train.max_steps", "5", timeout=1200)
    (run_name,) = os.listdir(runs)   # the default run directory runs/<date>-<time>, in the volume
    run_dir = runs / run_name
    assert f"run dir runs/{run_name} | device cpu x1" in log, log[-2000:]
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(train) == [1, 2, 3, 4, 5] and sorted(val) == [0, 5]
    assert val[5] < val[0] - 0.5, val   # it learns: the untrained model is at ~ln(50257) = 10.8
    assert (run_dir / "checkpoints" / "step_000005" / "model.safetensors").is_file()
    assert os.stat(run_dir / "metrics.jsonl").st_uid == 1000   # written by the non-root user
