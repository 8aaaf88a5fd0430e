"""``fusepass kernel show``: print a generated kernel (the CLI owner wires add_cli_commands)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high}]")
        return value

    return parse


def add_cli_commands(subparsers) -> None:
    kernel = subparsers.add_parser("kernel", help="generated Triton kernels")
    sub = kernel.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the generated source of a kernel variant")
    show.add_argument("direction", choices=["fwd", "bwd"])
    show.add_argument("--pred", default="", help="mask predicate, e.g. 'j <= i + (N - M)'")
    show.add_argument("--head-dim", type=_int_in(1, 4096), default=64)
    show.add_argument("--v-head-dim", type=_int_in(1, 4096), default=None)
    show.add_argument("--biases", type=_int_in(0, 8), default=0)
    show.add_argument("--bias-grad", default="", help="comma list per bias: store, atomic, atomic_m, ...")
    show.add_argument("--masks", type=_int_in(0, 8), default=0)
    show.add_argument("--softcap", action="store_true")
    show.add_argument("--dropout", action="store_true")
    show.add_argument("--finite-fill", action="store_true")
    show.add_argument("--precision", default="", choices=["", "tf32", "ieee"])
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    from .render import show

    grads = tuple(g.strip() for g in args.bias_grad.split(",")) if args.bias_grad else ()
    # The CLI prints by design: this is the command's output, not logging.
    print(show(
        args.direction, pred=args.pred, head_dim=args.head_dim,
        v_head_dim=args.v_head_dim or args.head_dim, n_biases=args.biases, bias_grad=grads,
        n_masks=args.masks, softcap=args.softcap, dropout=args.dropout, finite_fill=args.finite_fill,
        precision=args.precision,
    ))
    return 0
