"""Build kdkernels, with the optional C++ extension ``kdkernels._C``.

* CPU twin (``csrc/*.cpp``): built whenever the sources exist and torch is importable.
* CUDA fallback (``csrc/cuda/*.cu`` + ``*.cpp``): only when torch is a CUDA build and ``nvcc`` exists.
  ``KDKERNELS_BUILD_CUDA=auto|0|1`` (``1`` fails loudly when it cannot build; ``auto`` says why it skipped).
* ``KDKERNELS_REQUIRE_EXT=1`` turns a skipped or failed CPU extension into an error (CI sets it).

Install with ``pip install --no-build-isolation -e .`` so this script sees the installed torch. A plain
``pip install .`` builds in an isolated environment without torch: the extension is then skipped, with a
banner on stderr (and the terminal) that says so and gives the command that builds it.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE_EXT = os.environ.get("KDKERNELS_REQUIRE_EXT", "0") == "1"
BUILD_CUDA = os.environ.get("KDKERNELS_BUILD_CUDA", "auto").lower()


#: the command that builds the C++ extension against the torch installed in the environment
BUILD_COMMAND = "pip install ninja && pip install --no-build-isolation ."
EDITABLE_BUILD_COMMAND = "pip install --no-build-isolation -e .   (from a checkout)"


def say(msg: str) -> None:
    print(f"kdkernels setup: {msg}", file=sys.stderr)


def say_loudly(lines) -> None:
    """A banner on stderr, and on the terminal when there is one: pip shows a successful build's output
    only with ``-v``, and a skipped extension must not go unnoticed."""
    bar = "!" * 100
    text = "\n".join([bar] + [f"kdkernels setup: {line}" for line in lines] + [bar]) + "\n"
    sys.stderr.write(text)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(text)
    except OSError:
        pass  # no terminal (CI): stderr only


def skipped_extension(why: str) -> None:
    say_loudly([
        "SKIPPED the C++ extension kdkernels._C (the CPU backend `cpu` and the CUDA fallback `cuda`):",
        f"  {why}",
        "The package still works with the `reference` backend (and `triton` on a GPU, or on CPU under",
        "TRITON_INTERPRET=1); backend='cpu' or 'cuda' will raise BackendUnavailableError.",
        "To build the C++ backends, install torch in this environment first, then run:",
        f"    {BUILD_COMMAND}",
        f"    {EDITABLE_BUILD_COMMAND}",
        "`python -m kdkernels.info` lists which backends can run and why not.",
    ])


def extensions():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpu_sources:
        say("no csrc/*.cpp sources: pure-Python install (reference + Triton backends)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if REQUIRE_EXT:
            raise RuntimeError("KDKERNELS_REQUIRE_EXT=1 but torch is not importable in the build "
                               "environment; install with --no-build-isolation") from exc
        skipped_extension("torch is not importable in the build environment (pip's build isolation hides "
                          "the installed torch, or torch is not installed)")
        return [], {}

    # -fno-trapping-math / -fno-math-errno: no FP-exception or errno semantics are used, and they let the
    # CPU twin's select-only loops (and its polynomial exp) vectorise
    cxx = ["-O3", "-std=c++17", "-fno-trapping-math", "-fno-math-errno"]
    # no --use_fast_math: the engine relies on IEEE division/exp (exact top-k membership tests, fp32 parity)
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    define_macros = []
    libraries, extra_link = [], []
    if sys.platform.startswith("linux"):
        cxx += ["-fopenmp"]
        extra_link += ["-fopenmp"]

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    with_cuda, why_not = False, None
    if BUILD_CUDA == "0":
        why_not = "KDKERNELS_BUILD_CUDA=0"
    elif not cuda_sources:
        why_not = "no csrc/cuda sources"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(
            os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")):
        why_not = "nvcc not found (set CUDA_HOME)"
    else:
        with_cuda = True
    if with_cuda:
        define_macros.append(("KDKERNELS_WITH_CUDA", "1"))
        say(f"building the CUDA fallback (torch CUDA {torch.version.cuda})")
        ext = cpp_extension.CUDAExtension(
            "kdkernels._C", cpu_sources + cuda_sources, include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=extra_link)
    else:
        if BUILD_CUDA == "1":
            raise RuntimeError(f"KDKERNELS_BUILD_CUDA=1 but the CUDA fallback cannot be built: {why_not}")
        say(f"CUDA fallback skipped: {why_not}; building the CPU twin only")
        ext = cpp_extension.CppExtension(
            "kdkernels._C", cpu_sources, include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros, extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


class _Optional:
    """Wrap build_ext so a failing CPU build does not break a pure-Python install (unless required)."""

    @staticmethod
    def wrap(cmdclass):
        base = cmdclass.get("build_ext")
        if base is None:
            return cmdclass

        class build_ext(base):
            def run(self):
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001 - reported, then re-raised when required
                    if REQUIRE_EXT:
                        raise
                    skipped_extension(f"building it failed: {type(exc).__name__}: {exc}")

        return {"build_ext": build_ext}


ext_modules, cmdclass = extensions()
setup(
    name="kdkernels",
    version="0.1.0",
    description="Fused GPU kernels for knowledge-distillation losses (Triton, CUDA C++, CPU C++)",
    packages=find_packages(include=["kdkernels", "kdkernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest"], "bench": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=_Optional.wrap(cmdclass),
    zip_safe=False,
)
