"""bench/bench_kd_loss.py's summary: ratios against the plain path, and a peak too small to resolve (the GPU check's
CPU dry run, where malloc reuses pages it already holds and plain's RSS peak does not move) reported as unresolved
instead of dividing by it."""

from bench import bench_kd_loss


def measurement(peak_bytes, wall, cpu):
    return {"peak_bytes": peak_bytes, "memory_source": "VmHWM since process start", "wall_s": [wall, wall * 1.5],
            "cpu_s": [cpu, cpu * 2]}


def test_ratios_against_plain_at_a_resolved_peak():
    measurements = {4096: {"plain": measurement(64 << 20, 2.0, 4.0),
                           "fused_weighted": measurement(8 << 20, 2.2, 4.4)}}
    rows = bench_kd_loss._summarise(measurements, ("plain", "fused_weighted"), [4096])
    fused = rows[1]
    assert fused["peak_vs_plain"] == 0.125 and abs(fused["wall_vs_plain"] - 1.1) < 1e-12
    assert abs(fused["cpu_vs_plain"] - 1.1) < 1e-12 and "peak_note" not in fused
    (check,) = bench_kd_loss._check_targets(rows)
    assert check == {"n": 4096, "method": "fused_weighted", "peak_ok": True, "time_measure": "cpu_vs_plain",
                     "time_ok": True}


def test_an_unresolved_plain_peak_gives_no_ratio_and_says_why():
    measurements = {64: {"plain": measurement(0, 0.01, 0.01), "fused_loss_share": measurement(4096, 0.02, 0.02)}}
    rows = bench_kd_loss._summarise(measurements, ("plain", "fused_loss_share"), [64])
    fused = rows[1]
    assert fused["peak_vs_plain"] is None and "too small to resolve" in fused["peak_note"]
    assert fused["wall_vs_plain"] == 2.0
    (check,) = bench_kd_loss._check_targets(rows)
    assert check["peak_ok"] is None and check["time_ok"] is False
    # N, method, peak MiB, then its ratio to plain: printed as "-", not a number
    assert bench_kd_loss._format_table(rows).splitlines()[-1].split()[:4] == ["64", "fused_loss_share", "0.0", "-"]
