"""`agw`: the operator's command line. Each subcommand is a thin layer over a library call; `main()` returns an
exit code (0 ok, 1 operation failed, 2 bad usage or configuration) and prints errors without secrets."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway import deferred_imports  # noqa: F401 - first: see gateway/deferred_imports.py
from gateway.config import ConfigError, GatewayConfig, json_schema, load_config
from gateway.control import ControlError
from gateway.device_identity import EnrollmentError
from gateway.fleet_ca import CaError, FleetCA, pem
from gateway.protocol.errors import ProtocolError
from gateway.store import StoreError
from hsm.api import KeyAlgorithm
from hsm.errors import HsmError

Handler = Callable[[argparse.Namespace], int]


def _cfg(args: argparse.Namespace) -> GatewayConfig:
    return load_config(args.config)


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    print(f"{args.config}: OK (fleet {cfg.device.fleet}, identity {cfg.keys.identity.split(':')[0]}, "
          f"{cfg.keys.algorithm.value})")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(json_schema())
    return 0


def cmd_ca_init(args: argparse.Namespace) -> int:
    ca = FleetCA.init(Path(args.dir), args.fleet, key_uri=args.key_uri, algorithm=KeyAlgorithm(args.algorithm),
                      days=args.days)
    print(f"fleet CA for {ca.fleet} in {ca.directory}: {ca.certificate.subject.rfc4514_string()}")
    return 0


def cmd_ca_sign(args: argparse.Namespace) -> int:
    ca = FleetCA.open(Path(args.dir))
    cert = ca.sign_csr(Path(args.csr).read_bytes(), device_id=args.device_id, days=args.days)
    Path(args.out).write_bytes(pem(cert))
    print(f"issued {args.out}: serial {cert.serial_number:#x}, {cert.subject.rfc4514_string()}, "
          f"valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    return 0


def cmd_ca_revoke(args: argparse.Namespace) -> int:
    ca = FleetCA.open(Path(args.dir))
    if args.device_id:
        serials = ca.revoke_device(args.device_id)
    else:
        from cryptography import x509

        serials = [x509.load_pem_x509_certificate(Path(args.cert).read_bytes()).serial_number] if args.cert \
            else [int(args.serial, 0)]
        for s in serials:
            ca.revoke(s)
    print(f"revoked {', '.join(f'{s:#x}' for s in serials)}; CRL written to {ca.directory / 'crl.pem'}")
    return 0


def cmd_ca_crl(args: argparse.Namespace) -> int:
    ca = FleetCA.open(Path(args.dir))
    ca.write_crl(days=args.days)
    print(f"CRL written to {ca.directory / 'crl.pem'}")
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    from gateway.device_identity import init_keys

    cfg = _cfg(args)
    res = init_keys(cfg, force=args.force)
    for role in res.created:
        print(f"created {role} key")
    for role in res.existing:
        print(f"{role} key exists; kept (use --force to replace)")
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    from gateway.device_identity import show_keys

    info = show_keys(_cfg(args))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for role in ("identity", "storage"):
            k = info[role]
            attrs = ", ".join(f"{n}={v}" for n, v in k["attributes"].items())
            print(f"{role}: {k['backend']} {k['algorithm']} {k['uri']}\n  {attrs}")
        if "certificate" in info:
            print(f"certificate: {info['certificate']['subject']} until {info['certificate']['not_after']}")
    return 0


def cmd_keys_delegate(args: argparse.Namespace) -> int:
    from gateway.device_identity import DeviceIdentity

    ident = DeviceIdentity.load(_cfg(args))
    key = ident.delegated_key(agent=args.agent, force_new=args.force)
    print(f"delegated key {key.certificate.serial_number:#x} valid until {key.not_after:%Y-%m-%dT%H:%M:%SZ}")
    return 0


def cmd_enroll_csr(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from gateway.device_identity import make_csr

    csr = make_csr(_cfg(args), args.device_id)
    Path(args.out).write_bytes(csr.public_bytes(Encoding.PEM))
    print(f"wrote {args.out} (signed by the hardware identity key)")
    return 0


def cmd_enroll_install(args: argparse.Namespace) -> int:
    from gateway.device_identity import install_certificate

    cfg = _cfg(args)
    cert = install_certificate(cfg, Path(args.cert).read_bytes(), Path(args.chain).read_bytes())
    print(f"installed {cfg.certificate_path}: {cert.subject.rfc4514_string()}")
    return 0


def _ask(cfg: GatewayConfig, req: dict[str, object]) -> object:
    """Ask the running daemon; when none runs, act on the store directly (needs the storage key)."""
    from gateway import control

    sock = cfg.paths.state_dir / "control.sock"
    try:
        return control.request(sock, req)
    except (ConnectionError, FileNotFoundError):
        pass
    import hsm
    from gateway.store import Store

    if req["cmd"] == "status":
        store = Store.open(cfg.paths.state_dir / "agw.db", hsm.load_storage_key(cfg.keys.storage))
        try:
            return {"running": False, "queue": {"outbox_depth": store.outbox.depth()},
                    "pending_consent": store.consent.pending_count(), "link": {"state": "down"}}
        finally:
            store.close()
    store = Store.open(cfg.paths.state_dir / "agw.db", hsm.load_storage_key(cfg.keys.storage))
    try:
        return control.dispatch(store, dict(req))
    finally:
        store.close()


def _print(obj: object, as_json: bool) -> None:
    if as_json or not isinstance(obj, list):
        print(json.dumps(obj, indent=2, default=str))
    else:
        for row in obj:
            print("  ".join(f"{k}={v}" for k, v in row.items()))


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.daemon import main_run

    return main_run(Path(args.config))


def cmd_status(args: argparse.Namespace) -> int:
    st = _ask(_cfg(args), {"cmd": "status"})
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        assert isinstance(st, dict)
        print(f"link: {st['link']['state']}  outbox: {st['queue']['outbox_depth']}  "
              f"pending consent: {st['pending_consent']}  peers: {', '.join(st.get('peers', [])) or '-'}")
    return 0


def cmd_consent(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    if args.sub == "list":
        _print(_ask(cfg, {"cmd": "consent.list", "agent": args.agent}), args.json)
        return 0
    if not args.agent or not args.peer:
        print("agw: consent allow|deny|revoke need --agent and --peer <device>/<agent>", file=sys.stderr)
        return 2
    _print(_ask(cfg, {"cmd": "consent.set", "agent": args.agent, "peer": args.peer, "action": args.sub}), True)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    if args.sub == "list":
        _print(_ask(cfg, {"cmd": "audit.list"}), True)
        return 0
    res = _ask(cfg, {"cmd": "audit.verify"})
    assert isinstance(res, dict)
    if res["ok"]:
        print(f"audit log intact: {res['entries']} entries")
        return 0
    print(f"audit log TAMPERED: first bad entry {res['first_bad_index']}", file=sys.stderr)
    return 1


def cmd_store(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    if args.sub == "export":
        _print(_ask(cfg, {"cmd": "store.export", "peer": args.peer}), True)
    else:
        _print(_ask(cfg, {"cmd": "store.purge", "peer": args.peer}), True)
    return 0


def cmd_group(args: argparse.Namespace) -> int:
    """Agent groups on the running daemon; add/remove wait for the commit (the relay orders it)."""
    import time

    cfg = _cfg(args)
    req: dict[str, object] = {"cmd": f"group.{args.sub}"}
    if args.agent:
        req["agent"] = args.agent
    if getattr(args, "group", None):
        req["group"] = args.group
    if args.sub in ("add", "remove"):
        req["members"] = args.member
    if args.sub == "create":
        req["admins"] = args.admin or []
    res = _ask(cfg, req)
    if args.sub in ("add", "remove", "update"):
        assert isinstance(res, dict)
        deadline = time.monotonic() + args.timeout
        while True:
            st = _ask(cfg, {"cmd": "group.op", "op": res["op"]})
            assert isinstance(st, dict)
            if st["state"] == "failed":
                print(f"agw: group {args.sub} failed: {st['error']}", file=sys.stderr)
                return 1
            if st["state"] == "done":
                res = st["result"]
                break
            if time.monotonic() > deadline:
                print(f"agw: group {args.sub} still pending after {args.timeout} s", file=sys.stderr)
                return 1
            time.sleep(0.1)
    _print(res, True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agw", description="Edge agent gateway")
    sub = p.add_subparsers(dest="command", required=True)

    def add(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, handler: Handler,
            help_text: str, config: bool = False) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(handler=handler)
        if config:
            sp.add_argument("--config", required=True, help="gateway YAML configuration")
        return sp

    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="sub", required=True)
    add(cfg, "check", cmd_config_check, "validate a configuration file", config=True)
    add(cfg, "schema", cmd_config_schema, "print the configuration JSON schema")

    ca = sub.add_parser("ca", help="fleet CA (provisioning host)").add_subparsers(dest="sub", required=True)
    sp = add(ca, "init", cmd_ca_init, "create a fleet CA")
    sp.add_argument("--dir", required=True)
    sp.add_argument("--fleet", required=True)
    sp.add_argument("--key-uri", help="keep the CA key in a PKCS#11 token (pkcs11: URI) instead of a file")
    sp.add_argument("--algorithm", choices=[a.value for a in KeyAlgorithm], default="ecdsa-p256")
    sp.add_argument("--days", type=int, default=3650)
    sp = add(ca, "sign", cmd_ca_sign, "issue a device certificate from a CSR")
    sp.add_argument("--dir", required=True)
    sp.add_argument("--csr", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--device-id", help="refuse the CSR unless it names this device")
    sp.add_argument("--days", type=int, default=365)
    sp = add(ca, "revoke", cmd_ca_revoke, "revoke a device certificate and publish a new CRL")
    sp.add_argument("--dir", required=True)
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--serial")
    g.add_argument("--cert")
    g.add_argument("--device-id")
    sp = add(ca, "crl", cmd_ca_crl, "re-issue the CRL")
    sp.add_argument("--dir", required=True)
    sp.add_argument("--days", type=int, default=7)

    keys = sub.add_parser("keys", help="hardware keys").add_subparsers(dest="sub", required=True)
    sp = add(keys, "init", cmd_keys_init, "create identity and storage keys (idempotent)", config=True)
    sp.add_argument("--force", action="store_true", help="replace existing keys (destroys them)")
    sp = add(keys, "show", cmd_keys_show, "show keys and attributes read back from the hardware", config=True)
    sp.add_argument("--json", action="store_true")
    sp = add(keys, "delegate", cmd_keys_delegate, "make or renew the delegated signing key", config=True)
    sp.add_argument("--agent")
    sp.add_argument("--force", action="store_true", help="make a new one even if the current one is fresh")

    enroll = sub.add_parser("enroll", help="device enrollment").add_subparsers(dest="sub", required=True)
    sp = add(enroll, "csr", cmd_enroll_csr, "write a CSR signed by the hardware identity key", config=True)
    sp.add_argument("--device-id", required=True)
    sp.add_argument("--out", required=True)
    sp = add(enroll, "install", cmd_enroll_install, "install the issued certificate and CA", config=True)
    sp.add_argument("--cert", required=True)
    sp.add_argument("--chain", required=True)

    add(sub, "run", cmd_run, "run the gateway daemon", config=True)
    sp = add(sub, "status", cmd_status, "link state, queue depth, peers, pending consent", config=True)
    sp.add_argument("--json", action="store_true")
    consent = sub.add_parser("consent", help="who may talk to local agents").add_subparsers(dest="sub",
                                                                                             required=True)
    for action in ("list", "allow", "deny", "revoke"):
        sp = add(consent, action, cmd_consent, f"consent: {action}", config=True)
        sp.add_argument("--agent", help="local agent name")
        if action != "list":
            sp.add_argument("--peer", help="<device-id>/<agent>")
        sp.add_argument("--json", action="store_true")
    audit = sub.add_parser("audit", help="tamper-evident audit log").add_subparsers(dest="sub", required=True)
    add(audit, "verify", cmd_audit, "check the audit log's hash chain and MACs", config=True)
    add(audit, "list", cmd_audit, "print the audit log", config=True)
    group = sub.add_parser("group", help="agent groups (MLS)").add_subparsers(dest="sub", required=True)
    for action, text in (("create", "create a group with a local agent as its first member and admin"),
                         ("add", "add members (<device>/<agent>) in one commit"),
                         ("remove", "remove members in one commit"),
                         ("update", "commit fresh keys for the agent (post-compromise security)"),
                         ("list", "groups of local agents"),
                         ("show", "one group: epoch, members, admins")):
        sp = add(group, action, cmd_group, text, config=True)
        sp.add_argument("--agent", required=action != "list", help="local agent acting")
        if action != "list":
            sp.add_argument("--group", required=True)
        if action in ("add", "remove"):
            sp.add_argument("--member", action="append", required=True, help="<device>/<agent> (repeatable)")
        if action in ("add", "remove", "update"):
            sp.add_argument("--timeout", type=float, default=30.0)
        if action == "create":
            sp.add_argument("--admin", action="append", help="another admin <device>/<agent> (repeatable)")
    store = sub.add_parser("store", help="data subject requests").add_subparsers(dest="sub", required=True)
    sp = add(store, "export", cmd_store, "export what the store holds (about one peer device)", config=True)
    sp.add_argument("--peer")
    sp = add(store, "purge", cmd_store, "delete everything about a peer device", config=True)
    sp.add_argument("--peer", required=True)
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed command line. The parser (~180 KiB of objects for every subcommand) is dropped on return: `agw
    run` keeps running in `main`'s call, and a parser held there stayed for the daemon's life (frozen by its
    `gc.freeze()`)."""
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        code: int = args.handler(args)
        return code
    except ConfigError as exc:
        print(f"agw: {exc}", file=sys.stderr)
        return 2
    except (HsmError, CaError, EnrollmentError, ProtocolError, OSError, StoreError, ControlError) as exc:
        print(f"agw: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
