"""main's console: whole lines when piped, one status line redrawn in place on a terminal,
a step's progress read from the last bar of its log."""
import io
import time

from pipelines.console import Console, last_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_last_progress_bar_of_a_log_is_the_steps_progress(tmp_path):
    log = tmp_path / "step.log"
    log.write_text("starting\nfold 2 epoch 1/4:  10%|#         | 1/10 [00:01<00:09]\r"
                   "fold 2 epoch 3/4:  70%|#######   | 7/10 [00:07<00:03]\r")
    assert last_progress(log) == "fold 2 epoch 3/4 7/10"
    log.write_text("store stores/demo (300 crops)\n")
    assert last_progress(log) == "store stores/demo (300 crops)"
    assert last_progress(tmp_path / "missing.log") == ""


def test_piped_output_holds_whole_lines_and_a_periodic_status(tmp_path):
    out, log = io.StringIO(), tmp_path / "a.log"
    log.write_text("fold 1 epoch 1/4:  50%|#####     | 5/10 [00:01<00:01]\r")
    with Console(3, out, every=0.05) as console:
        console.start("train_cv convnext/real_only", log)
        time.sleep(0.2)
        console.finish("train_cv convnext/real_only", "CV AUROC 78.0 ± 3.7", 62)
        console.reuse("report", "abc")
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert "[main] train_cv convnext/real_only: CV AUROC 78.0 ± 3.7 (62 s)" in text
    assert "[0/3] 1 running: train_cv convnext/real_only fold 1 epoch 1/4 5/10 · " in text
    assert "[main] reuse report: run abc" in text


def test_on_a_terminal_the_status_line_is_redrawn_in_place_and_cleared_at_the_end(tmp_path):
    out = Terminal()
    with Console(2, out, every=0.05) as console:
        console.start("synthesize", tmp_path / "s.log")
        time.sleep(0.2)
        console.finish("synthesize", "KID 0.01", 3)
    text = out.getvalue()
    assert text.count("\r\x1b[2K[0/2] 1 running: synthesize") >= 2  # redrawn, not appended
    assert "[main] synthesize: KID 0.01 (3 s)\n" in text and text.endswith("\r\x1b[2K")
