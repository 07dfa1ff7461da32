"""Files: atomic writes (a killed process leaves the old file or the new one, never half of one), and readers of
the records that name a file that cannot be read."""

from __future__ import annotations

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


@contextmanager
def atomic_write(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".<name>.tmp.<random>": the next start of a run removes such files that a kill left (moe_lab.runs)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; results should be as readable as any other file
        os.replace(tmp, path)
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
