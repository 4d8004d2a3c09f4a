"""Shared file readers for the real-benchmark loaders: images, JSON, and Hugging Face `datasets` folders.

Two `datasets` layouts are read with pyarrow alone (the `datasets` package is not needed):

- hub parquet files as `huggingface-cli download <repo> --repo-type dataset --local-dir DIR` leaves them:
  `DIR/[<config>/]<split>-00000-of-0000N[-<hash>].parquet` (lmms-lab repos keep the default config under
  `data/`), or the parquet-converter branch layout `DIR/<config>/<split>/0000.parquet`;
- `Dataset.save_to_disk` / `DatasetDict.save_to_disk` folders: `state.json` + `data-*.arrow` (Arrow IPC
  stream), with `dataset_dict.json` and one sub-folder per split for a DatasetDict. Arrow files in the
  `datasets` cache (`<name>-<split>[-00000-of-0000N].arrow`) are read too.

Image columns (`datasets.Image`: a struct of `bytes` and `path`) are decoded only when a sample is
indexed: parquet row groups are read on demand (one cached per file), Arrow files are memory-mapped.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .base import Sample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".JPG", ".JPEG", ".PNG")


def need_pyarrow() -> Any:
    """Import pyarrow or say how to install it."""
    try:
        import pyarrow
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading a Hugging Face datasets folder (parquet or save_to_disk) needs pyarrow: pip install pyarrow"
        ) from e
    return pyarrow


def as_path(path: str | Path | None, bench: str, layouts: str) -> Path:
    """`path` as an existing folder, or an error that describes the layouts `bench` accepts."""
    if path is None:
        raise ValueError(f"{bench}: pass path=<folder with the benchmark files>. Accepted layouts:\n{layouts}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{bench}: {p} does not exist. Accepted layouts:\n{layouts}")
    return p


def first_existing(candidates: Sequence[Path], is_dir: bool = False) -> Path | None:
    for c in candidates:
        if c.is_dir() if is_dir else c.is_file():
            return c
    return None


def find_file(root: Path, names: Sequence[str], max_depth: int = 2) -> Path | None:
    """First file named one of `names` at `root` or up to `max_depth` folders below it (breadth first)."""
    level = [root]
    for _ in range(max_depth + 1):
        for d in level:
            for n in names:
                if (d / n).is_file():
                    return d / n
        level = sorted(c for d in level for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
    return None


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: Path) -> list[dict]:
    """JSON lines, or a JSON list (some copies of the POPE files are one JSON array)."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(stripped)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def open_image(path: Path) -> Any:
    """An RGB PIL image, fully loaded (the file is closed)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def decode_image(value: Any, base_dir: Path | None = None) -> Any:
    """Decode a `datasets.Image` cell ({"bytes", "path"}), raw bytes or a path; None stays None."""
    from PIL import Image

    if value is None:
        return None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            value = data
        elif path:
            value = path
        else:
            return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(value))) as im:
            return im.convert("RGB")
    if isinstance(value, str):
        p = Path(value)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.is_file():
            raise FileNotFoundError(f"image path {value!r} from the dataset does not exist (looked at {p})")
        return open_image(p)
    if hasattr(value, "convert"):  # already a PIL image
        return value.convert("RGB")
    raise TypeError(f"cannot decode an image from a {type(value).__name__}; expected bytes, a path or a PIL image")


# --------------------------------------------------------------------------------------------------------
# Hugging Face datasets folders
# --------------------------------------------------------------------------------------------------------


def _split_matches(file: Path, split: str) -> bool:
    stem = file.name.split(".")[0]
    return stem == split or stem.startswith(f"{split}-") or file.parent.name == split


def _arrow_split_matches(file: Path, split: str) -> bool:
    stem = file.name[: -len(".arrow")]
    return stem.endswith(f"-{split}") or f"-{split}-" in stem


def _save_to_disk_files(d: Path, split: str) -> list[Path] | None:
    if (d / "dataset_dict.json").is_file():
        splits = read_json(d / "dataset_dict.json").get("splits", [])
        if split not in splits:
            return []
        return _save_to_disk_files(d / split, split)
    if (d / "state.json").is_file():
        state = read_json(d / "state.json")
        saved = state.get("_split")
        if saved not in (None, split):
            return []
        return [d / f["filename"] for f in state.get("_data_files", [])]
    return None


def hf_split_files(root: Path, split: str, config: str | None = None) -> list[Path]:
    """Data files of one split in a `datasets` layout under `root` (see the module docstring); [] if none.

    With `config`, only `root/<config>` is searched when that folder exists.
    """
    base = root / config if config and (root / config).is_dir() else root
    files = _save_to_disk_files(base, split)
    if files is not None:
        return files
    found = [p for p in base.rglob("*.parquet") if not any(s.startswith(".") for s in p.relative_to(base).parts)]
    parquet = sorted(p for p in found if _split_matches(p, split))
    if parquet:
        return parquet
    found = [p for p in base.rglob("*.arrow") if not any(s.startswith(".") for s in p.relative_to(base).parts)]
    arrow = sorted(p for p in found if _arrow_split_matches(p, split))
    if arrow:
        return arrow
    # a lone save_to_disk Dataset one level down (e.g. root/<config>/ or root/<split>/)
    for sub in sorted(c for c in base.iterdir() if c.is_dir()) if base.is_dir() else []:
        files = _save_to_disk_files(sub, split)
        if files:
            return files
    return []


def has_hf_files(root: Path) -> bool:
    """Whether `root` looks like a `datasets` layout at all (used to pick a loader and word errors)."""
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return True
    return any(root.rglob("*.parquet")) or any(root.rglob("*.arrow"))


def _read_arrow(path: Path) -> Any:
    pa = need_pyarrow()
    import pyarrow.ipc as ipc

    source = pa.memory_map(str(path), "r")
    try:
        return ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return ipc.open_file(pa.memory_map(str(path), "r")).read_all()


class HFTable:
    """Rows of one split of a `datasets` folder: plain columns read at once, image columns on demand.

    rows: list of dicts of the non-image columns (only `columns` if given; missing ones are skipped).
    image(i, column): the decoded RGB image of row i (None for a null cell).
    """

    def __init__(
        self, files: Sequence[Path], columns: Sequence[str] | None = None, image_columns: Sequence[str] = ("image",)
    ) -> None:
        need_pyarrow()
        import pyarrow.parquet as pq

        if not files:
            raise FileNotFoundError("HFTable needs at least one parquet or arrow file")
        self.files = list(files)
        self.rows: list[dict[str, Any]] = []
        self._where: list[tuple[int, int, int]] = []  # row -> (file index, row group, offset in the group)
        self._sources: list[Any] = []  # per file: ParquetFile or in-memory (mmapped) arrow table
        self._cache: dict[tuple[int, str], tuple[int, Any]] = {}  # (file, column) -> (row group, column data)
        self.image_columns: list[str] = []
        for fi, f in enumerate(self.files):
            if f.suffix == ".parquet":
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                self._sources.append(pf)
                groups = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            else:
                table = _read_arrow(f)
                names = table.schema.names
                self._sources.append(table)
                groups = [table.num_rows]
            if fi == 0:
                self.columns = list(names)
                self.image_columns = [c for c in image_columns if c in names]
            elif list(names) != self.columns:
                raise ValueError(f"{f} has columns {names}, but {self.files[0]} has {self.columns}")
            want = [c for c in (columns or names) if c in names and c not in self.image_columns]
            src = self._sources[-1]
            if want:
                meta = src.read(columns=want) if f.suffix == ".parquet" else src.select(want)
                self.rows.extend(meta.to_pylist())
            else:
                self.rows.extend({} for _ in range(sum(groups)))
            for g, n in enumerate(groups):
                self._where.extend((fi, g, k) for k in range(n))

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int, column: str = "image") -> Any:
        return decode_image(self.cell(i, column), self.files[self._where[i][0]].parent)

    def cell(self, i: int, column: str) -> Any:
        """One raw cell (e.g. an image struct) without reading the whole column."""
        fi, g, k = self._where[i]
        src = self._sources[fi]
        if not hasattr(src, "read_row_group"):  # arrow table: memory-mapped, slicing is free
            return src.column(column)[k].as_py()
        cached = self._cache.get((fi, column))
        if cached is None or cached[0] != g:
            cached = (g, src.read_row_group(g, columns=[column]).column(0))
            self._cache[(fi, column)] = cached
        return cached[1][k].as_py()

    def null_mask(self, column: str) -> list[bool]:
        """Per row, whether `column` is null, read one row group at a time."""
        import pyarrow.compute as pc

        out: list[bool] = []
        for src in self._sources:
            if hasattr(src, "read_row_group"):
                for g in range(src.num_row_groups):
                    out.extend(pc.is_null(src.read_row_group(g, columns=[column]).column(0)).to_pylist())
            else:
                out.extend(pc.is_null(src.column(column)).to_pylist())
        return out


# --------------------------------------------------------------------------------------------------------
# Lazy samples
# --------------------------------------------------------------------------------------------------------


class LazySample(Sample):
    """A `Sample` whose images are decoded on first access of `.images` (ids and text stay cheap to read)."""

    def __init__(self, load_images: Callable[[], list[Any]], **fields: Any) -> None:
        self._load_images: Callable[[], list[Any]] | None = load_images
        super().__init__(images=None, **fields)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def images(self) -> list[Any]:
        if self._load_images is not None:
            self._images, self._load_images = self._load_images(), None
        return self._images

    @images.setter
    def images(self, value: list[Any] | None) -> None:
        if value is not None:
            self._images, self._load_images = value, None


def item_images(item: dict) -> Callable[[], list[Any]]:
    """Loader of an item's one image: `item["path"]` (a file) or `item["table"].image(item["row"])`."""
    if "path" in item:
        return lambda: [open_image(item["path"])]
    return lambda: [item["table"].image(item["row"])]


class LazySamples(Sequence):
    """A read-only sequence that builds `Sample`s only when indexed."""

    def __init__(self, items: Sequence[Any], build: Callable[[Any], Sample]) -> None:
        self._items = items
        self._build = build

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self._build(it) for it in self._items[i]]
        return self._build(self._items[i])

    def __iter__(self) -> Iterator[Sample]:
        for it in self._items:
            yield self._build(it)


def apply_limit(items: list, limit: int | None, bench: str) -> list:
    """The first `limit` items (all when None)."""
    if limit is None:
        return items
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"{bench}: limit must be a non-negative int or None, got {limit!r}")
    return items[:limit]
