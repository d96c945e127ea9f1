"""``unlearn-fast fuse``: merge several requests' layers into one, in closed form."""

from __future__ import annotations

import time

from ..errors import UnlearnFastError
from ..fusion.closed_form import DEFAULT_RHO, artifacts_in, fuse_artifacts
from .common import RHO_HELP


def add_parser(sub) -> None:
    p = sub.add_parser("fuse", help="merge the layers of several deletion requests into one, in closed form",
                       description="Fuse unlearning layers of several requests (same base model and layout) into "
                                   "one by least squares on each layer's stored Gram matrices: "
                                   "W = (ΣG_i + ρ)⁻¹ ΣG_i·W_i per linear map. The output can be fused again.")
    p.add_argument("--layers", nargs="+", metavar="DIR", help="artifact directories to fuse")
    p.add_argument("--merge_set", "--merge-set", dest="merge_set", metavar="FOLDER",
                   help="fuse every artifact directory inside FOLDER (the original EUL spelling)")
    p.add_argument("--merge", action="store_true", help="accepted for the original EUL spelling; fusing is implied")
    p.add_argument("--out", "--output_dir", dest="out", help="fused artifact directory to create (required)")
    p.add_argument("--rho", type=float, help=RHO_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an unlearn-fast artifact")


def run(args) -> int:
    if bool(args.layers) == bool(args.merge_set):
        raise UnlearnFastError("fuse needs either --layers DIR [DIR ...] or --merge_set FOLDER")
    if not args.out:
        raise UnlearnFastError("fuse needs --out DIR, the fused artifact directory to create")
    paths = args.layers or artifacts_in(args.merge_set)
    started = time.perf_counter()
    out = fuse_artifacts(paths, args.out, rho=DEFAULT_RHO if args.rho is None else args.rho,
                         overwrite=args.overwrite)
    print(f"fused {len(paths)} artifact(s) in {time.perf_counter() - started:.1f} s; written to {out}")
    return 0
