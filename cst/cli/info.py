"""`cst info`: versions, threads, SIMD paths, where the SmolLM2 GGUF is."""
import json
import os



# ---- info ----

def _version(pkg):
    from importlib import metadata
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def cmd_info(args):
    import importlib.util
    import platform

    import numpy as np

    import cst
    from .. import _core
    from ..io import _SMOLLM2_HINT, smollm2_path
    try:
        smol, smol_note = smollm2_path(), None
    except FileNotFoundError:
        smol, smol_note = None, f"not found; install it with: {_SMOLLM2_HINT}"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    info = {
        "cst": cst.__version__, "location": os.path.dirname(os.path.abspath(cst.__file__)),
        "python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
        "openmp": bool(_core.has_openmp()), "threads": cst.get_num_threads(), "cores_available": cores,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "simd_path": cst.simd_path(),
        "simd_supported": list(_core.simd_supported()), "CST_SIMD": os.environ.get("CST_SIMD"),
        "smollm2_gguf": smol, "demo_available": importlib.util.find_spec("cst.demo") is not None,
        "optional": {p: _version(p) for p in ("tokenizers", "gguf", "safetensors", "jinja2", "tqdm", "matplotlib",
                                              "torch", "transformers")},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("cst", f"{info['cst']} ({info['location']})"),
        ("python", f"{info['python']} on {info['platform']}"),
        ("numpy", info["numpy"]),
        ("OpenMP", "on" if info["openmp"] else "off (built without -fopenmp: kernels run on one thread)"),
        ("threads", f"{info['threads']} (cores available: {cores}; OMP_NUM_THREADS="
                    f"{info['OMP_NUM_THREADS'] or 'unset'})"),
        ("SIMD path", f"{info['simd_path']} (supported: {', '.join(info['simd_supported'])}; CST_SIMD="
                      f"{info['CST_SIMD'] or 'unset'})"),
        ("SmolLM2 GGUF", smol or smol_note),
        ("cst demo", "available" if info["demo_available"] else "not available in this build"),
        ("packages", ", ".join(f"{p} {v}" for p, v in info["optional"].items() if v)),
    ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{w}}  {b}")
    return 0
