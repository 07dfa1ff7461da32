"""Files: atomic writes (a killed process leaves the old file or the new one, never half of one), readers of the
records that name a file that cannot be read, and write errors of the machine (a full disk) that name the file."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()

# a write that fails with these is the machine's doing (full disk, quota, file size limit, failing device), not
# the input's: the CLI exits 1 for them, not 2
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


class StorageError(OSError):
    """Writing a file failed for a reason of the machine (a full disk, a quota, a file size limit, an I/O error):
    names the file being written."""

    def __str__(self) -> str:
        where = f"cannot write {self.filename}" if self.filename else "cannot write a file"
        return f"{where}: {self.strerror} ({errno.errorcode.get(self.errno or 0, '?')})"


def storage_error(err: BaseException, path: str | Path | None = None) -> StorageError | None:
    """`err` as a StorageError naming `path` (or the file it names) if it is a write error of the machine, else None."""
    if isinstance(err, StorageError):
        return err
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return StorageError(err.errno, err.strerror, str(path or err.filename or "") or None)
    return None


@contextmanager
def atomic_write(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, rename it over `path`. A write error of
    the machine (a full disk) is a StorageError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".<name>.tmp.<random>": the next start of a run removes such files that a kill left (moe_lab.runs)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; results should be as readable as any other file
        os.replace(tmp, path)
    except OSError as err:
        # the temporary file's name means nothing to a user: name the file being written
        machine = storage_error(err, path)
        if machine is None:
            raise
        raise machine from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class CorruptFileError(ValueError):
    """A record that cannot be read (cut short, garbled, edited by hand): names the file and what is wrong."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path} {problem}")

    def hint(self, what_to_do: str) -> CorruptFileError:
        """The same error, saying what to do about it."""
        return CorruptFileError(self.path, f"{self.problem}; {what_to_do}")


def read_json(path: str | Path) -> Any:
    """The JSON value in `path`; a file that is not valid JSON is a CorruptFileError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        where = f"{err.msg}: line {err.lineno} column {err.colno}"
        raise CorruptFileError(path, f"is not valid JSON ({where}): cut short or edited") from None
    except UnicodeDecodeError:
        raise CorruptFileError(path, "is not valid JSON (not UTF-8 text): garbled") from None


def check_whole_lines(path: str | Path) -> None:
    """Raise CorruptFileError if the text file `path` ends in the middle of a line (cut short)."""
    path = Path(path)
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size and (f.seek(size - 1), f.read(1))[1] != b"\n":
            raise CorruptFileError(path, "ends in the middle of a line (cut short, or written by a killed process)")


def read_csv(path: str | Path, **kwargs: Any) -> pd.DataFrame:
    """A CSV record (metrics.csv and the like) read whole; a cut last line or text that is no CSV is a
    CorruptFileError naming the file."""
    import pandas as pd

    check_whole_lines(path)
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptFileError(path, f"cannot be read as CSV ({first})") from None
