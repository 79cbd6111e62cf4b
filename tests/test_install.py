"""systemd/install.sh and systemd/dist.sh refuse what they cannot install before they change
anything: 32-bit ARM (a kernel, or a 32-bit userland under a 64-bit kernel), an old Python, a kit
made for another machine or Python. Unsupported machines are faked with stand-in `uname` and
`python3` scripts; no test here installs anything or needs the network."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "systemd" / "install.sh"
DIST = ROOT / "systemd" / "dist.sh"


def fake_bin(tmp_path: Path, *, machine: str | None = None, python_says: str | None = None) -> Path:
    """A directory of stand-ins: `uname` printing `machine`, `python3` printing `python_says`
    (what install.sh's one Python question is answered with: platform, bits, version)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    if machine is not None:
        (bin_dir / "uname").write_text(f"#!/bin/sh\necho {machine}\n")
        (bin_dir / "uname").chmod(0o755)
    if python_says is not None:
        (bin_dir / "python3").write_text(f"#!/bin/sh\necho {python_says}\n")
        (bin_dir / "python3").chmod(0o755)
    return bin_dir


def install(tmp_path: Path, *args: str, bin_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
        if (bin_dir / "python3").exists():
            env["PYTHON"] = str(bin_dir / "python3")
    return subprocess.run(
        ["bash", str(INSTALL), *args], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path
    )


def test_this_machine_is_supported() -> None:
    """--check-platform on the test machine (x86_64 or aarch64, Python 3.11+) says so, exit 0."""
    done = subprocess.run(["bash", str(INSTALL), "--check-platform"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"supported: {platform.machine()}, Python ")


@pytest.mark.parametrize("machine", ["armv7l", "armv6l"])
def test_a_32_bit_arm_kernel_is_refused_before_anything_is_made(tmp_path: Path, machine: str) -> None:
    """uname -m armv7l/armv6l: exit 1 naming awscrt's missing wheel and the 64-bit OS to install;
    the prefix is never created, so no pip ever starts a source build."""
    prefix = tmp_path / "prefix"

    done = install(tmp_path, "--venv-only", "--prefix", str(prefix), bin_dir=fake_bin(tmp_path, machine=machine))

    assert done.returncode == 1
    assert f"32-bit ARM ({machine}) is not supported: awscrt" in done.stderr
    assert "Raspberry Pi OS (64-bit)" in done.stderr
    assert not prefix.exists()


def test_a_32_bit_userland_under_a_64_bit_kernel_is_refused(tmp_path: Path) -> None:
    """Raspberry Pi OS 32-bit on a Pi 4: uname says aarch64, and so does Python's sysconfig platform
    (it repeats the kernel's machine name), but Python's pointers are 32-bit: that decides."""
    bin_dir = fake_bin(tmp_path, machine="aarch64", python_says="linux-aarch64 32 3.11")

    done = install(tmp_path, "--check-platform", bin_dir=bin_dir)

    assert done.returncode == 1
    assert "is a 32-bit program (linux-aarch64) on a aarch64 kernel: a 32-bit userland is not supported" in done.stderr


def test_a_python_older_than_3_11_is_refused(tmp_path: Path) -> None:
    """Debian 11's Python 3.9: exit 1 saying 3.11 or newer is needed."""
    bin_dir = fake_bin(tmp_path, python_says=f"linux-{platform.machine()} 64 3.9")

    done = install(tmp_path, "--check-platform", bin_dir=bin_dir)

    assert done.returncode == 1
    assert "Python 3.9 is too old: hub-gateway needs 3.11 or newer" in done.stderr


def kit(tmp_path: Path, machine: str, python: str) -> Path:
    """A kit tarball holding only a MANIFEST (enough for install.sh to refuse it)."""
    name = f"hub-gateway-0.1.0-manylinux_2_17_{machine}-py{python}"
    manifest = tmp_path / "MANIFEST"
    manifest.write_text(
        f"name=hub-gateway\nversion=0.1.0\nplatform=manylinux_2_17_{machine}\nmachine={machine}\n"
        f"python={python}\nglibc=2.17\n"
    )
    path = tmp_path / f"{name}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(manifest, arcname=f"{name}/MANIFEST")
    return path


def test_a_kit_for_another_machine_or_python_is_refused_with_the_make_dist_that_fits(tmp_path: Path) -> None:
    """--offline with a kit whose MANIFEST names another machine, or another Python: exit 1 before
    the virtualenv is made, with the `make dist` line for this machine."""
    here = platform.machine()
    other = "aarch64" if here == "x86_64" else "x86_64"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    prefix = tmp_path / "prefix"

    done = install(tmp_path, "--offline", str(kit(tmp_path, other, version)), "--venv-only", "--prefix", str(prefix))
    assert done.returncode == 1
    assert f"is for {other}, this machine is {here}: make dist PLATFORM=manylinux_2_" in done.stderr

    done = install(tmp_path, "--offline", str(kit(tmp_path, here, "3.99")), "--venv-only", "--prefix", str(prefix))
    assert done.returncode == 1, done.stderr
    assert "is for Python 3.99, this machine has" in done.stderr
    assert not prefix.exists()


def test_dist_refuses_32_bit_arm_and_unknown_platforms() -> None:
    """make dist PLATFORM=...armv7l (or not a manylinux tag) stops at once with why."""
    for tag, needle in (
        ("manylinux_2_36_armv7l", "32-bit ARM is not supported (awscrt publishes no wheel for it)"),
        ("win_amd64", "give manylinux_2_NN_x86_64 or manylinux_2_NN_aarch64"),
    ):
        done = subprocess.run(["bash", str(DIST), tag], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and needle in done.stderr
