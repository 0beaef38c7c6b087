"""cst.atomic: a file or directory written atomically ends up with the permissions open()/mkdir() would give
it (0666 / 0777 less the umask), and a directory named as a file target is refused by its own name."""
import os

import pytest

from cst.atomic import atomic_dir, umask_mode, write_json, write_text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_and_dirs_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert umask_mode(0o666) == 0o666 & ~umask
        write_text(tmp_path / "a.txt", "x")
        write_json(tmp_path / "b.json", {"k": 1})
        with open(tmp_path / "plain.txt", "w") as f:  # what any other file gets
            f.write("x")
        with atomic_dir(tmp_path / "d") as d:
            write_text(os.path.join(d, "c.txt"), "y")
            fd = os.open(os.path.join(d, "private.bin"), os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors does
            os.close(fd)
    finally:
        os.umask(old)
    plain = os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert plain == 0o666 & ~umask
    for name in ("a.txt", "b.json", "d/c.txt", "d/private.bin"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == plain, name
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "a.txt").read_text() == "x"


def test_a_directory_is_not_overwritten_as_a_file(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match=f"{tmp_path / 'out'} is a directory"):
        write_text(tmp_path / "out", "x")
    assert os.listdir(tmp_path) == ["out"]  # no temporary file left behind
