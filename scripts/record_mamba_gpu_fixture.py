"""Record mamba_ssm's Mamba2 on a CUDA GPU as a test fixture for our CPU port.

Builds ``mamba_ssm.Mamba2`` with fixed seeds for a few cases (ngroups 1 and 2; sequence lengths
a multiple and not a multiple of chunk_size), runs a float32 forward on the GPU, and saves the
weights, inputs and outputs to ``tests/fixtures/mamba2_gpu_parity.npz``. The test
``tests/test_mamba_engine.py::test_cpu_layer_matches_recorded_mamba_ssm_gpu_output`` then loads
each case into ``intelligence.mamba_engine.Mamba2`` on the CPU and compares (max-norm relative
error < 1e-3; Triton runs float32 dots in TF32 unless --ieee, see shared/reference/mamba2.md §6).

Needs an NVIDIA GPU, torch with CUDA and mamba_ssm (pip install mamba-ssm --no-build-isolation,
or the ``gpu`` extra of pyproject.toml). Nothing here runs on a CPU-only machine.

Usage:  python scripts/record_mamba_gpu_fixture.py [--out tests/fixtures/mamba2_gpu_parity.npz]
        [--ieee] [--fused-path {on,off}]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "mamba2_gpu_parity.npz"

# (name, constructor arguments, batch, length); chunk_size 64, so 256 is a multiple and 200 is not
CASES = [
    ("g1_multiple", {"d_model": 64, "d_state": 32, "headdim": 32, "ngroups": 1, "chunk_size": 64},
     2, 256),
    ("g1_ragged", {"d_model": 64, "d_state": 32, "headdim": 32, "ngroups": 1, "chunk_size": 64},
     2, 200),
    ("g2_multiple", {"d_model": 64, "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 64},
     2, 128),
    ("g2_ragged", {"d_model": 64, "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 64},
     3, 77),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--ieee", action="store_true",
                        help="set TRITON_F32_DEFAULT=ieee (strict float32 dots) before compiling")
    parser.add_argument("--fused-path", choices=("on", "off"), default="on",
                        help="mamba_ssm's use_mem_eff_path")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if args.ieee:
        os.environ["TRITON_F32_DEFAULT"] = "ieee"
    os.environ.setdefault("MAMBA_DETERMINISTIC", "1")      # one kernel config, short autotune

    import numpy as np
    import torch
    if not torch.cuda.is_available():
        print("record_mamba_gpu_fixture: no CUDA device; this script records mamba_ssm's GPU "
              "output and cannot run on a CPU-only machine", file=sys.stderr)
        return 2
    try:
        from mamba_ssm import Mamba2
    except ImportError as error:
        print(f"record_mamba_gpu_fixture: mamba_ssm is not importable ({error})", file=sys.stderr)
        return 2

    arrays, cases = {}, []
    for index, (name, config, batch, length) in enumerate(CASES):
        torch.manual_seed(args.seed + index)
        layer = Mamba2(**config, use_mem_eff_path=args.fused_path == "on", layer_idx=0,
                       device="cuda", dtype=torch.float32)
        with torch.no_grad():                  # non-trivial D and norm, as a trained layer has
            layer.D.normal_(1.0, 0.5)
            layer.norm.weight.normal_(1.0, 0.3)
        u = torch.randn(batch, length, config["d_model"], device="cuda", dtype=torch.float32)
        with torch.no_grad():
            y = layer(u)
        torch.cuda.synchronize()
        for key, value in layer.state_dict().items():
            arrays[f"{name}/param/{key}"] = value.detach().float().cpu().numpy()
        arrays[f"{name}/input"] = u.cpu().numpy()
        arrays[f"{name}/output"] = y.float().cpu().numpy()
        cases.append({"name": name, "config": config, "batch": batch, "length": length})
        print(f"{name}: {config}, u {tuple(u.shape)} → y {tuple(y.shape)}")

    import mamba_ssm
    arrays["cases"] = np.array(json.dumps(cases))
    arrays["meta"] = np.array(json.dumps({
        "mamba_ssm": getattr(mamba_ssm, "__version__", "?"), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(), "ieee": args.ieee,
        "use_mem_eff_path": args.fused_path == "on", "seed": args.seed}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.stem + ".partial.npz")
    np.savez(tmp, **arrays)
    tmp.replace(args.out)                      # nothing half-written is left as if complete
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
