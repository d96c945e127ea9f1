"""Build of unlearn_fast: pure-Python package + the C++/CUDA extension ``unlearn_fast._C`` (CMake).

Metadata lives in pyproject.toml; this file only adds what needs code: the package mapping
(top-level ``kernels/`` ships as ``unlearn_fast.kernels``) and a ``build_ext`` that drives CMake
against the torch already installed. Build with::

    pip install --no-build-isolation -e .

(an isolated build would not see torch). ``UNLEARN_FAST_BUILD_EXT`` chooses what happens to ``_C``:

* ``auto`` (default): build it; if CMake or a compiler is missing, or the build fails, print a warning
  and install without it (the ops then run the PyTorch reference on CPU).
* ``1``: build it and fail the install if that fails (CI).
* ``0``: skip it.

CUDA kernels (``csrc/cuda/*.cu``) are compiled when torch has CUDA and nvcc is found (``CUDA_HOME``,
``PATH`` or /usr/local/cuda). ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0"``) picks the GPU architectures;
otherwise the visible GPUs', otherwise ``8.0;9.0+PTX``. ``MAX_JOBS`` caps parallel jobs.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE_VAR = "UNLEARN_FAST_BUILD_EXT"


def build_mode() -> str:
    mode = os.environ.get(MODE_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"{MODE_VAR}={mode!r}: expected auto, 1 or 0")
    return mode


def log(msg: str) -> None:
    print(f"[unlearn_fast build] {msg}", flush=True)


def find_cmake() -> str | None:
    try:  # the `cmake` wheel (a build requirement) is there even when its bin dir is not on PATH
        import cmake

        path = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("cmake")


def find_ninja() -> str | None:
    try:
        import ninja

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None
    )


def cuda_arch_list(torch) -> str:
    """TORCH_CUDA_ARCH_LIST for torch's CMake config: the environment's, else the visible GPUs',
    else 8.0 and 9.0 (+PTX for newer GPUs)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return ";".join(filter(None, env.replace(",", ";").replace(" ", ";").split(";")))
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return "8.0;9.0+PTX"


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = ROOT, optional: bool = False):
        super().__init__(name, sources=[], optional=optional)
        self.sourcedir = sourcedir


class CMakeBuild(build_ext):
    """build_ext that configures and builds CMakeLists.txt, then places the module where setuptools
    expects it (for editable installs setuptools then copies it into unlearn_fast/)."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        mode = build_mode()
        start = time.monotonic()
        try:
            self._cmake_build(ext)
        except Exception as err:  # noqa: BLE001 - every failure is reported the same way
            if mode == "1":
                raise
            self._warn_skipped(err)
            return
        log(f"built {ext.name} in {time.monotonic() - start:.1f} s")

    def _warn_skipped(self, err: Exception) -> None:
        bar = "!" * 78
        stale = glob.glob(os.path.join(ROOT, "unlearn_fast", "_C*.so")) + glob.glob(
            os.path.join(ROOT, "unlearn_fast", "_C*.pyd")
        )
        lines = [
            bar,
            f"WARNING: unlearn_fast._C was NOT built ({MODE_VAR}=auto): {err}",
            "The package still works: CPU ops fall back to the PyTorch reference.",
            f"To see the whole error, rebuild with {MODE_VAR}=1 pip install --no-build-isolation -e .",
        ]
        if stale:
            lines.append(f"Note: an older build is still in the tree and may be imported: {stale[0]}")
        lines.append(bar)
        print("\n".join(lines), file=sys.stderr, flush=True)

    def _cmake_build(self, ext: CMakeExtension) -> None:
        try:
            import torch
            import torch.utils
        except ImportError as err:
            raise RuntimeError(
                "torch is not importable by the build; install torch first and build with "
                "--no-build-isolation"
            ) from err
        cmake = find_cmake()
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake)")

        prefix_path = [torch.utils.cmake_prefix_path]
        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        try:
            import pybind11

            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
            prefix_path.append(pybind11.get_cmake_dir())
        except ImportError:
            log("pybind11 not installed: using the pybind11 headers that torch ships")

        nvcc = find_nvcc()
        with_cuda = bool(torch.version.cuda) and nvcc is not None
        if with_cuda:
            archs = cuda_arch_list(torch)
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCUDA_TOOLKIT_ROOT_DIR={os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))}",
                f"-DTORCH_CUDA_ARCH_LIST={archs}",  # torch's CMake config ignores CMAKE_CUDA_ARCHITECTURES
            ]
            log(f"CUDA kernels: on (torch CUDA {torch.version.cuda}, nvcc {nvcc}, architectures {archs})")
        else:
            why = "torch has no CUDA" if not torch.version.cuda else "nvcc not found"
            log(f"CUDA kernels: off ({why})")
        args.append(f"-DUNLEARN_FAST_WITH_CUDA={'ON' if with_cuda else 'OFF'}")

        ninja = find_ninja()
        if ninja is not None:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        # A persistent build tree (per Python and torch) keeps rebuilds incremental; pip's editable
        # builds otherwise use a fresh temporary directory each time.
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
        tag += "-cuda" if with_cuda else "-cpu"
        build_dir = os.path.join(ROOT, "build", f"cmake-{tag}")
        out_dir = os.path.join(build_dir, "out")
        os.makedirs(build_dir, exist_ok=True)
        args += [f"-DCMAKE_PREFIX_PATH={';'.join(prefix_path)}", f"-DUNLEARN_FAST_OUTPUT_DIR={out_dir}"]

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        log(f"cmake build dir: {build_dir}")
        configure = [cmake, "-S", ext.sourcedir, "-B", build_dir, *args]
        if subprocess.run(configure).returncode != 0:
            # A cache left by an earlier run (another compiler, a moved torch) can break configure:
            # retry once from scratch, and never leave a failed cache behind for the next build.
            shutil.rmtree(build_dir, ignore_errors=True)
            log("cmake configure failed; retrying in a clean build directory")
            if subprocess.run(configure).returncode != 0:
                shutil.rmtree(build_dir, ignore_errors=True)
                raise RuntimeError("cmake configure failed (see the CMake output above)")
        if subprocess.run([cmake, "--build", build_dir, "--target", "_C", "-j", jobs]).returncode != 0:
            raise RuntimeError("compiling the extension failed (see the compiler output above)")

        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        built = os.path.join(out_dir, "_C" + suffix)
        if not os.path.exists(built):
            found = glob.glob(os.path.join(out_dir, "_C*"))
            if not found:
                raise RuntimeError(f"CMake finished but produced no _C module in {out_dir}")
            built = found[0]
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(built, dest)


def extensions() -> list[Extension]:
    mode = build_mode()
    if mode == "0":
        log(f"{MODE_VAR}=0: not building unlearn_fast._C")
        return []
    return [CMakeExtension("unlearn_fast._C", optional=(mode == "auto"))]


setup(
    packages=find_packages(include=["unlearn_fast", "unlearn_fast.*"]) + ["unlearn_fast.kernels"],
    package_dir={"unlearn_fast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
