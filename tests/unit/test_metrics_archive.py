"""A dead worker's counter and histogram files are folded into the archives, totals intact."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from metrics_archive import LOCK_NAME, archive_dead_worker, consistent_read

DEAD, LIVE, SECOND_DEAD = 101, 102, 103
REQUESTS_HELP = "HTTP requests answered"
LATENCY_HELP = "Time to answer"


def metric_files(directory) -> list[str]:
    """What is in the directory, but the lock file that keeps scrapes and merges apart."""
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_NAME)


def requests_key(route: str) -> str:
    return mmap_key("http_requests", "http_requests_total", ["route"], [route], REQUESTS_HELP)


def latency_key(suffix: str, **labels: str) -> str:
    name = "http_request_duration_seconds"
    return mmap_key(name, name + suffix, list(labels), list(labels.values()), LATENCY_HELP)


def write_samples(path: Path, values: dict[str, float]) -> None:
    """Write ``values`` the way a worker's prometheus-client does."""
    samples = MmapedDict(str(path))
    try:
        for key, value in values.items():
            samples.write_value(key, value, 0.0)
    finally:
        samples.close()


def read_samples(path: Path) -> dict[str, float]:
    return {key: value for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))}


def write_worker(directory: Path, pid: int, requests: float, slow: float) -> None:
    """One worker's files: a counter with two routes, a histogram with two buckets."""
    write_samples(
        directory / f"counter_{pid}.db",
        {requests_key("/v1/payments"): requests, requests_key("/healthz"): 1},
    )
    write_samples(
        directory / f"histogram_{pid}.db",
        {
            latency_key("_bucket", le="0.1"): requests - slow,
            latency_key("_bucket", le="+Inf"): slow,
            latency_key("_sum"): requests * 0.05,
        },
    )


def scrape(directory: Path) -> dict[tuple[str, tuple], float]:
    """What ``/metrics`` shows: every sample, merged over the directory's files."""
    collector = MultiProcessCollector(None, path=str(directory))
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in collector.collect()
        for sample in metric.samples
    }


def test_scraped_totals_are_the_same_after_archiving(tmp_path):
    write_worker(tmp_path, DEAD, requests=7, slow=2)
    write_worker(tmp_path, LIVE, requests=5, slow=1)
    before = scrape(tmp_path)

    archive_dead_worker(tmp_path, DEAD)

    assert scrape(tmp_path) == before
    assert before[("http_requests_total", (("route", "/v1/payments"),))] == 12
    assert before[("http_request_duration_seconds_count", ())] == 12


def test_dead_worker_samples_add_up_per_key_in_the_archives(tmp_path):
    write_worker(tmp_path, DEAD, requests=7, slow=2)

    archive_dead_worker(tmp_path, DEAD)

    assert read_samples(tmp_path / "counter_archive.db") == {
        requests_key("/v1/payments"): 7,
        requests_key("/healthz"): 1,
    }
    assert read_samples(tmp_path / "histogram_archive.db") == {
        latency_key("_bucket", le="0.1"): 5,
        latency_key("_bucket", le="+Inf"): 2,
        latency_key("_sum"): pytest.approx(0.35),
    }


def test_a_second_dead_worker_adds_to_the_archive(tmp_path):
    write_worker(tmp_path, DEAD, requests=7, slow=2)
    write_worker(tmp_path, SECOND_DEAD, requests=4, slow=0)
    write_samples(tmp_path / f"counter_{SECOND_DEAD}.db", {requests_key("/metrics"): 3})

    archive_dead_worker(tmp_path, DEAD)
    archive_dead_worker(tmp_path, SECOND_DEAD)

    assert read_samples(tmp_path / "counter_archive.db") == {
        requests_key("/v1/payments"): 11,
        requests_key("/healthz"): 2,
        requests_key("/metrics"): 3,
    }
    assert read_samples(tmp_path / "histogram_archive.db")[latency_key("_bucket", le="0.1")] == 9


def test_dead_worker_files_are_removed_and_live_ones_kept(tmp_path):
    write_worker(tmp_path, DEAD, requests=7, slow=2)
    write_worker(tmp_path, LIVE, requests=5, slow=1)

    archive_dead_worker(tmp_path, DEAD)

    assert metric_files(tmp_path) == [
        "counter_102.db",
        "counter_archive.db",
        "histogram_102.db",
        "histogram_archive.db",
    ]


def test_files_stay_bounded_over_many_recycled_workers(tmp_path):
    for pid in range(1000, 1050):
        write_worker(tmp_path, pid, requests=3, slow=1)
        archive_dead_worker(tmp_path, pid)

    assert metric_files(tmp_path) == [
        "counter_archive.db",
        "histogram_archive.db",
    ]
    assert scrape(tmp_path)[("http_requests_total", (("route", "/v1/payments"),))] == 150


@pytest.mark.parametrize(
    "name, content",
    [
        ("notes.txt", b"not a metrics file"),
        ("counter_101.db.bak", b"a copy someone made"),
        ("counter_garbage.db", b"\xff" * 64),
        ("gauge_all_101.db", None),  # gauges keep their multiprocess_mode handling
        ("gauge_livesum_101.db", None),  # removed by mark_process_dead, not here
        ("summary_102.db", None),  # another worker's
    ],
)
def test_unknown_and_other_files_are_left_alone(tmp_path, name, content):
    other = tmp_path / name
    if content is None:
        write_samples(other, {requests_key("/other"): 2})
        content = other.read_bytes()
    else:
        other.write_bytes(content)
    write_worker(tmp_path, DEAD, requests=7, slow=2)

    archive_dead_worker(tmp_path, DEAD)

    assert other.read_bytes() == content


def test_a_worker_without_files_changes_nothing(tmp_path):
    write_worker(tmp_path, LIVE, requests=5, slow=1)

    archive_dead_worker(tmp_path, DEAD)

    assert metric_files(tmp_path) == [
        "counter_102.db",
        "histogram_102.db",
    ]


def test_a_missing_histogram_file_still_archives_the_counter(tmp_path):
    write_samples(tmp_path / f"counter_{DEAD}.db", {requests_key("/healthz"): 4})

    archive_dead_worker(tmp_path, DEAD)

    assert metric_files(tmp_path) == ["counter_archive.db"]
    assert read_samples(tmp_path / "counter_archive.db") == {requests_key("/healthz"): 4}


def test_an_empty_dead_file_is_removed(tmp_path):
    (tmp_path / f"counter_{DEAD}.db").write_bytes(b"")  # killed between creating and sizing

    archive_dead_worker(tmp_path, DEAD)

    assert metric_files(tmp_path) == ["counter_archive.db"]
    assert read_samples(tmp_path / "counter_archive.db") == {}


def test_an_unreadable_dead_file_leaves_the_files_as_they_were(tmp_path):
    write_samples(tmp_path / "counter_archive.db", {requests_key("/healthz"): 4})
    archive_before = (tmp_path / "counter_archive.db").read_bytes()
    corrupt = tmp_path / f"counter_{DEAD}.db"
    # 64 bytes used, and a first key that claims 1000 of them
    corrupt.write_bytes(struct.pack("ii", 64, 0) + struct.pack("i", 1000) + b"\x00" * 52)

    with pytest.raises(RuntimeError, match="corrupted"):
        archive_dead_worker(tmp_path, DEAD)

    assert corrupt.exists()
    assert (tmp_path / "counter_archive.db").read_bytes() == archive_before
    assert metric_files(tmp_path) == [
        "counter_101.db",
        "counter_archive.db",
    ]


def test_a_partial_archive_left_by_a_crashed_master_is_not_counted(tmp_path):
    write_samples(tmp_path / "counter_archive.db.partial", {requests_key("/healthz"): 99})
    write_samples(tmp_path / f"counter_{DEAD}.db", {requests_key("/healthz"): 4})

    archive_dead_worker(tmp_path, DEAD)

    assert read_samples(tmp_path / "counter_archive.db") == {requests_key("/healthz"): 4}
    assert not (tmp_path / "counter_archive.db.partial").exists()


def test_a_scrape_never_sees_a_dead_worker_both_in_the_archive_and_in_its_file(tmp_path):
    """The merge waits for a scrape in progress (and a scrape for a merge): the window
    between "archive written" and "dead file removed" is never visible."""
    write_samples(tmp_path / "counter_101.db", {requests_key("/a"): 3.0})
    write_samples(tmp_path / "counter_archive.db", {requests_key("/a"): 10.0})
    merged = threading.Event()
    with consistent_read(tmp_path):
        merge = threading.Thread(
            target=lambda: (archive_dead_worker(tmp_path, 101), merged.set()), daemon=True
        )
        merge.start()
        assert not merged.wait(0.2)  # held off while the scrape reads
        assert metric_files(tmp_path) == ["counter_101.db", "counter_archive.db"]
    assert merged.wait(5)
    assert metric_files(tmp_path) == ["counter_archive.db"]
    assert read_samples(tmp_path / "counter_archive.db") == {requests_key("/a"): 13.0}
