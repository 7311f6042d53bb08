"""`vitx serve`: an online explanation service on Ray Serve with dynamic batching, an HTTP API and a web page.

    from vitx_fast.serve import ServeConfig, start
    url = start(ServeConfig(model="demo", max_batch_size=16), port=8000)   # Ray started locally, 127.0.0.1

Needs the `serve` extra (ray[serve], python-multipart). See docs/serve.md.
"""
from vitx_fast.serve.core import ApiError, ServeConfig

__all__ = ["ApiError", "ServeConfig", "start"]


def start(config: ServeConfig, port: int = 8000, host: str = "127.0.0.1", replicas: int = 1,
          address: str | None = None, num_cpus: float | None = None, blocking: bool = False) -> str:
    """Start Ray (locally, or join `address`) and the service; returns its URL. blocking: serve until interrupted."""
    import os

    import ray
    import torch
    from ray import serve

    from vitx_fast.serve.app import build

    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:  # a local Ray on the loopback interface only
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": host, "port": port})
    gpus = 1.0 if config.device.startswith("cuda") and torch.cuda.is_available() else 0.0
    # actors get less than a core each on small machines: the HTTP proxy and the controller need CPU time too
    per_replica = min(1.0, max(0.1, (ray.available_resources().get("CPU", 1.0) - 0.5) / max(replicas, 1)))
    serve.run(build(config, replicas=replicas, num_cpus=per_replica, num_gpus=gpus), name="vitx", route_prefix="/",
              blocking=blocking)
    return f"http://{host}:{port}"
