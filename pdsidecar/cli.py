"""`pdsidecar` command line: models, local P/D stack, sidecar, injection, webhook."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


from pdsidecar.errors import CliError


def _cmd_models_make(args: argparse.Namespace) -> int:
    from pdsidecar.dev.tiny_models import PRESETS, ModelError, folder_digest, make_model

    overrides: dict = {}
    arch = args.arch
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise CliError(f"--preset: unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
        overrides = dict(PRESETS[args.preset])
        arch = overrides.pop("arch")
    if args.layers is not None:
        overrides["num_layers"] = args.layers
    if args.hidden_size is not None:
        overrides["hidden_size"] = args.hidden_size
        overrides["num_heads"] = args.hidden_size // 64
        overrides["num_kv_heads"] = max(1, args.hidden_size // 128)
        overrides["intermediate_size"] = args.hidden_size * 2
    try:
        if args.if_missing and args.device == "cpu":
            from pdsidecar.dev.tiny_models import ensure_model

            path = ensure_model(arch, args.out, seed=args.seed, **overrides)
        else:
            path = make_model(arch, args.out, seed=args.seed, device=args.device, **overrides)
    except ModelError as e:
        raise CliError(str(e)) from None
    print(f"{path}  sha256:{folder_digest(path)}")
    return 0


def _cmd_local(args: argparse.Namespace) -> int:
    from pdsidecar.dev.local import run_local

    return run_local(args)


# Subcommands whose flags another module parses: name -> (module, function(argv) -> int, help).
DELEGATED: dict[str, tuple[str, str, str]] = {
    "run": ("pdsidecar.sidecar", "run_sidecar", "run the sidecar (--role prefill|decode); see `pdsidecar run --help`"),
    "inject": ("pdsidecar.k8s.inject", "run_inject", "add the sidecar to Pod/Deployment/LeaderWorkerSet YAML"),
    "webhook": ("pdsidecar.k8s.webhook", "run_webhook", "mutating admission webhook that injects the sidecar"),
    "webhook-cert": ("pdsidecar.k8s.certs", "run_webhook_cert", "self-signed certificate for the webhook (dev)"),
    "control-certs": ("pdsidecar.k8s.certs", "run_control_certs", "CA + engine certificate for control-plane mTLS"),
    "deploy-validate": ("pdsidecar.k8s.validate", "run_validate", "validate rendered manifests offline"),
    "deploy-manifests": ("pdsidecar.k8s.manifests", "run_manifests", "regenerate the LeaderWorkerSet manifests"),
}


def _run_delegated(name: str, argv: list[str]) -> int:
    import importlib

    module, func, _ = DELEGATED[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise CliError(f"`pdsidecar {name}` is not available: {e}") from None
    return int(getattr(mod, func)(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdsidecar", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="tiny random-weight models for tests and demos")
    msub = models.add_subparsers(dest="models_command", required=True)
    make = msub.add_parser("make", help="build a deterministic tiny model folder vLLM can serve")
    make.add_argument("--arch", default="llama", help="llama (dense) or mixtral (8 experts, top-2)")
    make.add_argument("--out", required=True, help="output folder")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--layers", type=int, default=None, help="number of layers (default 4)")
    make.add_argument("--hidden-size", type=int, default=None, help="hidden size, a multiple of 128 (default 256)")
    make.add_argument("--preset", default=None,
                      help="real-shaped model instead of a tiny one: llama3-8b-shape (32 layers, 8 KV "
                           "heads, head dim 128), llama3-8b-kv (its KV cache, little compute) or "
                           "mixtral-small-shape (8 experts, top-2); random weights")
    make.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                      help="where the random weights are drawn (cuda: fast for presets; bytes differ from cpu)")
    make.add_argument("--if-missing", action="store_true",
                      help="keep the folder when it already holds this model (same arch, seed, sizes)")
    make.set_defaults(func=_cmd_models_make)

    from pdsidecar.dev.local import add_local_arguments

    local = sub.add_parser("local", help="run a local P/D pair on a tiny model and send real requests")
    add_local_arguments(local)
    local.set_defaults(func=_cmd_local)

    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DELEGATED:
            return _run_delegated(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"pdsidecar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
