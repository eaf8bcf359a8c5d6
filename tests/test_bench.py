"""`python -m benchmarks.bench` on a CPU where bfloat16 would abort: its machine
line names the kernels, and bfloat16 is left out with a note rather than
taking the process down."""

from benchmarks import bench
from tfgpt.runtime import devices


def test_bfloat16_is_left_out_where_it_would_abort(monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(devices, "bfloat16_aborts", lambda: True)
    monkeypatch.setattr(bench, "sampler_bench", lambda **kw: asked.append(kw["precision"]) or [])
    assert bench.main(["--sampler"]) == 0
    out = capsys.readouterr().out
    assert asked == ["float32"]
    assert "note: bfloat16 left out" in out
    machine = next(line for line in out.splitlines() if line.startswith("machine: "))
    assert machine.endswith(f"kernels {devices.cpu_kernels()}")


def test_both_precisions_where_bfloat16_runs(monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(devices, "bfloat16_aborts", lambda: False)
    monkeypatch.setattr(bench, "sampler_bench", lambda **kw: asked.append(kw["precision"]) or [])
    assert bench.main(["--sampler"]) == 0
    assert asked == ["float32", "bfloat16"] and "left out" not in capsys.readouterr().out
