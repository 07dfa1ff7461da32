"""Documents from the three sources, all through `datasets`: synthetic (embedded), local files, hub names."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import datasets

from moe_lab.config import DataConfig
from moe_lab.hub import require_hub

LOCAL_FORMATS = ("text", "json", "csv", "parquet")


def _files(path, what: str) -> list[str]:
    """Expand a path, glob or list of them; a missing file names the path."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files: list[str] = []
    for p in paths:
        p = os.path.expanduser(str(p))
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        missing = [m for m in matches if not Path(m).is_file()]
        if not matches or missing:
            raise FileNotFoundError(f"{what}: no such file {missing[0] if missing else p!r}")
        files.extend(matches)
    return files


def _load_local(path, data: DataConfig, what: str) -> datasets.Dataset:
    if data.format not in LOCAL_FORMATS:
        raise ValueError(f"data.format={data.format!r} is not one of {list(LOCAL_FORMATS)}")
    kwargs = {}
    if data.format == "csv" and data.delimiter:
        kwargs["delimiter"] = data.delimiter
    ds = datasets.load_dataset(data.format, data_files=_files(path, what), split="train", **kwargs)
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
        return load_synthetic(cache, num_docs=data.num_docs, seed=data.corpus_seed, num_domains=data.num_domains), None
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
