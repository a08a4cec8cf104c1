"""``caloforge serve``: run the adaptation service, and manage its tokens.

    caloforge serve [--config configs/service/local.yaml] [--host 127.0.0.1] [--port 8080] [--no-execute]
    caloforge serve token create NAME --scope read|submit|admin [--scope ...]
    caloforge serve token list
    caloforge serve token revoke NAME

``--no-execute`` validates and queues jobs without running them. With execution on, the executor
(``caloforge.adapt.service.executor``) submits queued jobs as Ray jobs. See docs/service.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = "configs/service/local.yaml"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="run the adaptation service (HTTP API); `serve token ...` manages its tokens",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=None,
        help=f"service YAML (default {DEFAULT_CONFIG} when it exists, else defaults)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--host", default=None, help="listen address (default: the config's, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: the config's, 8080)")
    p.add_argument("--no-execute", action="store_true", help="validate and queue jobs without running them")
    p.set_defaults(func=serve)
    sub = p.add_subparsers(dest="serve_command", metavar="token|stop-head")
    token = sub.add_parser("token", help="create, list or revoke API tokens")
    tsub = token.add_subparsers(dest="token_command", metavar="create|list|revoke", required=True)
    create = tsub.add_parser("create", help="create a token (printed once)")
    create.add_argument("name")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        help="read, submit or admin (repeatable or comma-separated)",
    )
    create.set_defaults(func=token_create)
    tsub.add_parser("list", help="list tokens (names, scopes, state)").set_defaults(func=token_list)
    revoke = tsub.add_parser("revoke", help="revoke a token")
    revoke.add_argument("name")
    revoke.set_defaults(func=token_revoke)
    sub.add_parser(
        "stop-head",
        help="stop the service's own Ray head (it outlives `caloforge serve`, so a restart follows its jobs)",
    ).set_defaults(func=stop_head)
    return p


def stop_head(args: argparse.Namespace) -> int:
    from caloforge.adapt.service.rayjobs import stop_recorded_head
    from caloforge.paths import home

    if stop_recorded_head(home()):
        print(f"stopped the service's Ray head ({home() / 'service'})")
    else:
        print(f"no Ray head of the service is recorded under {home() / 'service'}")
    return 0


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from caloforge.adapt.service.config import load_service_config

    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    config = load_service_config(path, args.overrides)
    return config


def _store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from caloforge.adapt.service.store import JobStore

    return JobStore(_config(args).resolved_database_url())


def serve(args: argparse.Namespace) -> int:
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    config = _config(args)
    changes = {}
    if args.host is not None:
        changes["host"] = args.host
    if args.port is not None:
        changes["port"] = args.port
    if args.no_execute:
        changes["execute"] = False
    config = dataclasses.replace(config, **changes)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caloforge-ray-head") as pool:
        runner = None
        if config.execute:
            from caloforge.adapt.service.rayjobs import RayJobRunner
            from caloforge.paths import home

            # An owned Ray head takes seconds to start: it starts while the API's imports (torch, scipy) load.
            runner = pool.submit(RayJobRunner, config.ray_address, home(), num_cpus=config.ray_num_cpus)
        import uvicorn

        from caloforge.adapt.service.app import create_app
        from caloforge.adapt.service.executor import Executor
        from caloforge.adapt.service.store import JobStore

        store = JobStore(config.resolved_database_url())
        executor = Executor(store, runner.result(), config) if runner is not None else None
    app = create_app(config, store=store, executor=executor)
    mode = "executing" if executor is not None else "validate-only"
    print(f"caloforge serve: http://{config.host}:{config.port} ({mode}; database {store.url})", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    return 0


def token_create(args: argparse.Namespace) -> int:
    from caloforge.adapt.service.auth import TokenStore

    store = _store(args)
    token = TokenStore(store).create(args.name, args.scope)
    store.audit(
        actor="cli", action="token.create", target=args.name, status_code=0, detail={"scopes": args.scope}
    )
    print(token)
    return 0


def token_list(args: argparse.Namespace) -> int:
    from caloforge.adapt.service.auth import TokenStore

    rows = TokenStore(_store(args)).list()
    print(f"{'NAME':<24} {'SCOPES':<20} {'CREATED':<34} STATE")
    for t in rows:
        state = f"revoked {t.revoked_at}" if t.revoked_at else "active"
        print(f"{t.name:<24} {','.join(t.scopes):<20} {t.created_at:<34} {state}")
    return 0


def token_revoke(args: argparse.Namespace) -> int:
    from caloforge.adapt.service.auth import TokenStore

    store = _store(args)
    TokenStore(store).revoke(args.name)
    store.audit(actor="cli", action="token.revoke", target=args.name, status_code=0, detail=None)
    print(f"revoked {args.name}")
    return 0
