"""What a run of tasks reports (diffusion_attribution.core.reporting): progress lines."""

from __future__ import annotations

from diffusion_attribution.core.reporting import Progress


def test_progress_lines(capsys) -> None:
    now = [0.0]
    prog = Progress("retrain", total=48, done=10, clock=lambda: now[0])
    prog.update(10, 0)
    now[0] = 2.0
    prog.update(11, 2)  # changed, but within 5 s of the last line
    now[0] = 20.0
    prog.update(12, 2)
    now[0] = 40.0
    prog.update(12, 2)  # unchanged: no line before 30 s have passed
    now[0] = 50.0
    prog.update(12, 2)  # ... but one every 30 s (at least twice a minute)
    now[0] = 90.0
    prog.update(48, 0, final=True)
    assert capsys.readouterr().out.splitlines() == [
        "retrain: 10/48 done, 0 running, ETA ?",
        "retrain: 12/48 done, 2 running, ETA 6m00s",  # 2 done in 20 s, 36 left
        "retrain: 12/48 done, 2 running, ETA 15m00s",
        "retrain: 48/48 done, 0 running, took 1m30s",
    ]
    quiet = Progress("x", total=1, done=0, enabled=False)
    quiet.update(1, 0, final=True)
    assert capsys.readouterr().out == ""
