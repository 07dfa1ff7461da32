"""Documents from the three sources, all through `datasets`: synthetic (embedded), local files, hub names."""

from __future__ import annotations

import codecs
import glob
import os
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

from moe_lab.config import DataConfig
from moe_lab.hub import require_hub
from moe_lab.paths import shared_root

LOCAL_FORMATS = ("text", "json", "csv", "parquet")


def data_files(path, what: str) -> list[str]:
    """Expand a path, glob or list of them; a missing file names the path."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files: list[str] = []
    for p in paths:
        p = os.path.expanduser(str(p))
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        missing = [m for m in matches if not Path(m).is_file()]
        if not matches or missing:
            raise FileNotFoundError(_missing(missing[0] if missing else p, what))
        files.extend(matches)
    return files


def _missing(path: str, what: str) -> str:
    """What to say of a file that is not there: its absolute path, and for the shared data sets where they are
    looked up."""
    full = os.path.abspath(path)
    message = f"{what}: no such file {full!r}" + ("" if os.path.isabs(path) else f" ({path!r} from {os.getcwd()})")
    shared = os.path.abspath(shared_root())
    if full.startswith(shared + os.sep):
        source = "$MOE_LAB_SHARED" if "MOE_LAB_SHARED" in os.environ else "../shared"
        message += (
            "; shared data sets are looked up in $MOE_LAB_SHARED, else in ../shared from the working directory "
            f"(here {source}: {shared}); set MOE_LAB_SHARED=DIR, the folder that holds data/"
        )
    return message


def check_text_files(files: list[str], what: str, fmt: str) -> None:
    """Raise ValueError naming a file that is empty, binary or not UTF-8, which `datasets` would report deep in a
    traceback as "An error occurred while generating the dataset"."""
    for name in files:
        if os.path.getsize(name) == 0:
            raise ValueError(f"{what}: {name} is empty")
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(name, "rb") as f:
            while chunk := f.read(1 << 20):
                if (nul := chunk.find(b"\0")) >= 0:
                    raise ValueError(
                        f"{what}: {name} looks binary (a NUL byte at offset {offset + nul}); format {fmt} reads "
                        "UTF-8 text"
                    )
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"{what}: {name} is not UTF-8 text (byte 0x{chunk[err.start]:02x} at offset "
                        f"{offset + err.start}); convert it first, e.g. `iconv -f latin1 -t utf-8`"
                    ) from None
                offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"{what}: {name} is not UTF-8 text (it ends inside a character)") from None


def load_files(fmt: str, files: list[str], what: str, **kwargs) -> datasets.Dataset:
    """`datasets.load_dataset(fmt, data_files=files)` with a one-line error naming the files it cannot read."""
    if fmt != "parquet":
        check_text_files(files, what, fmt)
    try:
        return datasets.load_dataset(fmt, data_files=files, split="train", **kwargs)
    except DatasetGenerationError as err:
        cause = err.__cause__ or err
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ValueError(f"{what}: cannot read {', '.join(files)} as {fmt} ({reason})") from None


def _load_local(path, data: DataConfig, what: str) -> datasets.Dataset:
    if data.format not in LOCAL_FORMATS:
        raise ValueError(f"data.format={data.format!r} is not one of {list(LOCAL_FORMATS)}")
    kwargs = {}
    if data.format == "csv" and data.delimiter:
        kwargs["delimiter"] = data.delimiter
    ds = load_files(data.format, data_files(path, what), what, **kwargs)
    if len(ds) == 0:
        raise ValueError(f"{what}: {path} holds no {data.format} records")
    if data.text_column not in ds.column_names:
        raise ValueError(f"{what}: no column {data.text_column!r}; columns: {ds.column_names} (set data.text_column)")
    return _text_only(ds, data.text_column)


def _text_only(ds: datasets.Dataset, column: str) -> datasets.Dataset:
    """Keep only the text column, named `text`."""
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


def load_documents(data: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train documents, validation documents or None) with a `text` column (+ labels for synthetic)."""
    if data.source == "synthetic":
        from moe_lab.data.synthetic import load_synthetic

        cache = Path(os.path.expanduser(data.cache_dir))
        corpus = load_synthetic(
            cache,
            num_docs=data.num_docs,
            seed=data.corpus_seed,
            num_domains=data.num_domains,
            num_people=data.num_people,
            fact_fraction=data.fact_fraction,
            valence_cues=data.valence_cues,
        )
        return corpus, None
    if data.source == "local":
        train = _load_local(data.path, data, "data.path")
        val = _load_local(data.val_path, data, "data.val_path") if data.val_path else None
        return train, val
    if data.source == "hub":
        hint = "offline? use local files instead: data=local data.path=FILE data.format=text|json|csv|parquet"
        require_hub(f"dataset {data.name!r}", hint)
        ds = datasets.load_dataset(data.name, data.subset, split=data.split)
        if data.text_column not in ds.column_names:
            raise ValueError(f"hub dataset {data.name}: no column {data.text_column!r}; columns: {ds.column_names}")
        return _text_only(ds, data.text_column), None
    raise ValueError(f"data.source={data.source!r} is not one of ['synthetic', 'local', 'hub']")
