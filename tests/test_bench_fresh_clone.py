"""The fresh-clone benchmark reads pytest's summary line as written (counts and seconds)."""

from __future__ import annotations

from benchmarks.bench_fresh_clone import markdown, pytest_summary


def test_pytest_summary_reads_the_last_summary_line() -> None:
    log = "\n".join(
        [
            "$ make test",
            "3 passed in 1.00s",  # an earlier pytest run (e.g. a plugin check) is not the suite's
            "........ [100%]",
            "FAILED tests/test_x.py::test_y - AssertionError",
            "1 failed, 747 passed, 17 skipped, 1 error, 90 warnings in 605.12s (0:10:05)",
        ]
    )
    assert pytest_summary(log) == {"failed": 1, "passed": 747, "skipped": 17, "errors": 1, "pytest_s": 605.12}
    assert pytest_summary("make: *** [Makefile:32: test] Error 2") == {}


def test_markdown_names_the_revision_counts_and_exit_status() -> None:
    row = {
        "revision": "abc1234",
        "shared data": False,
        "make env s": 90.0,
        "make test s": 660.0,
        "make test exit": 0,
        "passed": 750,
        "skipped": 17,
        "pytest_s": 600.0,
        "venv bytes": 6 * 2**30,
        "phantom cache bytes": 2**29,
    }
    table = markdown(row)
    assert "`abc1234`" in table and "1.5 min" in table and "11.0 min in all (exit 0)" in table
    assert "the tests alone 10.0 min: 750 passed, 17 skipped |" in table
    assert "`.venv/` 6.0 GiB" in table and "0.50 GiB" in table and "as on CI" in table
