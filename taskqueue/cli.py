"""Command-line subcommands owned by the `taskqueue` package: ``covid-cxr requeue``."""

from __future__ import annotations

import argparse
from collections import Counter

from covid_cxr.commandline import Subparsers, settings_from_args
from covid_cxr.safe_output import printable
from covid_cxr.timespec import moment_argument

#: Ids listed in full at most; more are counted.
_SHOWN_IDS = 20


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``requeue``; `common` is the parent parser with the installation flags."""
    from taskqueue.requeue import REQUEUE_STATES

    requeue = subparsers.add_parser(
        "requeue", parents=[common], help="send failed (or stuck) instances through inference again",
        description="Select instances by state, reason code and time, and send them to the inference queue "
                    "again. Failed instances start afresh (state received, attempts 0, error cleared); queued "
                    "or received ones are sent again as they are (the worker skips what is predicted meanwhile). "
                    "A broker that is down leaves them received: the reconciliation loop sends them later.")
    requeue.add_argument("--state", choices=REQUEUE_STATES, default="failed", help="instances in this state "
                         "(default failed)")
    requeue.add_argument("--reason", metavar="CODE", help="only this reason code (e.g. no_active_model)")
    requeue.add_argument("--since", metavar="T", type=moment_argument,
                         help="only instances changed (for failed ones: failed) at or after T: a duration back "
                              "from now (2h, 30d) or an ISO 8601 time (2026-11-25T10:00, UTC unless it says)")
    requeue.add_argument("--dry-run", action="store_true", help="show what would be sent, change nothing")
    requeue.set_defaults(func=_requeue)


def _requeue(args: argparse.Namespace) -> int:
    from db.migrate import check_schema
    from taskqueue.requeue import requeue, select_instances

    settings = settings_from_args(args)
    check_schema(settings)
    plan = select_instances(settings, state=args.state, reason=args.reason, since=args.since)
    print(f"selected     {len(plan.ids)} {args.state} instance(s){_reasons(plan.reasons)}")
    if plan.ids:
        shown = ", ".join(str(i) for i in plan.ids[:_SHOWN_IDS])
        more = f" and {len(plan.ids) - _SHOWN_IDS} more" if len(plan.ids) > _SHOWN_IDS else ""
        print(f"instances    {shown}{more}")
    if args.dry_run:
        print("dry run      nothing changed")
        return 0
    if not plan.ids:
        return 0
    result = requeue(settings, plan)
    if args.state == "failed":
        print(f"reset        {result.reset} to received (attempts 0, error cleared)")
    batches = -(-result.sent // settings.batch_size)
    print(f"sent         {result.sent} in {batches} batch(es) to queue {printable(settings.inference_queue)}")
    unsent = (result.reset if args.state == "failed" else len(plan.ids)) - result.sent
    if unsent > 0:
        print(f"not sent     {unsent}: the broker refused; they stay received and the reconciliation loop "
              f"sends them")
    return 0


def _reasons(reasons: Counter[str | None]) -> str:
    if not reasons:
        return ""
    return " (" + ", ".join(f"{printable(reason or 'no reason')} {n}" for reason, n in reasons.most_common()) + ")"
