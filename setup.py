"""Builds cst._core from csrc/kernels/*.c (plain C) and csrc/python/*.c (the boundary): C11, -O3,
OpenMP where the compiler has it, baseline x86-64 code with per-function SIMD targets chosen at run
time (never -march=native, never -ffast-math)."""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _compiler_accepts(compiler, flags):
    """True when the C compiler builds and links a tiny OpenMP program with these flags."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        cmd = list(compiler) + flags + [src, "-o", os.path.join(tmp, "probe")] + flags
        return subprocess.run(cmd, capture_output=True).returncode == 0
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        cc = self.compiler.compiler_so[:1] if hasattr(self.compiler, "compiler_so") else ["cc"]
        omp = os.environ.get("CST_NO_OPENMP") != "1" and _compiler_accepts(cc, ["-fopenmp"])
        for ext in self.extensions:
            if omp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
            else:
                print("cst: building without OpenMP (single-threaded kernels)", file=sys.stderr)
        super().build_extensions()


core = Extension(
    "cst._core",
    sources=sorted(glob.glob("csrc/kernels/*.c") + glob.glob("csrc/python/*.c")),
    include_dirs=[np.get_include(), "csrc/kernels", "csrc/python"],
    depends=sorted(glob.glob("csrc/kernels/*.h") + glob.glob("csrc/python/*.h")),
    extra_compile_args=["-std=c11", "-O3", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function", "-Wno-psabi", "-fno-math-errno",
                        "-fvisibility=hidden"],
    extra_link_args=[],
)

setup(ext_modules=[core], cmdclass={"build_ext": BuildExt})
