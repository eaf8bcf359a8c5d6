"""`make venv`'s choice between the CPU and the GPU install, read from what
`make -n` (a dry run: nothing is installed or downloaded) would run, with a
fake `nvidia-smi` first on PATH, or none at all; and the commands of the
test, test-gpu and gpu-check targets."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tfgpt.runtime.devices import cpu_info

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="needs make")

H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5a3c1f0e-8d2b-4c6a-9e7f-1b2c3d4e5f60)"


def fake_nvidia_smi(folder: Path, output: str, status: int = 0) -> Path:
    """A folder holding an executable `nvidia-smi` that prints `output` and exits with `status`."""
    folder.mkdir()
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\nprintf '%s\\n' {shlex.quote(output)}\nexit {status}\n")
    exe.chmod(0o755)
    return folder


def bare_tools(folder: Path) -> Path:
    """A folder with only the programs the Makefile's detection runs besides
    nvidia-smi (make runs /bin/sh by its absolute path): a PATH with no
    nvidia-smi, even on a machine that has one."""
    folder.mkdir()
    for tool in ("grep", "timeout"):
        found = shutil.which(tool)
        if found:
            (folder / tool).symlink_to(found)
    return folder


def make_dry_run(tmp_path: Path, path: list[Path] | None, *args: str, target: str = "venv") -> list[str]:
    """The command lines `make -n target VENV=<tmp>/venv args` prints. path: the
    PATH folders; None keeps this process's PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        # make passes its own command-line variables (e.g. GPU=1 of an
        # enclosing `make test GPU=1`) to sub-makes through these.
        if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "GPU", "VENV", "JOBS")
    }
    if path is not None:
        env["PATH"] = os.pathsep.join(map(str, path))
    done = subprocess.run(
        [MAKE, "-n", "--no-print-directory", target, f"VENV={tmp_path / 'venv'}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def installed_extras(lines: list[str]) -> list[str] | None:
    """The extras of the one `pip install -e '.[...]'` line; None when make would install nothing."""
    installs = [line for line in lines if re.search(r"-m pip install .*-e ", line)]
    if not installs:
        return None
    assert len(installs) == 1, installs
    found = re.search(r"-e '\.\[([^\]]*)\]'", installs[0])
    assert found, installs[0]
    return found.group(1).split(",")


def system_path() -> list[Path]:
    return [Path(p) for p in os.environ["PATH"].split(os.pathsep) if p]


def test_a_gpu_listed_by_nvidia_smi_installs_the_gpu_extra(tmp_path):
    fake = fake_nvidia_smi(tmp_path / "bin", H100)
    lines = make_dry_run(tmp_path, [fake] + system_path())
    assert installed_extras(lines) == ["test", "lint", "gpu"]
    # The rest of the install is unchanged, and the stamp records the choice.
    venv_python = f"{tmp_path / 'venv'}/bin/python"
    assert f"{venv_python} -m pip install --quiet --upgrade pip" in lines
    assert f"{venv_python} -m pip uninstall --quiet --yes keras" in lines
    assert lines[-1] == f"touch {tmp_path / 'venv'}/.installed-gpu1"


def test_no_nvidia_smi_installs_the_cpu_extras_only(tmp_path):
    lines = make_dry_run(tmp_path, [bare_tools(tmp_path / "bin")])
    assert installed_extras(lines) == ["test", "lint"]
    assert lines[-1] == f"touch {tmp_path / 'venv'}/.installed-gpu0"


@pytest.mark.parametrize(
    "output, status",
    [
        ("Failed to initialize NVML: Driver/library version mismatch", 9),  # a broken driver
        ("No devices were found", 6),  # a driver, but no GPU
        ("", 0),  # succeeds, lists nothing
    ],
)
def test_a_failing_or_empty_nvidia_smi_installs_no_gpu_extra(tmp_path, output, status):
    fake = fake_nvidia_smi(tmp_path / "bin", output, status)
    assert installed_extras(make_dry_run(tmp_path, [fake] + system_path())) == ["test", "lint"]


def test_gpu_0_overrides_a_listed_gpu(tmp_path):
    fake = fake_nvidia_smi(tmp_path / "bin", H100)
    assert installed_extras(make_dry_run(tmp_path, [fake] + system_path(), "GPU=0")) == ["test", "lint"]


def test_gpu_1_installs_the_gpu_extra_without_nvidia_smi(tmp_path):
    lines = make_dry_run(tmp_path, [bare_tools(tmp_path / "bin")], "GPU=1")
    assert installed_extras(lines) == ["test", "lint", "gpu"]


def test_the_stamp_keeps_the_installed_choice_and_a_new_one_reinstalls(tmp_path):
    """An up-to-date GPU=0 install stays one under GPU=auto even where a GPU
    appears; GPU=1 reinstalls with the gpu extra."""
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".installed-gpu0"
    stamp.touch()
    newest = max((ROOT / name).stat().st_mtime for name in ("setup.cfg", "pyproject.toml"))
    os.utime(stamp, (newest + 10, newest + 10))
    fake = fake_nvidia_smi(tmp_path / "bin", H100)
    assert installed_extras(make_dry_run(tmp_path, [fake] + system_path())) is None
    assert installed_extras(make_dry_run(tmp_path, [fake] + system_path(), "GPU=0")) is None
    lines = make_dry_run(tmp_path, [fake] + system_path(), "GPU=1")
    assert installed_extras(lines) == ["test", "lint", "gpu"]
    assert f"rm -f {venv}/.installed {venv}/.installed-gpu0 {venv}/.installed-gpu1" in lines


def test_a_bad_gpu_value_is_a_one_line_error(tmp_path):
    done = subprocess.run(
        [MAKE, "-n", "venv", f"VENV={tmp_path / 'venv'}", "GPU=yes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "GPU must be auto, 0 or 1, got 'yes'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def installed_venv(tmp_path: Path) -> Path:
    """A .venv folder whose stamp is newer than setup.cfg and pyproject.toml,
    so that make has nothing to install."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed-gpu0").touch()
    newest = max((ROOT / name).stat().st_mtime for name in ("setup.cfg", "pyproject.toml"))
    os.utime(venv / ".installed-gpu0", (newest + 10, newest + 10))
    return venv


@pytest.mark.parametrize(
    "target, command",
    [
        ("test", '{py} -m pytest -q -m "not gpu" -n 2 --dist loadfile --durations=10 -x'),
        ("test-fast", '{py} -m pytest -q -m "not gpu and not slow" -n 2 --dist loadfile --durations=10 -x'),
        ("test-gpu", "TFGPT_TEST_GPU=1 {py} -m pytest -q -m gpu tests/test_gpu.py -x"),
        ("gpu-check", "{py} -m benchmarks.gpu_check -x"),
    ],
)
def test_the_test_and_check_targets_run_these_commands(tmp_path, target, command):
    venv = installed_venv(tmp_path)
    lines = make_dry_run(tmp_path, None, "ARGS=-x", target=target)
    assert lines == [command.format(py=f"{venv}/bin/python")]


def test_a_whole_make_test_on_an_avx512_cpu_also_runs_the_kernel_dependent_tests_as_avx2(tmp_path):
    """Without ARGS, on a CPU with AVX-512, `make test` runs the tests that
    depend on the CPU's kernels again under oneDNN's AVX2 kernels and under
    Eigen (docs/serving.md); on an AVX2 CPU the suite alone."""
    venv = installed_venv(tmp_path)
    py = f"{venv}/bin/python"
    suite = f'{py} -m pytest -q -m "not gpu" -n 2 --dist loadfile --durations=10'
    again = [f'{env} {py} -m pytest -q -m "kernels and not gpu" -n 2 --dist loadfile' for env in ISA_ENVS]
    avx512 = "avx512f" in cpu_info()[1]
    assert [line.rstrip() for line in make_dry_run(tmp_path, None, target="test")] == [suite] + (
        again if avx512 else []
    )
    assert [line.rstrip() for line in make_dry_run(tmp_path, None, target="test-isa")] == again


ISA_ENVS = ("ONEDNN_MAX_CPU_ISA=AVX2", "TF_ENABLE_ONEDNN_OPTS=0")


def test_setup_cfg_has_the_extras_and_the_marker_the_makefile_uses():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    assert set(extras) >= {"test", "lint", "gpu", "profile"}
    gpu = [line for line in extras["gpu"].splitlines() if line.strip()]
    assert gpu == ["tensorflow[and-cuda]>=2.16,<2.22"]
    # The same TensorFlow range as the CPU install.
    assert "tensorflow>=2.16,<2.22" in cfg["options"]["install_requires"].split()
    markers = cfg["tool:pytest"]["markers"]
    assert re.search(r"^\s*gpu:", markers, re.M) and re.search(r"^\s*slow:", markers, re.M)


@pytest.mark.slow
def test_the_version_has_one_source_and_the_commands_are_installed():
    import importlib.metadata

    import tfgpt

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: tfgpt.__version__"
    # .venv holds the package installed from this checkout (make's stamp depends on setup.cfg).
    assert importlib.metadata.version("tfgpt") == tfgpt.__version__
    scripts = {
        e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts") if e.name.startswith("tfgpt-")
    }
    assert scripts == {
        "tfgpt-train": "tfgpt.cli:main",
        "tfgpt-prepare": "tfgpt.data.prepare:main",
        "tfgpt-export": "tfgpt.serving.export:main",
        "tfgpt-generate": "tfgpt.serving.generate:main",
        "tfgpt-evaluate": "tfgpt.serving.evaluate:main",
    }
    # The five commands side by side rather than one after another.
    procs = {
        name: subprocess.Popen(
            [str(Path(os.sys.executable).parent / name), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in scripts
    }
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and "usage:" in out, (name, err[-500:])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
