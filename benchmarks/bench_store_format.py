"""Feature-store format: safetensors shards (``timm_ood.store``) against Arrow through Hugging Face ``datasets``.

ImageNet-like tap outputs: ``--rows`` rows of pre-logits (D = 2,048) and
logits (K = 1,000), float32 and then bfloat16, with int64 labels. For each
format and dtype:

- write: seconds and MB/s of the payload (tensor bytes, the same for both
  formats) until the files are written, then the ``fsync`` of those files;
  size of the files on disk;
- sequential read of every row into torch tensors in batches of
  ``--batch-size``, cold (the files' pages evicted from the page cache with
  ``posix_fadvise(DONTNEED)``, no root needed) and warm (read again);
- ``--random-batches`` batches at random offsets (the same offsets for both),
  cold and warm;
- memory during the cold sequential read: resident set before, peak resident
  set (``VmHWM`` after resetting it), and the peak growth of anonymous memory
  (what the process allocated; memory-mapped file pages are page cache the
  kernel can drop) sampled at every batch, after handing freed heap memory
  back to the system. A control that keeps a copy of every batch shows what
  loading everything looks like: growth by about the data's size.

Every batch's tensors are summed, so lazily mapped pages are really read,
and the sums of every reader are compared.

safetensors goes through the store itself: ``FeatureStore.bind`` /
``writer`` / ``StoreWriter.add`` / ``commit``, read back with
``StoreEntry.read``. Arrow: the documented ``datasets`` paths,
``Dataset.from_generator`` (one row at a time) then ``save_to_disk``, and
``Dataset.from_dict`` per batch then ``concatenate_datasets`` and
``save_to_disk``; for comparison, the internal ``ArrowWriter.write_batch``
``from_generator`` uses underneath, fed whole numpy batches. Reads:
``load_from_disk`` then ``ds[i:i + batch]`` with ``with_format("torch")``,
and with ``with_format("numpy")`` + ``torch.from_numpy``. Arrow has no
bfloat16: its bits are stored as int16 and viewed back by hand.

Files go to a temporary directory under ``--tmp`` (default /tmp), deleted at the end.

Usage::

    python benchmarks/bench_store_format.py                          # 50,000 rows (610 MB in float32), 2-4 min
    python benchmarks/bench_store_format.py --rows 2000 --output -    # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import timm
import torch

import timm_ood
from timm_ood._runtime import numerics_environment
from timm_ood.evaluation.results import markdown_table
from timm_ood.store import FeatureStore, StoreEntry
from timm_ood.tap import Need, Outputs, Tap

RESULTS = Path(__file__).parent / "results" / "store_format.md"
PRE_LOGITS, CLASSES = 2048, 1000
MB = 1e6

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # pre-logits, logits, labels


# -- memory and files -----------------------------------------------------------------------------


def memory() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[name] = int(rest.split()[0]) * 1024
    return values


def release_free_heap() -> None:
    """Give freed heap memory back to the system (glibc), so that reusing it cannot hide an allocation."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0, own process); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def size_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in files_under(path))


def fsync_files(path: Path) -> float:
    """fsync every file under ``path``; the seconds it took."""
    start = time.perf_counter()
    for file in files_under(path):
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    return time.perf_counter() - start


def evict(path: Path) -> None:
    """Drop the (clean, fsynced) pages of every file under ``path`` from the page cache."""
    for file in files_under(path):
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


# -- readers --------------------------------------------------------------------------------------


class Measured:
    """Seconds, rows, a checksum and memory peaks of one pass over a reader's batches."""

    def __init__(self, batches: Iterable[Batch]) -> None:
        gc.collect()
        release_free_heap()
        before = memory()
        peak_reset = reset_peak()
        self.rss_before = before["VmRSS"]
        peak_anon, peak_file = before["RssAnon"], before["RssFile"]
        self.rows, checksum, self.dtypes = 0, 0.0, None
        start = time.perf_counter()
        for pre_logits, logits, labels in batches:
            checksum += float(pre_logits.sum()) + float(logits.sum()) + float(labels.sum())
            self.rows += len(labels)
            self.dtypes = self.dtypes or (pre_logits.dtype, logits.dtype, labels.dtype)
            now = memory()
            peak_anon, peak_file = max(peak_anon, now["RssAnon"]), max(peak_file, now["RssFile"])
        self.seconds = time.perf_counter() - start
        self.checksum = checksum
        after = memory()
        self.peak_rss = after["VmHWM"] if peak_reset else max(after["VmRSS"], self.rss_before)
        self.anon_growth = max(peak_anon, after["RssAnon"]) - before["RssAnon"]
        self.file_peak = max(peak_file, after["RssFile"])


def store_batches(entry: StoreEntry, tap: Tap, ranges: list[tuple[int, int]] | None, batch_size: int
                  ) -> Iterator[Batch]:
    """Every row in order (one ``read``), or one ``read`` per ``(start, stop)``."""
    reads = [entry.read(tap, batch_size=batch_size)] if ranges is None else \
        (entry.read(tap, start, stop, batch_size=batch_size) for start, stop in ranges)
    for read in reads:
        for outputs, labels in read:
            yield outputs.pre_logits, outputs.logits, labels


def everything(batches: Iterable[Batch]) -> Iterator[Batch]:
    """The control: a copy of every batch kept to the end, as a reader that loads everything would."""
    kept = []
    for batch in batches:
        kept.append(tuple(t.clone() for t in batch))
        yield kept[-1]


def arrow_batches(path: Path, form: str, bits: bool, ranges: list[tuple[int, int]]) -> Iterator[Batch]:
    """``load_from_disk(path).with_format(form)[start:stop]`` for each range, as torch tensors."""
    import datasets

    dataset = datasets.load_from_disk(str(path)).with_format(form)
    for start, stop in ranges:
        batch = dataset[start:stop]
        if form == "numpy":
            batch = {name: torch.from_numpy(value) for name, value in batch.items()}
        pre_logits, logits = batch["pre_logits"], batch["logits"]
        if bits:  # bfloat16 stored as its int16 bits, which the formatters return as int64
            pre_logits = pre_logits.to(torch.int16).view(torch.bfloat16)
            logits = logits.to(torch.int16).view(torch.bfloat16)
        yield pre_logits, logits, batch["labels"]


Reader = Callable[[list[tuple[int, int]] | None], Iterable[Batch]]


def make_readers(entry: StoreEntry, tap: Tap, arrow_path: Path, bits: bool, sequential: list[tuple[int, int]],
                 batch_size: int) -> dict[str, Reader]:
    """Each reader's batches: of the given ``(start, stop)`` ranges, or of every row in order (None)."""
    return {
        "safetensors: `StoreEntry.read`": lambda ranges: store_batches(entry, tap, ranges, batch_size),
        "Arrow: `with_format('torch')[i:j]`":
            lambda ranges: arrow_batches(arrow_path, "torch", bits, ranges or sequential),
        "Arrow: `with_format('numpy')[i:j]` + `torch.from_numpy`":
            lambda ranges: arrow_batches(arrow_path, "numpy", bits, ranges or sequential),
    }


# -- writers --------------------------------------------------------------------------------------


def write_store(root: Path, model: torch.nn.Module, tap: Tap, data: Batch, batch_size: int) -> StoreEntry:
    pre_logits, logits, labels = data
    rows = len(labels)
    bound = FeatureStore(root).bind(model)
    writer = bound.store.writer(bound.key, f"bench-store-format-{pre_logits.dtype}-{rows}",
                                frozenset({Need.LOGITS, Need.PRE_LOGITS}), (0, rows), rows)
    for start in range(0, rows, batch_size):
        stop = min(start + batch_size, rows)
        writer.add(Outputs(None, tap, logits=logits[start:stop], pre_logits=pre_logits[start:stop]),
                   labels[start:stop])
    entry = writer.commit()
    assert entry is not None
    return entry


def arrow_columns(data: Batch) -> tuple[dict[str, np.ndarray], bool]:
    """numpy views of the columns; bfloat16 (which numpy and Arrow lack) as its int16 bits."""
    pre_logits, logits, labels = data
    bits = pre_logits.dtype == torch.bfloat16
    if bits:
        pre_logits, logits = pre_logits.view(torch.int16), logits.view(torch.int16)
    return {"pre_logits": pre_logits.numpy(), "logits": logits.numpy(), "labels": labels.numpy()}, bits


def arrow_features(bits: bool):
    from datasets import Features, List, Value

    value = Value("int16" if bits else "float32")
    return Features({"pre_logits": List(value, length=PRE_LOGITS), "logits": List(value, length=CLASSES),
                     "labels": Value("int64")})


def write_arrow_generator(directory: Path, data: Batch, batch_size: int) -> tuple[float, float]:
    """``Dataset.from_generator`` (rows) into a cache, then ``save_to_disk``: seconds of each."""
    from datasets import Dataset

    columns, bits = arrow_columns(data)
    rows = len(columns["labels"])

    def generate():
        for start in range(0, rows, batch_size):
            batch = {name: column[start:start + batch_size] for name, column in columns.items()}
            for i in range(len(batch["labels"])):
                yield {"pre_logits": batch["pre_logits"][i], "logits": batch["logits"][i],
                       "labels": int(batch["labels"][i])}

    start = time.perf_counter()
    # an explicit fingerprint: otherwise datasets hashes the generator, and with it the arrays it reads
    dataset = Dataset.from_generator(generate, features=arrow_features(bits), cache_dir=str(directory / "cache"),
                                     fingerprint=f"bench-{rows}-{bits}")
    generated = time.perf_counter() - start
    start = time.perf_counter()
    dataset.save_to_disk(str(directory / "dataset"))
    saved = time.perf_counter() - start
    del dataset
    shutil.rmtree(directory / "cache")
    return generated, saved


def write_arrow_from_dict(directory: Path, data: Batch, batch_size: int) -> tuple[float, float]:
    """``Dataset.from_dict`` per batch, ``concatenate_datasets``, ``save_to_disk``: seconds before and of saving."""
    from datasets import Dataset, concatenate_datasets

    columns, bits = arrow_columns(data)
    features = arrow_features(bits)
    rows = len(columns["labels"])
    start = time.perf_counter()
    parts = [Dataset.from_dict({name: column[first:first + batch_size] for name, column in columns.items()},
                               features=features) for first in range(0, rows, batch_size)]
    dataset = concatenate_datasets(parts)
    built = time.perf_counter() - start
    start = time.perf_counter()
    dataset.save_to_disk(str(directory))
    saved = time.perf_counter() - start
    return built, saved


def write_arrow_writer(directory: Path, data: Batch, batch_size: int) -> float:
    """``datasets.arrow_writer.ArrowWriter.write_batch`` of numpy batches into one Arrow file: seconds."""
    from datasets.arrow_writer import ArrowWriter

    columns, bits = arrow_columns(data)
    rows = len(columns["labels"])
    directory.mkdir(parents=True)
    start = time.perf_counter()
    with ArrowWriter(features=arrow_features(bits), path=str(directory / "data.arrow")) as writer:
        for first in range(0, rows, batch_size):
            writer.write_batch({name: column[first:first + batch_size] for name, column in columns.items()})
        writer.finalize()
    return time.perf_counter() - start


# -- the run --------------------------------------------------------------------------------------


def bfloat16_in_arrow() -> str:
    """What ``datasets`` says to a bfloat16 column, and what numpy says to a bfloat16 tensor."""
    from datasets import Features, Value

    said = []
    try:
        Features({"pre_logits": Value("bfloat16")})
        said.append("`Value('bfloat16')` was accepted")
    except Exception as error:  # the message is the finding
        said.append(f"`Value('bfloat16')`: {type(error).__name__}: {str(error).splitlines()[0]}")
    try:
        torch.zeros(1, dtype=torch.bfloat16).numpy()
        said.append("`tensor.numpy()` of a bfloat16 tensor was accepted")
    except Exception as error:
        said.append(f"`tensor.numpy()` of a bfloat16 tensor: {type(error).__name__}: {str(error).splitlines()[0]}")
    return "; ".join(said)


def synthetic(rows: int, dtype: torch.dtype) -> Batch:
    generator = torch.Generator().manual_seed(0)
    pre_logits = torch.randn(rows, PRE_LOGITS, generator=generator).relu_().to(dtype)
    logits = torch.randn(rows, CLASSES, generator=generator).mul_(3).to(dtype)
    return pre_logits, logits, torch.arange(rows) % CLASSES


def seconds_and_rate(seconds: float, payload: int) -> str:
    return f"{seconds:.2f} ({payload / MB / seconds:,.0f} MB/s)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--random-batches", type=int, default=100)
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary directory goes")
    parser.add_argument("--output", default=str(RESULTS), help="markdown file to write ('-': print only)")
    args = parser.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    torch.set_num_threads(1)  # the work is I/O and copies; a second thread only waits on a shared core
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=CLASSES).eval()  # only the store's key reads it
    tap = Tap(model)
    offsets = np.random.default_rng(0).integers(0, max(1, args.rows - args.batch_size), args.random_batches)
    ranges = [(int(o), min(int(o) + args.batch_size, args.rows)) for o in offsets]
    sequential = [(s, min(s + args.batch_size, args.rows)) for s in range(0, args.rows, args.batch_size)]

    write_rows, read_rows, memory_rows, checks = [], [], [], []
    root = Path(tempfile.mkdtemp(prefix="bench-store-format-", dir=args.tmp))
    try:
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            data = synthetic(args.rows, dtype)
            payload = sum(t.numel() * t.element_size() for t in data)

            # -- writes
            entry = write_store(root / f"store-{name}", model, tap, data, args.batch_size)  # warm-up: imports
            shutil.rmtree(root / f"store-{name}")
            start = time.perf_counter()
            entry = write_store(root / f"store-{name}", model, tap, data, args.batch_size)
            store_seconds = time.perf_counter() - start
            store_sync = fsync_files(entry.path)
            store_size = size_on_disk(entry.path)
            write_rows.append([name, "safetensors: `StoreWriter.add` per batch, `commit`",
                               seconds_and_rate(store_seconds, payload), f"{store_sync:.2f}",
                               f"{store_size / MB:,.1f} ({len(entry.manifest['shards'])} shards)", "1.00"])
            print(write_rows[-1], file=sys.stderr)

            generated, saved = write_arrow_generator(root / f"arrow-{name}", data, args.batch_size)
            arrow_path = root / f"arrow-{name}" / "dataset"
            arrow_sync = fsync_files(arrow_path)
            total = generated + saved
            write_rows.append([name, "Arrow: `Dataset.from_generator` (rows), then `save_to_disk` "
                               f"({generated:.2f} s + {saved:.2f} s)", seconds_and_rate(total, payload),
                               f"{arrow_sync:.2f}", f"{size_on_disk(arrow_path) / MB:,.1f}",
                               f"{total / store_seconds:.2f}"])
            print(write_rows[-1], file=sys.stderr)
            if dtype == torch.float32:  # the same per-value encoding as from_generator: once is enough
                built, saved = write_arrow_from_dict(root / f"arrow-dict-{name}", data, args.batch_size)
                sync = fsync_files(root / f"arrow-dict-{name}")
                total = built + saved
                write_rows.append([name, "Arrow: `Dataset.from_dict` per batch, `concatenate_datasets`, "
                                   f"`save_to_disk` ({built:.2f} s + {saved:.2f} s)",
                                   seconds_and_rate(total, payload), f"{sync:.2f}",
                                   f"{size_on_disk(root / f'arrow-dict-{name}') / MB:,.1f}",
                                   f"{total / store_seconds:.2f}"])
                print(write_rows[-1], file=sys.stderr)
                shutil.rmtree(root / f"arrow-dict-{name}")
            seconds = write_arrow_writer(root / f"arrow-writer-{name}", data, args.batch_size)
            sync = fsync_files(root / f"arrow-writer-{name}")
            write_rows.append([name, "Arrow: internal `ArrowWriter.write_batch` of numpy batches, one file",
                               seconds_and_rate(seconds, payload), f"{sync:.2f}",
                               f"{size_on_disk(root / f'arrow-writer-{name}') / MB:,.1f}",
                               f"{seconds / store_seconds:.2f}"])
            print(write_rows[-1], file=sys.stderr)
            shutil.rmtree(root / f"arrow-writer-{name}")
            del data
            gc.collect()

            # -- reads
            readers = make_readers(entry, tap, arrow_path, dtype == torch.bfloat16, sequential, args.batch_size)
            store_sequential = None
            sums = {}
            for reader, batches in readers.items():
                path = entry.path if reader.startswith("safetensors") else arrow_path
                evict(path)
                cold = Measured(batches(None))
                warm = Measured(batches(None))
                evict(path)
                random_cold = Measured(batches(ranges))
                random_warm = Measured(batches(ranges))
                assert cold.rows == args.rows and random_cold.rows == sum(b - a for a, b in ranges)
                store_sequential = store_sequential or warm.seconds
                sums[reader] = (cold.checksum, random_warm.checksum)
                random_payload = payload * random_cold.rows / args.rows
                read_rows.append([name, reader, seconds_and_rate(cold.seconds, payload),
                                  seconds_and_rate(warm.seconds, payload),
                                  seconds_and_rate(random_cold.seconds, random_payload),
                                  seconds_and_rate(random_warm.seconds, random_payload),
                                  f"{warm.seconds / store_sequential:.2f}",
                                  ", ".join(str(d).removeprefix("torch.") for d in cold.dtypes)])
                print(read_rows[-1], file=sys.stderr)
                loads_all = cold.anon_growth > 0.5 * payload
                memory_rows.append([name, reader, f"{cold.rss_before / MB:,.0f}", f"{cold.peak_rss / MB:,.0f}",
                                    f"{cold.anon_growth / MB:,.1f}", f"{cold.file_peak / MB:,.0f}",
                                    f"{payload / MB:,.0f}", "yes" if loads_all else "no"])
            evict(entry.path)
            control = Measured(everything(store_batches(entry, tap, None, args.batch_size)))
            memory_rows.append([name, "control: `StoreEntry.read`, a copy of every batch kept",
                                f"{control.rss_before / MB:,.0f}", f"{control.peak_rss / MB:,.0f}",
                                f"{control.anon_growth / MB:,.1f}", f"{control.file_peak / MB:,.0f}",
                                f"{payload / MB:,.0f}", "yes" if control.anon_growth > 0.5 * payload else "no"])
            del control
            checks.append(f"{name}: every reader returned the same rows (sums of every tensor equal): "
                          f"{len(set(sums.values())) == 1}")
            del entry
            shutil.rmtree(root / f"store-{name}")
            shutil.rmtree(root / f"arrow-{name}")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    environment = numerics_environment()
    command = ("python benchmarks/bench_store_format.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    versions = (f"safetensors {__import__('safetensors').__version__}, datasets {datasets.__version__}, "
                f"pyarrow {__import__('pyarrow').__version__}, timm-ood {timm_ood.__version__}")
    report = f"""# Feature-store format: safetensors shards against Arrow (Hugging Face datasets)

Command: `{command.strip()}`

Machine: {environment["cpu"]}, {os.cpu_count()} cores (shared), {torch.get_num_threads()} torch threads,
{platform.system()} {platform.release()}; torch {torch.__version__},
{versions},
Python {platform.python_version()}. Files in a temporary directory under `{args.tmp}`.

Data: {args.rows:,} rows of pre-logits (D = {PRE_LOGITS:,}) and logits (K = {CLASSES:,}), float32 or
bfloat16, and int64 labels; batches of {args.batch_size} rows. MB = 10^6 bytes of tensor payload
(the same for every format). Seconds, one run.

## Write

"fsync s": then flushing the files written to the disk. "ratio": seconds against safetensors'.

{markdown_table(["dtype", "how", "seconds (payload MB/s)", "fsync s", "size on disk, MB", "ratio"], write_rows)}

bfloat16 in Arrow: {bfloat16_in_arrow()}. Its bits are written as int16 here and viewed back as bfloat16 by
hand after reading (the schema says int16: the dtype has to be carried outside the files). `datasets`'
torch and numpy formatters return every integer column as int64, so the readers below cast the int16 bits
back to int16 before the view.

## Read into torch tensors

Sequential: every row in batches of {args.batch_size}. Random: {args.random_batches} batches of
{args.batch_size} rows at random offsets (the same for every reader). Cold: the files' pages evicted
from the page cache first (`posix_fadvise(DONTNEED)` after `fsync`); warm: read again at once.
"ratio": warm sequential seconds against safetensors'. Every batch's tensors are summed.

{markdown_table(["dtype", "reader", "sequential cold s (MB/s)", "sequential warm s (MB/s)",
                 "random cold s (MB/s)", "random warm s (MB/s)", "ratio", "dtypes read"], read_rows)}

{chr(10).join(checks)}

## Memory during the cold sequential read

Resident set before the read and its peak during it (`VmHWM`, reset before the read); the peak growth of
anonymous memory (allocated by the process, sampled at each batch) and the peak of file-backed resident
pages (memory-mapped files: page cache the kernel can drop). "loads everything": anonymous growth over half
the data. The control keeps a copy of every batch: what loading everything looks like. Freed heap memory is
returned to the system (`malloc_trim`) before each read, so that it cannot hide an allocation.

{markdown_table(["dtype", "reader", "RSS before, MB", "peak RSS, MB", "anonymous growth, MB",
                 "file-backed peak, MB", "data, MB", "loads everything"], memory_rows)}
"""
    print(report)
    if args.output != "-":
        Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
