"""The GPU check script (`experiments/gpu_kernels.py`) runs end to end off a GPU: its kernels
interpreted on tiny shapes, every row timed and compared with the XLA row, the JSON written."""

from __future__ import annotations

import json

from experiments import gpu_kernels


def test_the_gpu_checks_run_interpreted_and_agree_with_xla(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    rows = gpu_kernels.main(["--iterations", "1", "--json", str(out)])
    checks = {(r["check"], r["impl"]) for r in rows}
    for check in ("rms_norm", "add_rms_norm", "swiglu", "dequant_matmul_int4_g128", "flash_prefill"):
        assert {(check, "pallas"), (check, "xla")} <= checks
    for r in rows:
        assert r["ms"] > 0 and r["max_abs_diff_vs_xla"] < 0.1, r  # bf16 outputs of size ~1
        assert (r["gb_per_s"] is None) == (r["check"] == "flash_prefill") == (r["tflop_per_s"] is not None)
    assert json.loads(out.read_text())["rows"] == rows
    assert "times mean nothing" in capsys.readouterr().out
