"""`vitx serve`: the online explanation service (Ray Serve, dynamic batching, HTTP API, web page)."""
from __future__ import annotations

from vitx_fast.cli._common import CLIError


def add_parser(sub):
    s = sub.add_parser("serve", help="serve explanations over HTTP (Ray Serve, dynamic batching, a web page)",
                       description="Starts a local Ray (or joins --address), then the service on 127.0.0.1:PORT: "
                                   "POST /v1/explain, POST /v1/models/<name>:explain (KServe V1), GET /v1/models, "
                                   "GET /healthz, the web page at / and the API docs at /docs.")
    s.add_argument("--model", default="demo", help="'demo' (bundled) or a timm model name")
    s.add_argument("--checkpoint", help="local weights (.safetensors / .pth) for --model")
    s.add_argument("--random-weights", action="store_true", help="a timm model without pretrained weights")
    s.add_argument("--method", nargs="+", default=None, help="methods to offer (default: every method that can "
                                                              "explain the model)")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:i] (one GPU per replica when CUDA is present)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback by default)")
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--max-batch-size", type=int, default=16, help="dynamic batching: most requests per batch (1: off)")
    s.add_argument("--batch-wait-timeout-s", type=float, default=0.01,
                   help="dynamic batching: longest wait for a batch to fill")
    s.add_argument("--max-bytes", type=int, default=10 * 2**20, help="largest request body accepted")
    s.add_argument("--threads", type=int, default=None, help="torch threads per replica")
    s.add_argument("--address", default=None, help="an existing Ray cluster to join (default: start one locally)")
    s.add_argument("--ray-cpus", type=float, default=None, help="CPUs of the local Ray (default: all)")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise CLIError("vitx serve needs Ray Serve: pip install 'vitx-fast[serve]'") from None
    from vitx_fast.serve import ServeConfig, start
    from vitx_fast.serve.core import ServingModel

    if args.max_batch_size < 1 or args.batch_wait_timeout_s < 0 or args.replicas < 1 or args.max_bytes < 1:
        raise CLIError("--max-batch-size, --replicas and --max-bytes must be >= 1 and --batch-wait-timeout-s >= 0")
    config = ServeConfig(model=args.model, checkpoint=args.checkpoint, random_weights=args.random_weights,
                         methods=tuple(args.method or ()), device=args.device, max_batch_size=args.max_batch_size,
                         batch_wait_timeout_s=args.batch_wait_timeout_s, max_bytes=args.max_bytes,
                         threads=args.threads)
    try:  # fail here, in one line, rather than inside a Ray replica
        ServingModel(config)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    url = f"http://{args.host}:{args.port}"
    print(f"vitx serve: {args.model} on {url} (web page {url}/, API docs {url}/docs); Ctrl+C stops", flush=True)
    start(config, port=args.port, host=args.host, replicas=args.replicas, address=args.address,
          num_cpus=args.ray_cpus, blocking=True)
    return 0
