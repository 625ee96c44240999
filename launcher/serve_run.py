"""Starting and stopping `ptv2 serve`'s application (`launcher/serve.py`): an embedded Ray or a
running cluster, Serve's HTTP proxies on the address asked for (checked: Serve keeps the one it
started with), and a clean stop on SIGINT/SIGTERM."""

import contextlib
import os
import re
import signal
import threading

from ray import serve

from launcher.serve import APP_NAME, ServeOptions, build_app
from launcher.serve_sources import Entry, ServeError
from ptv2.scheduler import Scheduler


def start(
    options: ServeOptions,
    entries: list[Entry],
    address: str | None = None,
    num_cpus: int | None = None,
    scheduler=Scheduler,
    metrics_port: int | None = None,
):
    """Start Ray (embedded unless `address`) and Serve, deploy, and return the app's handle;
    raises ServeError with the replica's reason when the application does not start.
    `metrics_port`: where the embedded Ray exports its metrics, ptv2's included (Prometheus
    format, /metrics; Ray's exporter listens on every interface of the node, as its other ports
    do); on a cluster, each node's `ray start --metrics-export-port` says."""
    import ray

    if address is None:
        _check_port(options.host, options.port)
    started_ray = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, configure_logging=False)
        else:
            cpus = num_cpus or max(os.cpu_count() or 1, int(options.replicas * options.cpus_per_replica))
            extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
            ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, **extra)
        started_ray = True
    serve.start(http_options={"host": options.host, "port": options.port})
    host, port = http_bind()
    if (host, port) != (options.host, options.port):
        # Serve keeps the HTTP options it started with (Ray only logs a warning): the replicas'
        # admin check and the token warning would trust a host that is not the real one
        stop(started_ray, address)
        raise ServeError(
            f"Ray Serve already runs on this cluster, listening on {host}:{port}, and cannot move while it runs: "
            f"serve with --host {host} --port {port}, or shut that Serve down first (serve shutdown)"
        )
    try:
        return serve.run(build_app(options, entries, scheduler), name=APP_NAME, route_prefix="/")
    except Exception as e:
        detail = str(e)
        with contextlib.suppress(Exception):  # the replica's own exception is in the app's status
            status = serve.status().applications[APP_NAME]
            detail += "\n".join(["", status.message, *(d.message for d in status.deployments.values())])
        stop(started_ray, address)
        raise ServeError(_reason(detail)) from e


def http_bind() -> tuple[str, int]:
    """(host, port) the running Serve's HTTP proxies listen on. Ray 2.60 has no public call for
    it: its controller client holds the options the proxies started with (a stable schema)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    return details.http_options.host, details.http_options.port


def _check_port(host: str, port: int) -> None:
    """Refuse a port something else holds now (Serve's proxy would only log its failure)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from e


def _reason(text: str) -> str:
    """The line of a failed deployment that says why (the replica's own exception)."""
    found = re.findall(r"(?:ArtifactError|FetchError|ServeError|UnsupportedModelError|OSError|ValueError): (.+)", text)
    return found[-1].strip() if found else text.strip().splitlines()[-1][:2000]


def stop(shutdown_ray: bool, address: str | None) -> None:
    """Take down what `start` brought up: the whole embedded Ray, or only this app on a cluster."""
    import ray

    with contextlib.suppress(Exception):
        if address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    if shutdown_ray and ray.is_initialized():
        ray.shutdown()


def serve_forever(
    options: ServeOptions, entries: list[Entry], address: str | None = None, echo=print, metrics_port: int | None = None
) -> int:
    """Run until SIGINT/SIGTERM, then take down what was started; returns the exit status."""
    import ray

    started_ray = not ray.is_initialized()
    done = threading.Event()
    previous = {}
    try:
        start(options, entries, address, metrics_port=metrics_port)
        # after ray.init, which installs handlers of its own: ours end the wait, then clean up
        previous = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        url = f"http://{options.host}:{options.port}"
        echo(f"serving {len(entries)} prompt(s) on {options.base} at {url}  (Ctrl-C stops)")
        for e in entries:
            echo(f"  {e.name:<24} {e.source}" + (f"  (version {e.version})" if e.version else ""))
        echo(f"try: curl {url}/v1/prompts")
        if metrics_port:
            echo(f"metrics (Prometheus): http://127.0.0.1:{metrics_port}/metrics (Ray listens on every interface)")
        while not done.wait(1.0):
            pass
        return 0
    finally:
        echo("stopping")
        stop(started_ray, address)
        for s, handler in previous.items():
            signal.signal(s, handler)
