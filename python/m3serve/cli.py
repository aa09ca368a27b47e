"""The ``m3serve`` command line (also ``python -m m3serve``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    if args.family == "llama":
        from m3serve.checkpoint.tiny_llama import make_tiny_llama

        out = make_tiny_llama(args.dir, seed=args.seed)
    else:
        from m3serve.checkpoint.make_tiny import make_tiny

        out = make_tiny(args.dir, preset=args.preset, seed=args.seed)
    files = sorted(p.name for p in Path(out).iterdir())
    print(f"wrote {args.family} checkpoint to {out}: {', '.join(files)}")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    import time

    from m3serve.launch import SGLangServer

    server = SGLangServer(
        args.model_path,
        port=args.port,
        device=args.device,
        max_total_tokens=args.max_total_tokens,
        extra_args=args.sglang_args,
        log_path=args.log,
    )
    print(f"starting SGLang worker on {server.url} (log: {server.log_path})", flush=True)
    with server:
        print(f"worker ready at {server.url}; Ctrl-C stops it", flush=True)
        try:
            while server.alive():
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """Run the smg gateway in the foreground (exec: signals go straight to it)."""
    import os

    from m3serve.gateway import find_smg_binary

    exe = str(find_smg_binary())
    cmd = [exe, "--model-dir", args.model_dir, "--host", args.host, "--port", str(args.port)]
    for w in args.worker:
        cmd += ["--worker", w]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    os.execv(exe, cmd + list(args.smg_args))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from m3serve.demo import run_demo

    return run_demo(family=args.family, workdir=args.workdir, prompt=args.prompt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3serve", description="Fast MiniMax-M3 serving: SGLang plugin + Rust gateway."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint (HF layout)")
    p.add_argument("dir", help="output folder (created if missing)")
    p.add_argument("--family", choices=("m3", "llama"), default="m3")
    p.add_argument("--preset", default="tiny", help="size preset of the M3 checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("worker", help="run one SGLang worker (python -m sglang.launch_server)")
    p.add_argument("--model-path", required=True)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--max-total-tokens", type=int, default=16384)
    p.add_argument("--log", default=None, help="server log file (default: a temp file)")
    p.add_argument("sglang_args", nargs=argparse.REMAINDER, help="passed to sglang after --")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("serve", help="run the smg gateway in front of SGLang workers")
    p.add_argument("--worker", action="append", required=True, help="worker URL (repeatable)")
    p.add_argument("--model-dir", required=True, help="checkpoint folder (tokenizer, config)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("smg_args", nargs=argparse.REMAINDER, help="more smg flags after -- (smg --help)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="tiny checkpoint on CPU, one chat request, answer + timings")
    p.add_argument("--family", choices=("m3", "llama"), default="m3")
    p.add_argument("--workdir", default=None, help="where the checkpoint and logs go")
    p.add_argument("--prompt", default="What is in this image? Answer in one sentence.")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for extra in ("sglang_args", "smg_args"):
        rest = getattr(args, extra, None)
        if rest and rest[0] == "--":
            setattr(args, extra, rest[1:])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
