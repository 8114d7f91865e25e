"""`agw-relay`: run the relay. Settings come from a TOML file (`[relay]`) and/or flags; flags win."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from gateway import allocator
from relay.auth import FleetVerifier
from relay.config import ConfigError, RelayConfig
from relay.logs import setup_logging
from relay.routing import LocalRouter
from relay.server import RelayServer
from relay.tap import TapRouter

log = logging.getLogger("agw.relay")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agw-relay", description="Route end-to-end encrypted envelopes between gateways.")
    p.add_argument("--config", type=Path, help="TOML file with a [relay] table")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--audience", help="the audience gateways' tokens must name")
    p.add_argument("--cert", dest="cert_file", type=Path, help="server certificate chain (PEM)")
    p.add_argument("--key", dest="key_file", type=Path, help="server private key (PEM)")
    p.add_argument("--ca", dest="ca_file", type=Path, help="fleet CA certificate (PEM)")
    p.add_argument("--crl", dest="crl_file", type=Path, help="fleet CRL (PEM), reloaded when it changes")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host")
    p.add_argument("--tap", type=Path, help="record every routed envelope (ciphertext) as JSON lines in this file")
    p.add_argument("--log-level", default="info")
    return p


async def _serve(config: RelayConfig, tap: Path | None = None) -> int:
    if config.ca_file is None:
        raise ConfigError("the relay needs the fleet CA certificate (--ca or ca_file)")
    verifier = FleetVerifier.from_files(config.ca_file, config.crl_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    router = TapRouter(LocalRouter(), tap) if tap is not None else None
    async with RelayServer(config, verifier, router=router) as relay:
        print(f"agw-relay listening on {config.host}:{relay.port}", flush=True)
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    allocator.keep_large_blocks()  # fewer fresh pages per routed byte (see its docstring)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "log_level", "tap") and v is not None}
    try:
        if args.config is not None:
            config = RelayConfig.from_toml(args.config, **overrides)
        else:
            config = RelayConfig.from_mapping({}, **overrides)
        return asyncio.run(_serve(config, args.tap))
    except ConfigError as exc:
        log.error("configuration error", extra={"event": "config_error", "reason": str(exc)})
        print(f"agw-relay: {exc}")
        return 2
    except OSError as exc:
        log.error("cannot start", extra={"event": "start_failed", "reason": str(exc)})
        print(f"agw-relay: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
