"""What the benchmarks print about the machine they ran on: the CPU's model name, family and SIMD flags
(/proc/cpuinfo; "?" elsewhere). Figures are only comparable on the same kind of CPU (docs/benchmarks.md)."""


def cpu_info():
    """(model name, cpu family, the SIMD flags of interest present) of the first CPU."""
    model = family = "?"
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() == "model name" and model == "?":
                    model = v.strip()
                if k.strip() == "cpu family" and family == "?":
                    family = v.strip()
                if k.strip() == "flags":
                    flags = set(v.split())
                    break
    except OSError:
        flags = set()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return model, family, simd


def cpu_line():
    """One line: model name, cpu family, SIMD flags, logical CPUs."""
    import os
    model, family, simd = cpu_info()
    return f"{model}, cpu family {family}, {os.cpu_count()} logical CPUs; flags: {' '.join(simd) or 'none seen'}"
