"""``python -m kdkernels.info``: every backend's availability on this machine, and why."""
from .dispatch import report


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
