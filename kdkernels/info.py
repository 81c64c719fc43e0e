"""``python -m kdkernels.info``: every backend's availability on this machine, and why.

It also says where kdkernels was imported from and, when the C++ extension ``kdkernels._C`` is missing,
the command that builds it.
"""
import os

import torch

from .dispatch import report, unavailable_reason

#: builds ``kdkernels._C`` against the torch installed in the current environment
BUILD_COMMAND = "pip install ninja && pip install --no-build-isolation -e .   (from a checkout; `.` otherwise)"


def extension_hint() -> str:
    """Empty when the C++ CPU backend can run, else what is wrong and how to build it."""
    reason = unavailable_reason("cpu", torch.device("cpu"))
    if reason is None:
        return ""
    return ("The C++ backends (`cpu`, `cuda`) are unavailable: " + reason + "\n"
            "Build them against this environment's torch with:\n    " + BUILD_COMMAND)


def main() -> None:
    import kdkernels
    print(f"kdkernels {kdkernels.__version__} from {os.path.dirname(kdkernels.__file__)}")
    print(report())
    hint = extension_hint()
    if hint:
        print(hint)


if __name__ == "__main__":
    main()
