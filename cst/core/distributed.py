"""Data parallelism over MPI (mpi4py): the communicator of a run launched by mpirun/srun, wrapped so
that a plain `python` run is a world of one process and never imports mpi4py. Not a launcher and
not a transport: MPI (Open MPI or MPICH from PyPI, `pip install "cst[mpi]"`) does both.

What the rest of cst uses: world() (rank, size), allreduce_ (in place, zero copy), allgather/bcast
of small Python objects, share (round-robin work assignment), fail_together / fails_together (one
rank raising stops every rank) and check_same. docs/scale.md has the layouts and the launch commands."""
import contextlib
import functools
import hashlib
import os
import sys
import traceback

import numpy as np

# Set by the launchers: Open MPI, MPICH/Hydra and Intel MPI, PMIx (srun --mpi=pmix), Slurm's PMI2.
_LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


class DistributedError(RuntimeError):
    """The ranks disagree (different data, weights or settings) or MPI cannot be used; raised on every rank."""


def launched() -> bool:
    """True when this process was started by an MPI launcher (or CST_MPI=1); CST_MPI=0 forces one process."""
    force = os.environ.get("CST_MPI", "")
    if force in ("0", "1"):
        return force == "1"
    return any(v in os.environ for v in _LAUNCH_VARS)


def _launcher_size():
    for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(v, "").isdigit():
            return int(os.environ[v])
    return None


class World:
    """The processes of one run. rank/size: this process and their number; local_size: the ranks on
    this node; comm: the mpi4py communicator, or None for a run without MPI (then every collective
    below is the identity, with no copy)."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.local_size = 1
        if comm is not None:
            from mpi4py import MPI
            local = comm.Split_type(MPI.COMM_TYPE_SHARED)
            self.local_size = local.Get_size()
            self._local = local

    def __repr__(self):
        return f"World(rank={self.rank}, size={self.size}, local_size={self.local_size}, mpi={self.comm is not None})"

    def allreduce_(self, buf):
        """Sums the contiguous array `buf` over the ranks, in place (MPI_IN_PLACE on its buffer: no copy)."""
        if self.comm is None:
            return buf
        from mpi4py import MPI
        if not (isinstance(buf, np.ndarray) and buf.flags.c_contiguous and buf.flags.writeable):
            raise TypeError("allreduce_: buf must be a writeable C-contiguous numpy array")
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf

    def allgather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled: for small objects)."""
        return [obj] if self.comm is None else self.comm.allgather(obj)

    def bcast(self, obj, root=0):
        return obj if self.comm is None else self.comm.bcast(obj, root=root)

    def barrier(self):
        if self.comm is not None:
            self.comm.Barrier()

    def share(self, n: int) -> range:
        """The items of 0..n-1 this rank works on: every size-th one from its rank (round robin)."""
        return range(self.rank, n, self.size)

    def check_same(self, what: str, *arrays):
        """Raises DistributedError on every rank unless the arrays are bitwise equal on all ranks."""
        if self.size == 1:
            return
        h = hashlib.blake2b(digest_size=16)
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(str((a.dtype, a.shape)).encode())
            h.update(memoryview(a).cast("B"))
        digests = self.allgather(h.hexdigest())
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise DistributedError(f"{what} differ between ranks (rank 0 vs rank(s) {odd}): every rank must start "
                                   "from the same model, data and settings (and read the same files)")

    def abort(self, message: str, code: int = 1):
        """Prints `message` on stderr and ends every rank of the run (MPI_Abort); never returns."""
        sys.stderr.write(message.rstrip() + "\n")
        sys.stderr.flush()
        self.comm.Abort(code)

    @contextlib.contextmanager
    def fail_together(self, what: str, agreed=()):
        """Around work with collectives: an exception on one rank would leave the others blocked in
        their next collective forever, so it aborts the whole run with a clear message instead.
        Exceptions of the `agreed` types are raised on every rank at once (by agreement) and pass."""
        try:
            yield
        except agreed:
            raise
        except BaseException as e:
            if self.size == 1:
                raise
            detail = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            self.abort(f"{detail}\ncst: rank {self.rank} of {self.size} failed in {what}: {type(e).__name__}: {e}\n"
                       "cst: aborting every rank (what was written before, such as checkpoints, is intact)")

    def thread_count(self):
        """OpenMP threads for this rank so that the ranks of a node do not oversubscribe its cores:
        the cores this rank may run on, divided by the ranks on this node that share that same set
        (mpirun's default binding gives each rank its own cores; --bind-to none gives all a node's)."""
        try:
            cores = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = list(range(os.cpu_count() or 1))
        if self.comm is None:
            return len(cores)
        sets = self._local.allgather(cores)
        return max(1, len(cores) // sum(1 for s in sets if s == cores))


def fails_together(what: str):
    """Decorator: runs the function inside world().fail_together(what)."""
    def wrap(f):
        @functools.wraps(f)
        def run(*args, **kwargs):
            with world().fail_together(what):
                return f(*args, **kwargs)
        return run
    return wrap


_WORLD = None


def started():
    """The World if world() has made it, else None (never starts MPI)."""
    return _WORLD


def world() -> World:
    """The run's World, made once. Under an MPI launcher this imports mpi4py (MPI_Init) and, when
    OMP_NUM_THREADS is unset, sets the OpenMP threads to thread_count(); call it before the first
    kernel runs (cst train does), since some MPI stacks break if OpenMP threads start before MPI_Init."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if not launched():
        _WORLD = World()
        return _WORLD
    try:
        from mpi4py import MPI
    except ImportError:
        n = _launcher_size()
        if n is not None and n <= 1:
            _WORLD = World()
            return _WORLD
        raise DistributedError(f"this process was started by an MPI launcher ({n or 'several'} ranks) but mpi4py "
                               "is not installed: pip install \"cst[mpi]\" (or set CST_MPI=0 to run each process "
                               "alone)") from None
    _WORLD = World(MPI.COMM_WORLD)
    if not os.environ.get("OMP_NUM_THREADS"):
        from .runtime import set_num_threads
        set_num_threads(_WORLD.thread_count())
    return _WORLD
