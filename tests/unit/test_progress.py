"""Progress lines: when they appear, what they say, and that they end at 100%."""


from ansible_collections.multipush.sftp.plugins.plugin_utils._progress import (
    Progress, human_bytes, human_duration, human_rate, summary,
)
from tests.support.output_format import line_patterns

# the output convention (tests/support/output_format.py), for the host of these tests
PATTERNS = line_patterns("web1")
PROGRESS_LINE, FILE_LINE, DONE_LINE = PATTERNS.progress, PATTERNS.file, PATTERNS.done


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(interval=5.0):
    clock = FakeClock()
    lines = []
    progress = Progress("web1", interval, lambda text, verbosity: lines.append((verbosity, text)), clock=clock)
    return progress, clock, lines


def test_human_units():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"
    assert human_rate(48.14e6) == "45.9 MiB/s"
    assert human_duration(3725.4) == "1:02:05"
    assert human_duration(-3) == "0:00:00"


def test_first_line_a_second_after_bytes_start_then_one_per_interval():
    progress, clock, lines = make(interval=5)
    progress.start(total_bytes=1000 * 1024**2, total_files=3)
    clock.now += 3  # connecting, nothing acknowledged yet
    progress.tick()
    assert lines == []
    progress.add_bytes(100 * 1024**2)
    clock.now += 0.9
    progress.tick()
    assert lines == []
    clock.now += 0.2
    progress.tick()
    progress.tick()
    assert len(lines) == 1
    verbosity, text = lines[0]
    assert verbosity == 0
    assert PROGRESS_LINE.match(text), text
    assert text.startswith("web1:  10.0% 100.0 MiB of 1000.0 MiB, 24.4 MiB/s, ")
    assert "ETA 0:00:37" in text and "files 0/3" in text
    clock.now += 4.9
    progress.tick()
    assert len(lines) == 1
    clock.now += 0.2
    progress.tick()
    assert len(lines) == 2 and PROGRESS_LINE.match(lines[1][1]), lines


def test_percent_holds_below_100_until_every_file_is_in_place_and_final_line_says_100():
    progress, clock, lines = make(interval=1)
    progress.start(total_bytes=2048, total_files=2)
    progress.add_bytes(2048)
    progress.file_done("/d/a", 1024, 0.5, "sent")
    clock.now += 1.5
    progress.tick()
    assert "99.9%" in lines[-1][1]
    assert lines[-2][0] == 1 and "sent /d/a" in lines[-2][1]  # per-file detail is for -v
    progress.file_done("/d/b", 1024, 0.5, "sent")
    progress.finish({"files": [{"status": "sent"}, {"status": "sent"}], "files_sent": 2, "files_skipped": 0,
                     "bytes_sent": 2048, "seconds": 1.5, "throughput_mb_s": 0.0, "retries": 0})
    assert "100.0%" in lines[-2][1] and "files 2/2" in lines[-2][1]
    assert lines[-1][1].startswith("web1: done: 2 sent, 0 skipped, 2.0 KiB in 1.5 s")


def test_resent_bytes_grow_the_total_and_a_short_push_still_ends_with_its_100_percent_line():
    progress, clock, lines = make(interval=5)
    progress.start(total_bytes=100, total_files=1)
    progress.grow(50)
    progress.add_bytes(150)
    progress.file_done("/d/a", 100, 0.01, "resent")
    progress.finish({"files": [{"status": "resent", "size": 100}], "files_sent": 1, "files_skipped": 0,
                     "bytes_sent": 150, "seconds": 0.1, "throughput_mb_s": 0.0, "retries": 0})
    assert [verbosity for verbosity, _text in lines] == [1, 0, 0]
    assert lines[1][1].startswith("web1: 100.0% 150 B of 150 B, ") and "files 1/1" in lines[1][1]
    assert lines[2][1] == "web1: done: 1 sent, 0 skipped, 150 B in 0.1 s (1.5 KiB/s), 0 retries"


def test_every_line_follows_one_format_whatever_the_file_size_or_time():
    progress, clock, lines = make(interval=1)
    progress.start(total_bytes=200 * 1024**2 + 18, total_files=4)
    progress.add_bytes(14)
    progress.file_done("/d/tiny", 14, 0.0004, "sent")
    progress.add_bytes(4)
    progress.file_done("/d/four", 4, 0.1, "sent")
    clock.now += 1
    progress.tick()
    progress.add_bytes(200 * 1024**2)
    progress.file_done("/d/big", 190 * 1024**2, 4.2, "resumed")
    progress.file_done("/d/unknown", 10 * 1024**2, 0.0, "resent")
    statuses = ("sent", "sent", "resumed", "resent", "skipped")
    result = {"files": [{"status": status} for status in statuses],
              "files_sent": 4, "files_skipped": 1, "bytes_sent": 200 * 1024**2 + 18, "seconds": 4.31,
              "throughput_mb_s": 48.66, "retries": 2, "links": [{"status": "created"}, {"status": "unchanged"}]}
    progress.finish(result)
    file_lines = [text for verbosity, text in lines if verbosity == 1]
    assert [bool(FILE_LINE.match(text)) for text in file_lines] == [True] * 4, file_lines
    assert file_lines[0] == "web1: sent /d/tiny (14 B in 0.0 s, 34.2 KiB/s)"
    assert file_lines[1] == "web1: sent /d/four (4 B in 0.1 s, 40 B/s)"
    assert file_lines[3] == "web1: resent /d/unknown (10.0 MiB in 0.0 s, n/a)"
    progress_lines = [text for verbosity, text in lines if verbosity == 0][:-1]
    assert progress_lines and all(PROGRESS_LINE.match(text) for text in progress_lines), progress_lines
    done = lines[-1][1]
    assert DONE_LINE.match(done), done
    # a resumed file is counted as resumed, not as sent; no MB next to MiB
    assert done == ("web1: done: 3 sent, 1 resumed, 1 skipped, 1 link(s) created or changed, 200.0 MiB in 4.3 s "
                    "(46.4 MiB/s), 2 retries")
    assert not any(" MB" in text for _verbosity, text in lines)


def test_summary_in_check_mode_says_what_would_be_sent():
    result = {"files": [{"status": "would_send", "size": 3 * 1024**2}, {"status": "would_send", "size": 1024**2},
                        {"status": "skipped", "size": 5}],
              "files_skipped": 1, "bytes_sent": 0, "seconds": 0.5, "retries": 0,
              "links": [{"status": "would_create"}, {"status": "unchanged"}]}
    assert summary(result, check_mode=True) == ("would send 2 file(s) (4.0 MiB), 1 skipped, "
                                                "would create or change 1 link(s)")
    assert summary(dict(result, links=[]), check_mode=True) == "would send 2 file(s) (4.0 MiB), 1 skipped"


def test_interval_zero_turns_everything_off():
    progress, clock, lines = make(interval=0)
    progress.start(total_bytes=100, total_files=1)
    clock.now += 100
    progress.tick()
    progress.file_done("/d/a", 100, 1.0, "sent")
    progress.finish({"files_sent": 1, "files_skipped": 0, "bytes_sent": 100, "seconds": 1.0,
                     "throughput_mb_s": 0.0, "retries": 0})
    assert lines == []


def test_the_done_line_names_the_absolute_dest_and_in_check_mode_what_would_be_sent():
    progress, _clock, lines = make(interval=5)
    progress.finish({"dest": "/srv/app", "summary": "would send 2 file(s) (1.0 MiB), 0 skipped",
                     "files": [], "files_sent": 0, "files_skipped": 0, "bytes_sent": 0, "seconds": 0.2,
                     "throughput_mb_s": 0.0, "retries": 0})
    assert lines == [(0, "web1: done: /srv/app: would send 2 file(s) (1.0 MiB), 0 skipped")]
