"""``unlearn-fast ledger``: the deletion requests of one base model (add, list, fuse, remove)."""

from __future__ import annotations

import json

from ..errors import UnlearnFastError
from ..fusion.closed_form import DEFAULT_RHO
from ..fusion.ledger import add_request, fuse_requests, list_requests, merged_path, remove_request
from .common import RHO_HELP


def add_parser(sub) -> None:
    p = sub.add_parser("ledger", help="deletion requests of one base model: add, list, fuse, remove (undo)",
                       description="A ledger directory keeps one artifact per deletion request and their fused "
                                   "layer (LEDGER/merged, attach it like any artifact). Removing a request "
                                   "re-fuses the others from their stored weights and Gram matrices.")
    actions = p.add_subparsers(dest="ledger_command", metavar="ACTION")
    a = actions.add_parser("add", help="register the artifact of one request (creates the ledger)")
    a.add_argument("ledger", help="ledger directory")
    a.add_argument("artifact", help="artifact directory written by 'unlearn'")
    a.add_argument("--name", help="a label to refer to the request by")
    a.add_argument("--fuse", action="store_true", help="fuse all requests afterwards")
    a.add_argument("--rho", type=float, help=RHO_HELP)
    a = actions.add_parser("list", help="show the requests and what the merged layer covers")
    a.add_argument("ledger", help="ledger directory")
    a.add_argument("request", nargs="?", help="show only this request (ledger id, name or request id)")
    a.add_argument("--json", action="store_true", help="print the records as JSON")
    a = actions.add_parser("fuse", help="fuse every request into LEDGER/merged")
    a.add_argument("ledger", help="ledger directory")
    a.add_argument("--rho", type=float, help=RHO_HELP)
    a = actions.add_parser("remove", help="undo a request: drop it and re-fuse the others")
    a.add_argument("ledger", help="ledger directory")
    a.add_argument("request", help="ledger id (r1, r2, ...), name or request id")
    a.add_argument("--rho", type=float, help="ridge for the re-fusion (default: the one the merged layer used)")


def run(args) -> int:
    """Run one ledger action; a failed file operation (a full disk, no permission) is one error line."""
    try:
        return _run(args)
    except OSError as err:
        raise UnlearnFastError(f"{err.filename or getattr(args, 'ledger', 'ledger')}: {err.strerror or err}") from None


def _run(args) -> int:
    rho = getattr(args, "rho", None)
    if args.ledger_command == "add":
        record = add_request(args.ledger, args.artifact, name=args.name)
        print(f"added {record['id']} (request {record['request']['id']}) to {args.ledger}")
        if args.fuse:
            print(f"fused layer: {fuse_requests(args.ledger, DEFAULT_RHO if rho is None else rho)}")
    elif args.ledger_command == "list":
        records = list_requests(args.ledger, args.request)
        if args.json:
            print(json.dumps(records, indent=2))
        for r in records if not args.json else []:
            forget = (r["request"].get("forget_set") or {}).get("count", "?")
            print(f"{r['id']:6} {r.get('name') or '':16} {r['added']:26} forget {forget!s:>5} examples  "
                  f"{r['request'].get('tokens') or '?'!s:>7} tokens  {'merged' if r['merged'] else 'not merged'}")
        if not records and not args.json:
            print("no requests")
    elif args.ledger_command == "fuse":
        print(f"fused layer: {fuse_requests(args.ledger, DEFAULT_RHO if rho is None else rho)}")
    elif args.ledger_command == "remove":
        record = remove_request(args.ledger, args.request, rho=rho)
        merged = merged_path(args.ledger)
        print(f"removed {record['id']}; " + (f"re-fused the remaining requests into {merged}" if merged
                                             else "no merged layer remains"))
    else:
        raise UnlearnFastError("ledger needs an action: add, list, fuse or remove (see unlearn-fast ledger --help)")
    return 0
