"""`egress-sidecar` command line: run, check-config, print-default-config, suggest-policy, inject, lock."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import sidecar
from sidecar import config as config_module
from sidecar import preflight


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egress-sidecar", description=__doc__)
    parser.add_argument("--version", action="version", version=f"egress-sidecar {sidecar.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start the sidecar (data and admin listeners)")
    run.add_argument("--config", metavar="FILE", help="YAML config file (default: the embedded defaults)")

    check = commands.add_parser("check-config", help="validate a config file without starting")
    check.add_argument("file", metavar="FILE")

    commands.add_parser("print-default-config", help="print the embedded, documented default config")

    suggest = commands.add_parser(
        "suggest-policy", help="print an allow-list (a policy: block) from what sidecars saw",
        description="Merge egress inventories and print a commented YAML policy: block for review.")
    suggest.add_argument("sources", nargs="*", metavar="SOURCE",
                         help="admin URL of a running sidecar (http://host:15090) or a saved /destinations JSON file")
    suggest.add_argument("--prometheus", metavar="URL", help="also read the fleet's destinations from Prometheus")
    suggest.add_argument("--window", default="7d", help="Prometheus range to look over (default 7d)")
    suggest.add_argument("--collapse", type=int, default=0, metavar="N",
                         help="replace N or more names under one parent domain by *.parent (never a public suffix)")

    inject = commands.add_parser("inject", help="serve the mutating admission webhook over TLS")
    inject.add_argument("--cert", required=True, metavar="FILE")
    inject.add_argument("--key", required=True, metavar="FILE")
    inject.add_argument("--host", default="0.0.0.0")
    inject.add_argument("--port", type=int, default=8443)
    inject.add_argument("--settings", metavar="FILE", help="injector settings (YAML): image, defaults")

    lock = commands.add_parser("lock", help="install the egress lock's packet rules (init container, NET_ADMIN)")
    lock.add_argument("--config", metavar="FILE", help="the sidecar's config file (transparent port, lock holes)")
    lock.add_argument("--uid", type=int, default=65532, help="the sidecar's UID, whose traffic is left alone")
    lock.add_argument("--backend", choices=("auto", "nft", "iptables"), default="auto")
    lock.add_argument("--resolv-conf", default="/etc/resolv.conf", metavar="FILE",
                      help="DNS to these nameservers stays allowed")
    lock.add_argument("--dry-run", action="store_true", help="print the rules, install nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the sidecar's own handlers are installed (imports, TLS)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        try:
            config = preflight.load_checked(args.file)  # exactly what `run` checks before it starts
        except config_module.ConfigError as exc:
            print(f"egress-sidecar: {exc}", file=sys.stderr)
            return 2
        print(f"{args.file}: ok (sha256 {config_module.config_sha256(config)})")
        return 0
    if args.command == "print-default-config":
        sys.stdout.write(config_module.embedded_default_text())
        return 0
    if args.command == "suggest-policy":
        if not args.sources and args.prometheus is None:
            print("egress-sidecar: suggest-policy needs a SOURCE or --prometheus URL", file=sys.stderr)
            return 2
        from sidecar.policy.suggest import suggest as suggest_policy

        try:
            sys.stdout.write(suggest_policy(args.sources, args.prometheus, args.window, args.collapse))
        except Exception as exc:  # noqa: BLE001 - e.g. an unreachable sidecar: one line, no traceback
            print(f"egress-sidecar: suggest-policy: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "inject":
        from sidecar.inject.server import serve  # the webhook is not loaded by the data plane

        return serve(cert=args.cert, key=args.key, host=args.host, port=args.port, settings=args.settings)
    if args.command == "lock":
        from sidecar.lock.install import LockOptions
        from sidecar.lock.install import main as lock_main

        try:
            config = config_module.load(args.config)
        except config_module.ConfigError as exc:
            print(f"egress-sidecar: {exc}", file=sys.stderr)
            return 2
        return lock_main(config, LockOptions(args.uid, args.backend, args.resolv_conf, args.dry_run))
    try:
        config = preflight.load_checked(args.config)
    except config_module.ConfigError as exc:
        print(f"egress-sidecar: {exc}", file=sys.stderr)
        return 2
    from sidecar.upstream.tls import TLSContexts

    # Load the pools' CA bundles in a thread while the server's modules import (sidecar.upstream.tls).
    contexts = TLSContexts.start(config)
    from sidecar.server import run

    try:
        return run(config, contexts, args.config)
    except config_module.ConfigError as exc:  # e.g. a route's secret file cannot be read
        print(f"egress-sidecar: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
