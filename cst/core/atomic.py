"""Atomic file writes: every file cst writes goes to a temporary name in the target's directory, is
flushed to disk, then renamed into place, so an interrupted run never leaves half a file. The result has
the permissions open() would give it (0666 / 0777 less the umask; tempfile alone makes 0600 / 0700).
Not a lock: two writers of one path race, and the last rename wins."""
import contextlib
import json
import os
import shutil
import tempfile


def umask_mode(mode):
    """`mode` less the process's umask: what open() or mkdir() would give a new file or directory."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary file name next to `path` (for writers that take a name); on success the file
    is fsynced and renamed onto `path`, on failure it is removed."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, expected a file name")
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        yield tmp
        # After the writer: some (safetensors) replace the file they are given, with mode 0600.
        os.chmod(tmp, umask_mode(0o666))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path, mode="w", encoding="utf-8"):
    """open() for writing whose result appears at `path` only once the block has succeeded."""
    binary = "b" in mode
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if binary else {"encoding": encoding, "newline": "\n"})) as f:
            yield f


def write_text(path, text):
    with atomic_open(path, "w") as f:
        f.write(text)


def write_bytes(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path, obj, **kwargs):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **kwargs)
        f.write("\n")


def honour_umask(top):
    """Gives `top` and everything under it the modes mkdir()/open() would have (0777 / 0666 less the
    umask): mkdtemp makes 0700, and some writers (safetensors) make their files 0600."""
    dmode, fmode = umask_mode(0o777), umask_mode(0o666)
    os.chmod(top, dmode)
    for root, dirs, files in os.walk(top):
        for n in dirs:
            os.chmod(os.path.join(root, n), dmode)
        for n in files:
            os.chmod(os.path.join(root, n), fmode)


@contextlib.contextmanager
def atomic_dir(path):
    """Yields a temporary directory next to `path`. On success: when `path` does not exist, the
    directory is renamed onto it (one atomic step); when it does, each file is moved in with os.replace
    (atomic per file; other files already in `path` are left alone)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        yield tmp
        honour_umask(tmp)
        if not os.path.exists(path):
            try:
                os.rename(tmp, path)
                return
            except OSError:
                os.makedirs(path, exist_ok=True)  # lost a race with another writer: merge file by file
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        os.rmdir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path):
    """Makes a directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path):
    """fsyncs every regular file directly in directory `path`, then the directory itself: what must
    be on disk before the directory is renamed into place."""
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isfile(p) and not os.path.islink(p):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)
