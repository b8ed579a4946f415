"""Progress lines: when they appear, what they say, and that they end at 100%."""

from ansible_collections.multipush.sftp.plugins.plugin_utils._progress import Progress, human_bytes, human_duration


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
    assert human_duration(3725.4) == "1:02:05"
    assert human_duration(-3) == "0:00:00"


def test_no_line_before_the_interval_then_one_per_interval():
    progress, clock, lines = make(interval=5)
    progress.start(total_bytes=1000 * 1024**2, total_files=3)
    clock.now += 4.9
    progress.add_bytes(100 * 1024**2)
    progress.tick()
    assert lines == []
    clock.now += 0.2
    progress.tick()
    progress.tick()
    assert len(lines) == 1
    verbosity, text = lines[0]
    assert verbosity == 0
    assert text.startswith("web1:  10.0% 100.0 MiB of 1000.0 MiB, ")
    assert "MB/s" in text and "ETA 0:00:46" in text and "files 0/3" in text


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
    progress.finish({"files_sent": 2, "files_skipped": 0, "bytes_sent": 2048, "seconds": 1.5,
                     "throughput_mb_s": 0.0, "retries": 0})
    assert "100.0%" in lines[-2][1] and "files 2/2" in lines[-2][1]
    assert lines[-1][1].startswith("web1: done: 2 sent, 0 skipped, 2.0 KiB in 1.5 s")


def test_resent_bytes_grow_the_total_and_short_pushes_show_only_the_summary():
    progress, clock, lines = make(interval=5)
    progress.start(total_bytes=100, total_files=1)
    progress.grow(50)
    progress.add_bytes(150)
    progress.file_done("/d/a", 100, 0.01, "resent")
    progress.finish({"files_sent": 1, "files_skipped": 0, "bytes_sent": 150, "seconds": 0.1,
                     "throughput_mb_s": 0.0, "retries": 0})
    assert [verbosity for verbosity, _text in lines] == [1, 0]
    assert progress.line().split("%")[0].strip().endswith("100.0")


def test_interval_zero_turns_everything_off():
    progress, clock, lines = make(interval=0)
    progress.start(total_bytes=100, total_files=1)
    clock.now += 100
    progress.tick()
    progress.file_done("/d/a", 100, 1.0, "sent")
    progress.finish({"files_sent": 1, "files_skipped": 0, "bytes_sent": 100, "seconds": 1.0,
                     "throughput_mb_s": 0.0, "retries": 0})
    assert lines == []
