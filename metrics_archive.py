"""Fold a dead gunicorn worker's metric files into one archive per metric type.

In prometheus-client's multiprocess mode every worker writes ``counter_<pid>.db`` and
``histogram_<pid>.db`` in ``PROMETHEUS_MULTIPROC_DIR``, and ``/metrics`` adds up every
``*.db`` file it finds. The library never removes them (``mark_process_dead`` only drops
live-gauge files), so with workers recycled by ``max_requests`` the directory would grow
by two files per recycle, forever, and every scrape would read them all. The master
calls :func:`archive_dead_worker` from ``child_exit``: the dead worker's samples are
added to ``counter_archive.db`` / ``histogram_archive.db`` (the library reads these like
any worker's file: the type is the name up to the first ``_``), then its files are
removed. Totals at ``/metrics`` stay the same; the directory holds the live workers'
files plus one archive per type.

Order, and consistency. The new archive is written under a name the scrape ignores and
renamed over the old one, so a scrape reads either the whole old archive or the whole
new one; only then is the dead worker's file removed. If anything fails before the
rename, the dead file and the old archive are left as they were: nothing is lost or
counted twice, the directory just keeps two more files (the other order, remove first,
would lose the dead worker's counts for good on such a failure, e.g. a full disk).
"Add to the archive" and "remove the dead file" cannot be one atomic step, so the two
hold an exclusive lock on the directory's lock file, and a scrape holds a shared one
(:func:`consistent_read`): a scrape never sees the dead worker in both places, however
long the master is descheduled between the two steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from prometheus_client.mmap_dict import MmapedDict

#: Metric types whose per-worker samples add up across workers (and across a recycle).
#: Gauges are not among them: ``multiprocess_mode`` says how they combine.
ARCHIVED_TYPES = ("counter", "histogram", "summary")
#: Replaces the pid in an archive's name: ``counter_archive.db``.
ARCHIVE_NAME = "archive"
#: Suffix of an archive being written; the scrape reads ``*.db`` only.
PARTIAL_SUFFIX = ".partial"
#: The lock file that keeps a scrape and a merge apart (not ``*.db``: never read).
LOCK_NAME = "archive.lock"


@contextlib.contextmanager
def _locked(directory: str | os.PathLike[str], mode: int) -> Iterator[None]:
    with open(os.path.join(directory, LOCK_NAME), "a") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def consistent_read(directory: str | os.PathLike[str]):
    """Hold while reading the directory for a scrape: no merge runs meanwhile."""
    return _locked(directory, fcntl.LOCK_SH)


def archive_dead_worker(directory: str | os.PathLike[str], pid: int) -> None:
    """Add worker ``pid``'s counter, histogram and summary samples to the archives.

    Call it once the worker has exited (nothing writes its files any more). A type the
    worker has no file for is skipped; files of other workers and unknown files are not
    touched. Errors (an unreadable file, a full disk) propagate, with the dead worker's
    files and the archives left as they were.
    """
    for typ in ARCHIVED_TYPES:
        dead = os.path.join(directory, f"{typ}_{pid}.db")
        totals: dict[str, tuple[float, float]] = {}
        try:
            _add_file(totals, dead)
        except FileNotFoundError:
            continue
        archive = os.path.join(directory, f"{typ}_{ARCHIVE_NAME}.db")
        with _locked(directory, fcntl.LOCK_EX):
            with contextlib.suppress(FileNotFoundError):
                _add_file(totals, archive)
            _replace(archive, totals)
            os.remove(dead)  # last: a failure above leaves the dead file, the archive as it was


def _add_file(totals: dict[str, tuple[float, float]], path: str) -> None:
    """Add each (value, timestamp) sample of the file at ``path`` to ``totals`` by key.

    Values add up; the latest timestamp is kept (counters and histograms write none).
    """
    if os.path.getsize(path) == 0:  # created by a worker killed before it sized the file
        return
    for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):
        total, latest = totals.get(key, (0.0, 0.0))
        totals[key] = (total + value, max(latest, timestamp))


def _replace(path: str, samples: dict[str, tuple[float, float]]) -> None:
    """Write ``samples`` to ``path`` in one rename: readers see the old file or the new."""
    partial = path + PARTIAL_SUFFIX
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial)  # left by a master that died mid-write; MmapedDict would keep it
    try:
        values = MmapedDict(partial)
        try:
            for key, (value, timestamp) in samples.items():
                values.write_value(key, value, timestamp)
        finally:
            values.close()
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise
