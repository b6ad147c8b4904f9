"""Command line: ``gateway serve``, ``send``, ``echo``, ``resend``, ``check``, ``purge``, ``token``, ``config``;
the system of record's ``db``, ``studies`` and ``study`` are in ``cli_studies``."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gateway import cli_studies
from gateway.config.settings import Peer, Settings, load_settings
from gateway.core.errors import ConfigError, GatewayError
from gateway.core.logs import configure_logging

DESCRIPTION = """\
DICOM AI inference gateway.

Receives studies from PACS over DICOM (C-STORE), stores every instance durably, waits until a study is
complete, routes each series to an AI pipeline on NVIDIA Triton, and sends the results back into the same
study as DICOM SR (TID 1500) and GSPS overlays, flagging critical studies STAT.

The reference models shipped in model_repository/ exercise the pipeline; they are NOT clinically validated.
"""

EPILOG = """\
examples:
  gateway serve                                  # local Triton, listen on 127.0.0.1:11112 as AI_GATEWAY
  gateway serve --config site.toml --destination PACS@127.0.0.1:4242
  gateway send study/ --to AI_GATEWAY@127.0.0.1:11112
  gateway echo AI_GATEWAY@127.0.0.1:11112
  gateway resend --config site.toml               # re-queue deliveries from the dead-letter area
  gateway purge --config site.toml --dry-run      # what retention would remove now
  gateway check /media/new-scanner/ --config site.toml  # onboarding: what would run, be repaired, fail
  gateway token --role operator --name ops         # bearer token for the HTTP admin endpoints
  gateway studies --priority STAT --since today    # the system of record: studies, states, waits
  gateway study 1.2.826.0.1.3680043.8.498.1        # one study's timeline
"""


STOP_POLL_S = 0.2  # how often `serve` looks for a stop signal


def _peer(text: str) -> Peer:
    try:
        return Peer.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tls_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DICOM TLS", "use TLS when --tls-ca is given")
    group.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="CA certificate that signed the receiver's certificate"
    )
    group.add_argument("--tls-cert", type=Path, metavar="PEM", help="our client certificate (mutual TLS)")
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="the key of --tls-cert")


def _client_tls(args: argparse.Namespace) -> Any:
    if args.tls_ca is None:
        if args.tls_cert is not None:
            raise ConfigError("--tls-cert needs --tls-ca")
        return None
    from clients.dicom_scu import client_tls_context

    return client_tls_context(args.tls_ca, args.tls_cert, args.tls_key)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the gateway: DICOM receiver, AI pipelines and result delivery",
        description="Run the gateway until interrupted (Ctrl-C or SIGTERM). Settings come from the embedded "
        "defaults, then --config FILE, then these flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML settings file (see gateway/config/default_config.toml)",
    )
    serve.add_argument("--port", type=int, help="DICOM port to listen on (default from config: 11112)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--ae-title", help="the gateway's AE title (default AI_GATEWAY)")
    serve.add_argument(
        "--destination",
        type=_peer,
        metavar="AET@HOST:PORT",
        help="send results here instead of back to the sending PACS",
    )
    serve.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="spool, results, audit log and Triton work files"
    )
    serve.add_argument(
        "--triton-url",
        metavar="HOST:PORT",
        help="gRPC endpoint of a running Triton; without it a local one is started",
    )
    serve.add_argument(
        "--allow", action="append", metavar="AET", help="calling AE title allowed to send (repeatable)"
    )
    serve.add_argument(
        "--quiet-period", type=float, metavar="SECONDS", help="idle time after which a study is complete"
    )
    serve.add_argument(
        "--stat-webhook", metavar="URL", help="HTTP endpoint that receives a JSON POST per STAT study"
    )
    serve.add_argument(
        "--force-cpu", action="store_true", default=None, help="use numpy even if a CUDA GPU is present"
    )
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity")

    send = sub.add_parser(
        "send",
        help="send DICOM files or folders to a DICOM node (C-STORE) with a progress bar",
        description="C-STORE files (folders are searched recursively) to AET@HOST:PORT.",
    )
    send.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders")
    send.add_argument("--to", required=True, type=_peer, metavar="AET@HOST:PORT", help="receiving DICOM node")
    send.add_argument(
        "--calling-ae", default="GATEWAY_SCU", help="our AE title (must be allowed by the receiver)"
    )
    send.add_argument("--timeout", type=float, default=30.0, help="network and DIMSE timeout in seconds")
    _tls_arguments(send)

    echo = sub.add_parser(
        "echo", help="check that a DICOM node answers (C-ECHO)", description="Send a C-ECHO."
    )
    echo.add_argument("peer", type=_peer, metavar="AET@HOST:PORT")
    echo.add_argument("--calling-ae", default="GATEWAY_SCU")
    _tls_arguments(echo)

    resend = sub.add_parser(
        "resend",
        help="move failed deliveries from the dead-letter area back to their queue",
        description="Dead-letter jobs are result deliveries that failed max_attempts times. A running gateway picks "
        "re-queued jobs up within a second; otherwise they go out at the next start.",
    )
    resend.add_argument("--config", type=Path, metavar="FILE", help="settings file (for data_dir)")
    resend.add_argument("--data-dir", type=Path, metavar="DIR", help="the gateway's data directory")
    resend.add_argument(
        "--job", action="append", metavar="ID", help="job id to re-send (repeatable); default: all"
    )
    resend.add_argument("--list", action="store_true", help="only list the dead-letter jobs")

    check = sub.add_parser(
        "check",
        help="dry run on files: which pipeline would run, what would be repaired, whether it all decodes",
        description="For each series in PATH (files or folders): the pipeline that would analyse it and the rule "
        "that chose it (or why none applies), the header attributes hygiene would repair or drop, instances that "
        "would not decode, and whether the analysis would fail. Needs no Triton and sends nothing. Exit status: 0 "
        "when every routed series would be analysed, 1 when a series would fail or a file would be refused.",
    )
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders")
    check.add_argument("--config", type=Path, metavar="FILE", help="settings file (its [[pipelines]] route)")

    purge = sub.add_parser(
        "purge",
        help="remove data past its retention time ([retention] settings); --dry-run only lists it",
        description="Removes dead letters, spooled images, result files and audit lines past their retention "
        "time, then, while the data disk has less than retention.min_free_disk_mb free, the oldest delivered "
        "studies. Studies not yet analysed or not yet delivered are never removed. A running gateway purges by "
        "itself every retention.interval_s; this command is for a stopped gateway or an immediate purge.",
    )
    purge.add_argument("--config", type=Path, metavar="FILE", help="settings file")
    purge.add_argument("--data-dir", type=Path, metavar="DIR", help="the gateway's data directory")
    purge.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    purge.add_argument("--verbose", action="store_true", help="list every item, not only the totals")

    token = sub.add_parser(
        "token",
        help="create a bearer token for the HTTP admin endpoints",
        description="Prints a new random token (give it to the client) and the [[http.tokens]] lines to add to the "
        "settings file. Only the token's SHA-256 is stored.",
    )
    token.add_argument(
        "--role",
        choices=["read-only", "operator", "admin", "sender"],
        required=True,
        help="read-only < operator < admin for the API; sender: may only store instances by STOW-RS",
    )
    token.add_argument("--name", default="token", help="a label for the token holder")
    token.add_argument(
        "--ae-title",
        default="",
        help="sender only: the AE title its instances are recorded under (its [[peers]] entry gets the results)",
    )

    config = sub.add_parser(
        "config",
        help="print the effective settings and exit",
        description="Load and validate settings, print them.",
    )
    config.add_argument("--config", type=Path, metavar="FILE")
    demo = sub.add_parser(
        "demo",
        help="send one synthetic study per reference pipeline to the running gateway and show the results",
        description="The first five minutes: a head CT with a bleed, a chest CT with two nodules and a chest "
        "radiograph with an opacity (synthetic phantoms, no patient data) are sent to the gateway that runs "
        "with the same settings; the demo waits for the analyses, prints each study's findings and writes a "
        "PNG of each key image with the AI's boxes under <data_dir>/demo/.",
        epilog="example (in a second terminal, after `make run`):\n  gateway demo\n"
        "  gateway demo --config site.toml --calling-ae DEMO",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--config", type=Path, metavar="FILE", help="the running gateway's settings file")
    demo.add_argument("--calling-ae", default="DEMO", help="the AE title the demo sends as (default DEMO)")
    demo.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="how long to wait (default 300)"
    )
    demo.add_argument("--out", type=Path, metavar="DIR", help="where the synthetic studies are written")
    cli_studies.add_parsers(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"receiver": {}, "triton": {}, "delivery": {}}
    if args.port is not None:
        out["receiver"]["port"] = args.port
    if args.host is not None:
        out["receiver"]["host"] = args.host
    if args.ae_title is not None:
        out["receiver"]["ae_title"] = args.ae_title
    if args.allow:
        out["receiver"]["allowed_calling_aes"] = args.allow
    if args.destination is not None:
        out["delivery"]["destination"] = str(args.destination)
    if args.triton_url is not None:
        out["triton"]["url"] = args.triton_url
    if args.data_dir is not None:
        out["data_dir"] = str(args.data_dir.resolve())
    if args.quiet_period is not None:
        out["quiet_period_s"] = args.quiet_period
    if args.stat_webhook is not None:
        out["stat_webhook_url"] = args.stat_webhook
    if args.force_cpu:
        out["force_cpu"] = True
    if args.log_level is not None:
        out["log_level"] = args.log_level
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import Gateway

    settings = load_settings(args.config, _overrides(args))
    configure_logging(settings.log_level)
    # The handler only records the signal and the main thread looks every STOP_POLL_S. Waiting on a
    # threading.Event instead hung for good now and then: the kernel may deliver SIGTERM to another thread, the
    # main thread stays blocked in the Event's lock, never returns to the interpreter, and the Python handler that
    # would set the Event never runs (seen with gdb on a gateway that ignored SIGTERM right after start-up).
    requested: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: requested.append(signum))
    gateway = Gateway(settings).start()
    try:
        recv = settings.receiver
        print(
            f"\nGateway {recv.ae_title} listening on {recv.host}:{gateway.port} (Triton at {gateway.triton_url}).\n"
            f"Data directory: {settings.data_dir}\n"
            f"Send a study:   .venv/bin/gateway send PATH --to {recv.ae_title}@{recv.host}:{gateway.port}\n"
            f"           or:  storescu -aec {recv.ae_title} {recv.host} {gateway.port} FILE...\n"
            + (
                f"Health:         http://{settings.http.host}:{gateway.api.port}/health (metrics: /metrics)\n"
                if gateway.api
                else ""
            )
            + "Stop with Ctrl-C.\n",
            flush=True,
        )
        while not requested:
            time.sleep(STOP_POLL_S)
    finally:
        gateway.stop()
    return 0


def _collect(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path} does not exist")
    return files


def cmd_send(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from clients.dicom_scu import store_files

    configure_logging("WARNING")
    files = _collect(args.paths)
    if not files:
        print("nothing to send", file=sys.stderr)
        return 1
    with tqdm(total=len(files), unit="img", desc=f"C-STORE to {args.to.ae_title}") as bar:
        report = store_files(
            files,
            args.to,
            calling_ae=args.calling_ae,
            timeout_s=args.timeout,
            on_progress=bar,
            ssl_context=_client_tls(args),
        )
    print(f"sent {report.sent} of {len(files)} instance(s) to {args.to}")
    for name, reason in report.failed[:20]:
        print(f"  failed: {name}: {reason}", file=sys.stderr)
    return 0 if report.ok else 2


def cmd_echo(args: argparse.Namespace) -> int:
    from clients.dicom_scu import echo

    configure_logging("WARNING")
    ok = echo(args.peer, calling_ae=args.calling_ae, ssl_context=_client_tls(args))
    print(f"C-ECHO {args.peer}: {'success' if ok else 'FAILED'}")
    return 0 if ok else 2


def cmd_resend(args: argparse.Namespace) -> int:
    from gateway.delivery.outbox import Outbox

    overrides: dict[str, Any] = {"data_dir": str(args.data_dir.resolve())} if args.data_dir else {}
    settings = load_settings(args.config, overrides)
    outbox = Outbox(settings.outbox_dir, settings.delivery, calling_ae=settings.receiver.ae_title)
    dead = outbox.dead_letters()
    if args.list:
        for job in dead:
            print(
                f"{job.job_id}  {job.destination}  {len(job.paths)} object(s)  tries={job.attempts}  {job.last_error[:80]}"
            )
        print(f"{len(dead)} job(s) in the dead-letter area")
        return 0
    moved = outbox.resend(args.job)
    print(f"re-queued {len(moved)} of {len(dead)} dead-letter job(s)")
    missing = sorted(set(args.job or []) - set(moved))
    for job_id in missing:
        print(f"  not found: {job_id}", file=sys.stderr)
    return 0 if not missing else 2


def cmd_check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gateway.check import check_files, render

    configure_logging("ERROR")
    settings = load_settings(args.config)
    files = _collect(args.paths)
    if not files:
        print("no files found", file=sys.stderr)
        return 1
    with tqdm(total=len(files), unit="file", desc="reading headers", file=sys.stderr) as bar:
        report = check_files(files, settings, on_progress=bar.update)
    print(render(report))
    return 0 if report.ok else 1


def cmd_purge(args: argparse.Namespace) -> int:
    from gateway.ops import retention

    overrides: dict[str, Any] = {"data_dir": str(args.data_dir.resolve())} if args.data_dir else {}
    settings = load_settings(args.config, overrides)
    plan = retention.plan(settings)
    if args.verbose or args.dry_run:
        for item in plan.items:
            print(
                f"{item.kind:12} {item.name:64} {item.size_bytes / 2**20:9.1f} MiB "
                f"{item.age_days:7.1f} days  ({item.reason})"
            )
    verb = "would remove" if args.dry_run else "removed"
    totals = plan.totals()
    if args.dry_run:
        removed = {kind: count for kind, (count, _) in totals.items()}
        if plan.audit_lines:
            removed["audit"] = plan.audit_lines
    else:
        removed = retention.execute(settings, plan)
    labels = {
        "dead_letter": "dead-letter job(s)",
        "spool": "spooled study(ies)",
        "results": "result folder(s)",
    }
    for kind in ("dead_letter", "spool", "results"):
        size = totals.get(kind, (0, 0))[1]
        print(f"{verb} {removed.get(kind, 0)} {labels[kind]} ({size / 2**20:.1f} MiB)")
    print(f"{verb} {removed.get('audit', 0)} audit line(s) older than {settings.retention.audit_days:g} days")
    print(
        f"kept {plan.kept_unanalysed} study(ies) not yet analysed and {plan.kept_undelivered} not yet delivered; "
        f"{plan.free_bytes / 2**20:.0f} MiB free"
        + (f" (target {plan.target_free_bytes / 2**20:.0f} MiB)" if plan.target_free_bytes else "")
    )
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    import secrets

    from gateway.ops.http_api import hash_token

    value = secrets.token_urlsafe(32)
    print(f"token (give to the client, shown once): {value}\n")
    print("add to the settings file:\n")
    ae_title = f'ae_title = "{args.ae_title}"\n' if args.ae_title else ""
    print(
        f'[[http.tokens]]\nname = "{args.name}"\nrole = "{args.role}"\n{ae_title}sha256 = "{hash_token(value)}"'
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    settings: Settings = load_settings(args.config)
    print(f"data_dir          {settings.data_dir}")
    print(f"receiver          {settings.receiver.ae_title}@{settings.receiver.host}:{settings.receiver.port}")
    print(f"allowed AEs       {', '.join(sorted(settings.allowed_calling_aes())) or '(any)'}")
    print(f"triton            {settings.triton.url or 'local server from the nvidia-pytriton wheel'}")
    print(f"model repository  {settings.triton.model_repository}")
    print(f"destination       {settings.delivery.destination or 'the sending peer'}")
    for p in settings.pipelines:
        print(
            f"pipeline          {p.name}: model {p.model}, mode {p.mode.value}, modalities {','.join(p.route.modalities)}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from gateway.demo.run import FINISHED, run_demo

    configure_logging("WARNING")
    settings = load_settings(args.config)
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as scratch:
        studies = run_demo(
            settings, args.out or Path(scratch), calling_ae=args.calling_ae, timeout_s=args.timeout
        )
    return 0 if all(s.state in FINISHED for s in studies) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "serve": cmd_serve,
        "send": cmd_send,
        "echo": cmd_echo,
        "resend": cmd_resend,
        "purge": cmd_purge,
        "check": cmd_check,
        "token": cmd_token,
        "config": cmd_config,
        "demo": cmd_demo,
        **cli_studies.HANDLERS,
    }
    try:
        return handlers[args.command](args)
    except GatewayError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
