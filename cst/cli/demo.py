"""`cst demo`: runs cst.demo.run with the command line's options."""
import os

from ..core.runtime import interactive
from .common import CliError, UsageError, _parse_set


# ---- demo ----

def cmd_demo(args):
    import importlib
    try:
        demo = importlib.import_module("..demo", __package__)
    except ModuleNotFoundError as e:
        if e.name in ("cst.demo", None):
            raise CliError("cst demo is not available: this build of cst has no cst.demo module") from None
        raise CliError(f"cst demo needs the package {e.name!r}, which is not installed") from None
    kwargs = {"quick": args.quick, "progress": interactive()}
    for name in ("output_dir", "seed", "threads"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    overrides = _parse_set(args.set)
    if overrides:
        try:
            demo.settings_for(args.quick, **overrides)
        except ValueError as e:
            raise UsageError(f"--set: {e}") from None
    result = demo.run(**kwargs, **overrides)
    if isinstance(result, (str, os.PathLike)):
        print(f"demo output: {os.fspath(result)}")
    return 0
