"""Smoke test of an installed tonno_fast, run by `make sdist-smoke` (not collected by pytest).

`make sdist-smoke` builds the sdist, pip-installs it into a fresh venv and runs this file with that venv's
python from outside the source tree (`python -I`, so neither the working directory nor the script's folder is
on sys.path). Checks: the package and its compiled extension come from the venv's site-packages, the build
record names the running torch, `backends()["cpu"] == "available"`, the `tonno-fast` command starts, and a
small float64 heatmap computed with the compiled CPU kernels equals the reference backend's.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

import tonno_fast

site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert Path(tonno_fast.__file__).resolve().is_relative_to(site), f"tonno_fast imported from {tonno_fast.__file__}"

avail = tonno_fast.backends()
print("backends():", json.dumps(avail, indent=1))
assert avail["reference"] == "available", avail
assert avail["cpu"] == "available", f"compiled CPU kernels unavailable: {avail['cpu']}"
so = Path(sys.modules["tonno_fast._C"].__file__).resolve()  # loaded by backends() above
assert so.is_relative_to(site), f"tonno_fast._C loaded from {so}"
record = json.loads((so.parent / "_C.build.json").read_text())
assert record["torch_version"] == torch.__version__, (record, torch.__version__)
print("build record:", json.dumps(record, sort_keys=True))

cli = Path(sys.executable).with_name("tonno-fast")
out = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=300)
assert out.returncode == 0 and "heatmap" in out.stdout, (out.returncode, out.stdout[-500:], out.stderr[-2000:])

g = torch.Generator().manual_seed(0)
volume = torch.rand(20, 18, 16, dtype=torch.float64, generator=g)


def encoder(slices):
    """(M, 1, h, w) slices -> (M,) plane sums (the encoder whose heatmap reconstructs the volume)."""
    return slices.flatten(1).sum(1)


kw = dict(n_directions=12, spacing=(1.5, 1.0, 1.0), slice_size=24)
heat_cpu = tonno_fast.tomographic_heatmap(volume, encoder, backend="cpu", **kw)
heat_ref = tonno_fast.tomographic_heatmap(volume, encoder, backend="reference", **kw)
assert heat_cpu.shape == volume.shape and heat_cpu.dtype == torch.float64, (heat_cpu.shape, heat_cpu.dtype)
torch.testing.assert_close(heat_cpu, heat_ref, rtol=1e-9, atol=1e-9 * float(heat_ref.abs().max()))
print(f"smoke test passed: tonno_fast {tonno_fast.__version__} from {site}, torch {torch.__version__}, "
      f"heatmap {tuple(heat_cpu.shape)} cpu == reference (max |diff| {float((heat_cpu - heat_ref).abs().max()):.2e}), "
      f"{os.cpu_count()} cpus")
