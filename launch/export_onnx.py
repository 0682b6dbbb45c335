"""Export a trained MIP model's evaluation forward (test features) to ONNX, checked against PyTorch with onnxruntime.

    python launch/export_onnx.py runs/x/model_best.pt model.onnx [--opset 18] [--flip | --no-flip] [--no-check] [--debug]

MODEL is an exported model file (model_best.pt / model_final.pt, its .sha256 sidecar checked where present) or
the MIP authors' checkpoint. The graph takes `image` float32 [batch, 3, H, W] normalised as the evaluation
transform does, `modality` int64 [batch] (0 infrared, 1 visible; only with modality prompts) and `camera` int64
[batch] (the dataset's camera number minus 1; only with SIE camera embeddings), and returns `features` float32
[batch, D], L2-normalised; the command prints them for the model at hand. Flip averaging is in the graph when the
model's config has eval.flip on (--flip / --no-flip decide otherwise). Unless --no-check, onnxruntime must
match PyTorch to 1e-4 relative (max over rows of ||onnx - torch|| / ||torch||) at two batch sizes, or no file
is written. OUT is never overwritten; `OUT.sha256` is written beside it. Errors: one `error:` line, exit 2;
the traceback only with --debug or MIP_DEBUG=1.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from mip_dist.cli import debug_requested, report_error


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from mip_dist.inference.onnx_export import DEFAULT_OPSET, MIN_OPSET

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="exported model file (model_best.pt / model_final.pt) or the authors' checkpoint")
    p.add_argument("out", help="ONNX file to write (must not exist); OUT.sha256 is written beside it")
    p.add_argument("--config", default=None, help="with the authors' checkpoint: a config file giving what its "
                                                 "tensors cannot tell (e.g. configs/mip_vitb16_sysu_release.yaml)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} or newer (default {DEFAULT_OPSET}: the dynamo exporter's own; "
                        f"{MIN_OPSET} uses the TorchScript exporter)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the horizontally flipped image inside the graph (default: the model "
                        "config's eval.flip)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the onnxruntime vs PyTorch comparison")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also MIP_DEBUG=1)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from mip_dist.inference.onnx_export import check_destination, export_onnx

    check_destination(args.out, args.opset)  # before anything is read or printed
    print(f"exporting {args.model} to {args.out} (opset {args.opset})", flush=True)
    r = export_onnx(args.model, args.out, opset=args.opset, check=args.check, flip=args.flip,
                    release_config=args.config)
    print(f"model: {r.layout} layout, sha256 {r.model_sha256[:16]}... (recorded in the ONNX metadata)")
    print("graph inputs:")
    for i in r.inputs:
        print(f"  {i.describe()}")
    print("graph output:")
    print(f"  {'features':<9} {'float32':<7} [batch, {r.feature_dim}]  L2-normalised test feature")
    print("flip averaging: " + ("in the graph (features of the image and its mirror, averaged, re-normalised)"
                                if r.flip else "not in the graph"))
    if r.check is None:
        print("check: skipped (--no-check)")
    else:
        c = r.check
        print(f"check: onnxruntime vs PyTorch at batch sizes {', '.join(str(b) for b in c['batch_sizes'])}: "
              f"max relative error {c['max_rel_err']:.2e} <= {c['tolerance']:g} (per row ||onnx - torch|| / "
              f"||torch||): passed")
    size_mb = r.path.stat().st_size / 2**20
    print(f"wrote {r.path} ({size_mb:.1f} MiB, {r.exporter} exporter, opset {r.opset}, {r.seconds:.1f}s) "
          f"and {r.path.name}.sha256")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: 0 on success, 2 with a one-line message for any error (traceback with --debug)."""
    args = parse_args(argv)
    try:
        return run(args)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
        from mip_dist.config import ConfigError
        from mip_dist.engine.safe_load import CheckpointError
        from mip_dist.inference.onnx_export import OnnxExportError

        return report_error(exc, debug_requested(args.debug), known=(OnnxExportError, CheckpointError, ConfigError))


if __name__ == "__main__":
    sys.exit(main())
