"""`rivya-pipeline`: run, demo, dev, workers, emulator, report and retire.

Exit codes of `run`: 0 every brief stored, 1 any failed or timed out, 2 invalid input (nothing spent).
A stored video that failed a QC check is still stored (exit 0): `run` and `report` list it under their tables,
and their JSON carries it as `qc_failures`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bench import BENCHMARKS, SCALE_PROFILES
from .briefs import Brief, BriefErrors, load_briefs
from .settings import REPO_ROOT, UNBOUNDED_SPEND, Settings, SettingsError

if TYPE_CHECKING:
    from .defs.video_qc import QcFailure
    from .embedded import EmbeddedStack
    from .headless import BriefOutcome
    from .ledger import Ledger

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
DEMO_DIR = REPO_ROOT / ".demo"
DEFAULT_REPORT_PERIOD = "30d"
DEFAULT_RETENTION = "90d"
TABLE_WIDTH = 100_000  # wider than any row: rows are printed whole
DEV_SHUTDOWN_GRACE_SECONDS = 5.0


def _dagster_home() -> Path:
    """DAGSTER_HOME, or `.dagster_home` in the current folder (what `make dev` uses too)."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    from .instance_setup import write_default_config

    write_default_config(home)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _warn_if_spend_is_unbounded() -> None:
    if Settings.from_env().max_credits_per_day is None:
        print(f"Warning: {UNBOUNDED_SPEND}", file=sys.stderr)


def _cell(value: object) -> str:
    return "" if value is None else str(value)  # 0 credits is a figure, not a blank


def _print_table(rows: list[dict[str, object]], columns: Sequence[str]) -> None:
    """Plain columns, no borders (greppable, and the same on a terminal as in a file); a row is never wrapped or cut
    to the terminal's width: an S3 URI or an error is copied whole."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="ignore")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    Console(width=TABLE_WIDTH, highlight=False).print(table, crop=False, soft_wrap=True)


@contextmanager
def _progress_line(as_json: bool) -> Iterator[Callable[[Sequence[BriefOutcome]], None] | None]:
    """On a terminal (and not under --json), a live line on stderr of what a long `run` has done so far."""
    from rich.console import Console
    from rich.live import Live

    from .headless import progress_counts

    console = Console(stderr=True, highlight=False)
    if as_json or not console.is_terminal:
        yield None
        return
    started = time.monotonic()
    with Live("validating ...", console=console, refresh_per_second=4, transient=False) as live:

        def show(outcomes: Sequence[BriefOutcome]) -> None:
            counts = progress_counts(outcomes)
            elapsed = int(time.monotonic() - started)
            live.update(
                f"validated {counts['validated']} · submitted {counts['submitted']} · generating "
                f"{counts['generating']} · stored {counts['stored']} · failed {counts['failed']} · "
                f"{counts['credits']} credits · {elapsed // 60}m{elapsed % 60:02d}s"
            )

        yield show


def _print_qc_failures(failures: list[QcFailure]) -> None:
    """Under a command's table: the stored videos that failed QC, what was measured, and what to do about it."""
    if not failures:
        return
    videos = len({failure.brief_id for failure in failures})
    print(
        f"\n{len(failures)} QC check(s) failed on {videos} stored video(s). They are kept and paid for; "
        "bump `regenerate` in a brief to pay for a new video."
    )
    _print_table([asdict(failure) for failure in failures], ["brief_id", "check", "severity", "measured"])


def _load(requests: Path) -> list[Brief] | None:
    try:
        return load_briefs(requests)
    except BriefErrors as exc:
        print(f"Invalid briefs ({len(exc.errors)}); nothing was submitted:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return None


def _dry_run(briefs: list[Brief], as_json: bool) -> int:
    rows = [
        {
            "brief": b.id,
            "model": b.model,
            "references": len(b.references),
            "params": ",".join(f"{k}={v}" for k, v in b.request.params.items()),
            "credits": b.request.price_credits,
        }
        for b in briefs
    ]
    total = sum(b.request.price_credits for b in briefs)
    if as_json:
        print(json.dumps({"dry_run": True, "briefs": rows, "total_credits": total}, indent=2))
    else:
        _print_table(rows, ["brief", "model", "references", "credits", "params"])
        print(f"\nDry run: {len(briefs)} task(s) would cost {total} credits. Nothing was uploaded or submitted.")
    return EXIT_OK


def _execute(briefs: list[Brief], requests: Path, timeout: float, as_json: bool) -> int:
    from .headless import HeadlessRun
    from .instance_setup import open_instance

    home = _dagster_home()
    # The runs read each brief again from the folder the briefs were loaded from, whatever RIVYA_REQUESTS_PATH says.
    settings = replace(Settings.from_env(), requests_path=requests.resolve())
    with _progress_line(as_json) as on_progress:
        outcomes = HeadlessRun(settings=settings, instance=open_instance(home), on_progress=on_progress).run(
            briefs, timeout
        )
    if as_json:
        print(json.dumps({o.brief_id: asdict(o) for o in outcomes}, indent=2))
    else:
        _print_table(
            [asdict(o) for o in outcomes],
            ["brief_id", "status", "task_id", "final_credits", "refunded_credits", "s3_uri", "error"],
        )
        _print_qc_failures([failure for o in outcomes for failure in o.qc_failures])
    return EXIT_OK if all(o.succeeded for o in outcomes) else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    briefs = _load(args.requests)
    if briefs is None:
        return EXIT_INVALID
    if args.dry_run:
        return _dry_run(briefs, args.json)
    _warn_if_spend_is_unbounded()
    if os.environ.get("RIVYA_API_KEY"):
        return _execute(briefs, args.requests, args.timeout, args.json)
    if os.environ.get("RIVYA_BASE_URL"):
        print("RIVYA_BASE_URL is set but RIVYA_API_KEY is not: refusing to guess a key.", file=sys.stderr)
        return EXIT_INVALID
    from .embedded import EmbeddedStack

    print(
        "RIVYA_API_KEY is not set: using the embedded local emulator and S3 server (nothing is billed).",
        file=sys.stderr,
    )
    with EmbeddedStack(data_dir=DEMO_DIR):
        return _execute(briefs, args.requests, args.timeout, args.json)


def _embedded_stack(args: argparse.Namespace) -> EmbeddedStack:
    """The emulator and S3 server of `demo` and `dev`: by default the same ports and folder, so the same links."""
    from .embedded import DEFAULT_PORTS, EmbeddedStack

    chosen = {"api": args.api_port, "media": args.media_port, "s3": args.s3_port}
    ports = DEFAULT_PORTS | {name: port for name, port in chosen.items() if port is not None}
    return EmbeddedStack(data_dir=args.data_dir, ports=ports)


def cmd_demo(args: argparse.Namespace) -> int:
    for name in ("RIVYA_API_KEY", "RIVYA_BASE_URL", "AWS_ENDPOINT_URL_S3", "RIVYA_S3_BUCKET", "RIVYA_LEDGER_URL"):
        os.environ.pop(name, None)  # the demo never touches a real API or bucket
    requests = REPO_ROOT / "requests"
    briefs = _load(requests)
    if briefs is None:
        return EXIT_INVALID
    with _embedded_stack(args):
        code = _execute(briefs, requests, args.timeout, as_json=False)
    print(f"\nVideos are in the embedded S3 bucket, saved between sessions under {args.data_dir / 's3'}.")
    print("Open the Dagster UI on the same stack (instance, emulator, S3):  make dev")
    return code


def cmd_dev(args: argparse.Namespace) -> int:
    from .instance_setup import open_instance

    home = _dagster_home()
    _warn_if_spend_is_unbounded()
    open_instance(home).dispose()  # repairs a set-up a killed process left half done, before the UI and daemon start
    with _embedded_stack(args):
        # The workspace file names the code location `rivya_pipeline`, as plain `dagster dev` does: same UI links.
        command = [sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml")]
        command += ["-h", args.host, "-p", str(args.port)]
        print(f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home}); Ctrl-C stops everything.")
        # SIGTERM (kill, CI) stops it like Ctrl-C, so the bucket is saved. Setting SIGINT also undoes the "ignored"
        # SIGINT a background start inherits, which `dagster dev` would pass on to its own SIGTERM handling.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        process = subprocess.Popen(command, cwd=REPO_ROOT)
        try:
            return process.wait()
        except KeyboardInterrupt:
            try:
                return process.wait(timeout=DEV_SHUTDOWN_GRACE_SECONDS)  # Ctrl-C reached dagster dev too
            except subprocess.TimeoutExpired:
                process.terminate()  # only this process was signalled: stop dagster dev the same way
                return process.wait()


def cmd_report(args: argparse.Namespace) -> int:
    """Spend and the creates of unknown outcome from the ledger; QC failures from the check evaluations in the
    instance's event log (what the UI shows)."""
    from .defs.video_qc import qc_failures
    from .instance_setup import open_instance
    from .ledger import Ledger
    from .settings import utc_now

    settings = Settings.from_env()
    home = _dagster_home()
    ledger = Ledger(settings.ledger_url or Ledger.default_url(home))
    now = utc_now()  # one clock for both, so a create is an unknown outcome in both or in neither
    since = args.since(now)
    rows = ledger.spend_report(now, since)
    unknown = ledger.unknown_outcomes(now, since)
    not_stored = _videos_given_up(ledger, since)
    with open_instance(home) as instance:
        failures = qc_failures(instance, None if since is None else sorted({row["brief_id"] for row in rows}))
    if args.json:
        report = {
            "since": since.isoformat() if since else None,
            "spend": rows,
            "qc_failures": [asdict(f) for f in failures],
            "unknown_outcomes": unknown,
            "not_stored": not_stored,
        }
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"Since {since:%Y-%m-%d %H:%M} UTC (--since all: everything)" if since else "Since the first create")
        _print_table(rows, ["day", "brief_id", "tasks", "reserved", "final", "refunded"])
        _print_unknown_outcomes(unknown)
        _print_not_stored(not_stored)
        _print_qc_failures(failures)
    return EXIT_OK


def cmd_retire(args: argparse.Namespace) -> int:
    """Retire the partitions of briefs that left the folder and whose videos were stored `--after` days ago or more
    (retirement.py); with --dry-run, only say which."""
    from .instance_setup import open_instance
    from .ledger import Ledger
    from .retirement import plan_retirement, retire_partitions
    from .settings import utc_now

    settings = Settings.from_env()
    home = _dagster_home()
    ledger = Ledger(settings.ledger_url or Ledger.default_url(home))
    stored_before = utc_now() - args.after
    with open_instance(home) as instance:
        plan = plan_retirement(instance, ledger, args.requests, stored_before=stored_before)
        retired = 0 if args.dry_run else retire_partitions(instance, plan)
    rows = [asdict(r) for r in plan.retire]
    if args.json:
        answer = {"dry_run": args.dry_run, "retired": retired, "partitions": rows, "kept": plan.kept}
        print(json.dumps(answer, default=str))
        return EXIT_OK
    verb = "Would retire" if args.dry_run else "Retired"
    print(
        f"{verb} {len(plan.retire)} partition(s) of briefs gone from {args.requests} and stored before "
        f"{stored_before:%Y-%m-%d %H:%M} UTC; {plan.in_folder} partition(s) have their brief in the folder. Videos, "
        "sidecars, ledger rows and Dagster's history stay; a brief that comes back gets its partition again."
    )
    _print_table(rows, ["brief_id", "stored_at", "stored_uri", "task_id"])
    for reason, count in plan.kept.items():
        print(f"kept {count}: {reason}")
    return EXIT_OK


def _days(text: str) -> timedelta:
    """`retire --after`: a number of days, as 90d (or 90)."""
    digits = text.strip().lower().removesuffix("d")
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"must be a number of days, as 90d (got {text!r})")
    return timedelta(days=int(digits))


def _videos_given_up(ledger: Ledger, since: datetime | None = None) -> list[dict[str, Any]]:
    """Paid videos the store queue gave up on (window ran out, or the result refused), with what to do."""
    from .defs.storing import store_outlook

    return [
        {
            "brief_id": r.brief_id,
            "task_id": r.task_id,
            "store_attempts": r.store_attempts,
            "gave_up_at": r.store_gave_up_at,
            "last_error": r.store_error,
            "what_to_do": store_outlook(r),
        }
        for r in ledger.gave_up_storing(since=since)
    ]


def _print_not_stored(not_stored: list[dict[str, Any]]) -> None:
    if not_stored:
        print(f"\n{len(not_stored)} paid video(s) not stored: {not_stored[0]['what_to_do']}")
        _print_table(not_stored, ["gave_up_at", "brief_id", "task_id", "store_attempts", "last_error"])


def _print_unknown_outcomes(unknown: list[dict[str, Any]]) -> None:
    """Under the spend table of `report`: the creates that never got an answer and are past Rivya's idempotency
    window, which may or may not have been charged, and what to do about them."""
    if not unknown:
        return
    from .ledger import IDEMPOTENCY_WINDOW

    hours = IDEMPOTENCY_WINDOW // timedelta(hours=1)
    credits = sum(row["price_credits"] for row in unknown)
    print(
        f"\n{len(unknown)} create(s) never got an answer and were sent {hours} h ago or more, past Rivya's "
        f"idempotency window: unknown outcome, {credits} credits at most. Check Rivya's dashboard or "
        "GET /api/v1/credits for a charge; the pipeline will not re-send them (bump `regenerate` in a brief to pay "
        "for a new video)."
    )
    _print_table(unknown, ["submitted_at", "brief_id", "price_credits", "idempotency_key"])


def _since(text: str) -> Callable[[datetime], datetime | None]:
    """`--since`: when the report's period starts, given the report's clock (None: the whole history)."""
    text = text.strip().lower()
    if text == "all":
        return lambda now: None
    if text.endswith("d") and text[:-1].isdigit():
        days = int(text[:-1])
        return lambda now: now - timedelta(days=days)
    try:
        start = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of days (30d), a UTC date (2026-01-31) or all (got {text!r})"
        ) from None
    return lambda now: start


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _two_sizes(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts) or not 1 <= int(parts[0]) < int(parts[1]):
        raise argparse.ArgumentTypeError(f"must be two whole numbers, smaller first, as 1000,10000 (got {text!r})")
    return int(parts[0]), int(parts[1])


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.runner import run_benchmarks

    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    return run_benchmarks(
        names,
        quick=args.quick,
        as_json=args.json,
        transfer_mb=args.transfer_mb,
        scale_briefs=args.briefs,
        scale_profile=args.profile,
        growth_sizes=args.sizes,
    )


def cmd_workers(args: argparse.Namespace) -> int:
    from .embedded import DEFAULT_PORTS, stack_env
    from .workers import WorkerSetupError, run_workers

    _dagster_home()
    env = dict(os.environ)
    if not env.get("RIVYA_API_KEY"):
        if env.get("RIVYA_BASE_URL"):
            print("RIVYA_BASE_URL is set but RIVYA_API_KEY is not: refusing to guess a key.", file=sys.stderr)
            return EXIT_INVALID
        api, s3 = args.api_port or DEFAULT_PORTS["api"], args.s3_port or DEFAULT_PORTS["s3"]
        env |= stack_env(f"http://127.0.0.1:{api}", f"http://127.0.0.1:{s3}")
        note = f"the workers use the embedded stack of `rivya-pipeline dev` (ports {api}, {s3})"
        print(f"RIVYA_API_KEY is not set: {note}.", file=sys.stderr)
    try:
        return run_workers(env, args.count, args.concurrency)
    except WorkerSetupError as exc:
        print(f"No workers started: {exc}", file=sys.stderr)
        return EXIT_INVALID


def cmd_emulator(args: argparse.Namespace) -> int:
    from .emulator.cli import serve

    return serve(args.emulator_args)


def _add_stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-port", type=int, help="emulator API port (default 8787)")
    parser.add_argument("--media-port", type=int, help="emulator media host port (default 8788)")
    parser.add_argument("--s3-port", type=int, help="local S3 server port (default 8789)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEMO_DIR,
        help="where the local S3 bucket is kept between sessions "
        "(default: .demo/ in the repository, shared by demo and dev)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rivya-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="register briefs, submit, poll, store; headless (no daemon needed)")
    run.add_argument("--requests", type=Path, default=None, help="briefs folder (default: RIVYA_REQUESTS_PATH)")
    run.add_argument("--json", action="store_true", help="print one JSON object keyed by brief id")
    run.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for tasks (default 1800)")
    run.add_argument("--dry-run", action="store_true", help="validate and price the briefs; spend nothing")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="the sample briefs end to end on the embedded emulator + local S3")
    demo.add_argument("--timeout", type=float, default=300.0)
    _add_stack_options(demo)
    demo.set_defaults(func=cmd_demo)

    dev = sub.add_parser("dev", help="the Dagster UI + daemon on the embedded emulator + local S3")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=3000)
    _add_stack_options(dev)
    dev.set_defaults(func=cmd_dev)

    report = sub.add_parser("report", help="credits spent per day and brief, and the stored videos that failed QC")
    report.add_argument("--json", action="store_true")
    report.add_argument(
        "--since",
        type=_since,
        default=_since(DEFAULT_REPORT_PERIOD),
        help="the period: a number of days (30d), a UTC date (2026-01-31), or all (default: 30d). Spend, unknown "
        "outcomes and videos not stored of creates sent in it; QC failures of its briefs",
    )
    report.set_defaults(func=cmd_report)

    retire = sub.add_parser(
        "retire", help="retire the partitions of briefs that left the folder, long after their videos were stored"
    )
    retire.add_argument("--requests", type=Path, default=None, help="briefs folder (default: RIVYA_REQUESTS_PATH)")
    retire.add_argument(
        "--after",
        type=_days,
        default=_days(DEFAULT_RETENTION),
        help=f"how long after its video was stored a gone brief's partition is kept (default: {DEFAULT_RETENTION})",
    )
    retire.add_argument("--dry-run", action="store_true", help="say which partitions would be retired; change nothing")
    retire.add_argument("--json", action="store_true")
    retire.set_defaults(func=cmd_retire)

    workers = sub.add_parser(
        "workers", help="warm Celery workers that execute the runs of a CeleryRunLauncher instance (deploy/celery/)"
    )
    workers.add_argument("--count", type=_positive_int, default=2, help="worker processes (default 2)")
    workers.add_argument(
        "--concurrency", type=_positive_int, default=2, help="runs each worker executes at once (default 2)"
    )
    workers.add_argument("--api-port", type=int, help="without RIVYA_API_KEY: the emulator port of `dev` (8787)")
    workers.add_argument("--s3-port", type=int, help="without RIVYA_API_KEY: the S3 port of `dev` (8789)")
    workers.set_defaults(func=cmd_workers)

    bench = sub.add_parser("bench", help="the scale benchmarks, each against its baseline, on a local emulator + S3")
    bench.add_argument("benchmark", choices=[*BENCHMARKS, "all"])
    bench.add_argument("--json", action="store_true", help="print one JSON object keyed by benchmark name")
    bench.add_argument("--quick", action="store_true", help="a small, fast version (CI: they run, figures are sane)")
    bench.add_argument(
        "--transfer-mb", type=_positive_int, help="size of the transfer's video in MiB (default 1024, quick 64)"
    )
    bench.add_argument(
        "--briefs",
        type=_positive_int,
        help="scale, chaos: briefs in the folder (default 200; quick: scale 10, chaos 20)",
    )
    bench.add_argument(
        "--profile", choices=SCALE_PROFILES, help="scale: this profile only (default: every one that can run)"
    )
    bench.add_argument(
        "--sizes",
        type=_two_sizes,
        help="growth: the two sizes of history, in briefs, smaller first (default 1000,10000; quick 200,2000)",
    )
    bench.set_defaults(func=cmd_bench)

    # The emulator's options are its own parser's (emulator/cli.py): `parse_args` below hands them over unparsed,
    # --help included, so this module does not import the emulator's web stack for every other command.
    emulator = sub.add_parser(
        "emulator", help="run the local Rivya emulator (`rivya-pipeline emulator --help`)", add_help=False
    )
    emulator.set_defaults(func=cmd_emulator)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with everything after `emulator` passed on as `emulator_args` for the emulator to parse.

    argparse.REMAINDER does not do that: it leaves an option such as `--port` unclaimed, and argparse refuses it.
    """
    parser = build_parser()
    args, passed_on = parser.parse_known_args(argv)
    if args.command == "emulator":
        args.emulator_args = passed_on
    elif passed_on:
        parser.error(f"unrecognized arguments: {' '.join(passed_on)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if getattr(args, "requests", "unset") is None:
            args.requests = Settings.from_env().requests_path
        return args.func(args)
    except SettingsError as exc:
        print(f"Invalid setting: {exc}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
