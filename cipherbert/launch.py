"""Process helpers for the tests and the load test: servers, redis-server and nginx on loopback.

Everything binds 127.0.0.1, runs with bounded waits, and is stopped by its own process id.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    popen: subprocess.Popen
    url: str
    log: Path
    extra: dict = field(default_factory=dict)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process, then anything left in its own process group (it was started in a new
        session, so the group holds only its children: engine workers, nginx workers)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text()[-n:]
        except OSError:
            return ""


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path, ok=(200,)) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"process exited ({proc.returncode}) before {url} answered:\n"
                f"{log.read_text()[-3000:] if log.exists() else ''}"
            )
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code in ok:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise TimeoutError(
        f"{url} not ready after {timeout}s (last: {last}):\n{log.read_text()[-3000:] if log.exists() else ''}"
    )


def start_server(
    workdir: Path,
    *,
    api_keys: str,
    models_dir: Path | None = None,
    engine: str | None = None,
    workers: int = 1,
    port: int | None = None,
    data_dir: Path | None = None,
    replica_id: str | None = None,
    env: dict | None = None,
    ready_timeout: float = 180.0,
    models: list[str] | None = None,
) -> Proc:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or workdir / f"data-{port}"
    log = workdir / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "cipherbert.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
    ]
    if models_dir:
        cmd += ["--models-dir", str(models_dir)]
    for m in models or []:
        cmd += ["--model", m]
    if engine:
        cmd += ["--engine", engine]
    if replica_id:
        cmd += ["--replica-id", replica_id]
    full_env = {**os.environ, "CIPHERBERT_API_KEYS": api_keys, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "ab") as fh:
        popen = subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    proc = Proc(popen, url, log, {"data_dir": data_dir, "port": port})
    try:
        wait_http(url + "/readyz", popen, ready_timeout, log)
    except Exception:
        proc.stop()
        raise
    return proc


def have(binary: str) -> bool:
    return shutil.which(binary) is not None or Path(f"/usr/sbin/{binary}").exists()


def start_redis(workdir: Path, *, port: int | None = None, durable: bool = False) -> Proc:
    """redis-server on loopback. durable=True: append-only file with fsync on every write (what a
    deployment that must not lose round state runs), so a restart on the same port and directory
    (`restart_redis`) comes back with every acknowledged write."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"redis-{port}.log"
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "always", "--appendfilename", f"cb-{port}.aof"]
        if durable
        else ["--appendonly", "no"]
    )
    with open(log, "ab") as fh:
        popen = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", *persistence, "--dir", str(workdir)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    import redis

    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.time() + 20
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.RedisError:
            if time.time() > deadline or popen.poll() is not None:
                popen.kill()
                raise RuntimeError(f"redis-server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)
    return Proc(popen, url, log, {"port": port, "workdir": workdir, "durable": durable})


def kill_redis(proc: Proc) -> None:
    """kill -9: no shutdown save, no goodbye to the clients (an outage, not a maintenance stop)."""
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(10)


def restart_redis(proc: Proc) -> Proc:
    """A new redis-server on the killed one's port and directory (it replays the append-only file)."""
    return start_redis(proc.extra["workdir"], port=proc.extra["port"], durable=proc.extra["durable"])


NGINX_TEMPLATE = """
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log {prefix}/access.log;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
{body}
  server {{
    listen 127.0.0.1:{port};
    include {prefix}/location.conf;
  }}
}}
"""


def start_nginx(workdir: Path, upstreams: list[str]) -> Proc:
    """nginx in front of the given http://host:port upstreams, using deploy/nginx.conf's settings."""
    port = free_port()
    prefix = workdir / f"nginx-{port}"
    prefix.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"    server {u.removeprefix('http://')};" for u in upstreams)
    upstream = f"  upstream cipherbert_api {{\n{servers}\n    keepalive 16;\n  }}\n"
    http_settings = (REPO / "deploy" / "nginx-http.conf").read_text()
    (prefix / "location.conf").write_text((REPO / "deploy" / "nginx-location.conf").read_text())
    # As root, nginx workers would drop to `nobody` and fail to write the temp paths in a 0700 tmp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = NGINX_TEMPLATE.format(prefix=prefix, port=port, body=upstream + http_settings, user=user)
    (prefix / "nginx.conf").write_text(conf)
    log = prefix / "stdout.log"
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    with open(log, "ab") as fh:
        popen = subprocess.Popen(
            [exe, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", popen, 20, prefix / "error.log")
    return Proc(popen, url, log)
