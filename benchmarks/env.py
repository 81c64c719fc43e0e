"""Provenance of a run: the device, the software versions, the commit, the date; and the device slug."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip()
    except Exception:  # noqa: BLE001 - provenance is best effort
        return ""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def slug(device: torch.device) -> str:
    """A folder name for the device: ``nvidia-h100-80gb-hbm3``; CPUs get a ``cpu-`` prefix."""
    s = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "unknown"
    return s if device.type == "cuda" else f"cpu-{s}"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:  # noqa: BLE001
        return f"not importable ({type(exc).__name__})"


def provenance(device: torch.device) -> dict:
    """Ordered facts written at the top of every CSV and Markdown file."""
    commit = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if not commit:  # a copy without .git (e.g. a lent GPU machine): the caller may pass it in
        given = os.environ.get("KDKERNELS_GIT_COMMIT", "")
        commit = f"{given} (from KDKERNELS_GIT_COMMIT)" if given else "unknown (no git checkout)"
    elif _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " (uncommitted changes)"
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "git_commit": commit,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "kdkernels": _version("kdkernels"),
        "liger_kernel": _version("liger_kernel"),
        "python": platform.python_version(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "(unset)"),
        "KDKERNELS_BACKEND": os.environ.get("KDKERNELS_BACKEND", "(unset)"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.run"] + sys.argv[1:]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
        info.update({"cuda": torch.version.cuda, "driver": driver[0] if driver else "unknown",
                     "sms": props.multi_processor_count,
                     "gpu_memory_GiB": round(props.total_memory / 2 ** 30, 1)})
    else:
        info.update({"cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
    return info
