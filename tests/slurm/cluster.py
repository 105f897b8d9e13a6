"""A real one-node SLURM cluster on localhost, for tests of the SLURM executor.

Brings up Debian's SLURM 22.05 (``slurmctld``, ``slurmd``, ``slurm-client``) with a
private ``munged`` and, by default, ``slurmdbd`` on a private MariaDB so that
``sacct`` works as on a real cluster (``accounting=False`` skips both; then only
``--slurm-status-command squeue`` works, which the project's profile uses anyway).
Everything the cluster writes (configs, munge key, state, spool, database, logs, pid
files) lives in one directory, ``/tmp/ntkcl-slurm`` (``$NTKCL_SLURM_DIR``); the
daemons listen on private ports of 127.0.0.1 (``$NTKCL_SLURM_PORT_BASE``, default
16810). The one thing outside it is a symlink ``/etc/slurm/slurm.conf`` -> our
slurm.conf: the jobstep plugin removes ``SLURM_CONF`` from the environment of the
``srun`` it runs inside each job, so ``srun`` must find the config at the default
path. The node declares one fake GPU (``gres.conf`` ``File=/dev/null``): rules with
``resources: gpu=1`` schedule, one at a time, and see ``CUDA_VISIBLE_DEVICES=0``.

Command line (as root)::

    python tests/slurm/cluster.py up [--no-accounting]   # idempotent
    python tests/slurm/cluster.py status
    python tests/slurm/cluster.py down [--purge]

From pytest (see conftest.py)::

    cluster = start_cluster()      # ClusterUnavailable -> pytest.skip(reason)
    subprocess.run([...], env=cluster.environ(), timeout=300)
    stop_cluster()                 # stops exactly the daemons recorded at start
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("ntkcl.slurm_cluster")

STATE_DIR = Path(os.environ.get("NTKCL_SLURM_DIR", "/tmp/ntkcl-slurm"))
PORT_BASE = int(os.environ.get("NTKCL_SLURM_PORT_BASE", "16810"))
CLUSTER_NAME = "ntkcl"
PARTITION = "debug"
DB_PASSWORD = "ntkcl-local-test"  # MariaDB listens on 127.0.0.1 only
BASE_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
ACCOUNTING_PACKAGES = ["mariadb-server", "slurmdbd"]
BINARIES = {"munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "sacct"}
ACCOUNTING_BINARIES = {"slurmdbd", "mariadbd", "mariadb-install-db", "mariadb"}
# Start order; stop order is the reverse.
DAEMONS = ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"]
# Where SLURM's clients look when SLURM_CONF is unset. The jobstep plugin (0.6)
# drops every SLURM_* variable, SLURM_CONF included, before its inner `srun`, so a
# private SLURM_CONF alone is not enough: we symlink this path to our slurm.conf.
SYSTEM_SLURM_CONF = "/etc/slurm/slurm.conf"
IDLE = ("idle", "mixed", "allocated")  # node states that mean "up and usable"


class ClusterUnavailable(RuntimeError):
    """SLURM cannot run on this machine (no root, no apt, install failed): skip."""


class ClusterError(RuntimeError):
    """SLURM is installed but the cluster did not come up: a real failure."""


@dataclass
class Cluster:
    """What a test needs to use the running cluster."""

    state_dir: str
    slurm_conf: str
    node: str
    partition: str
    accounting: bool  # True: slurmdbd + MariaDB, sacct works
    pids: dict[str, int]
    started: bool = False  # False: it was already up and was reused
    timings: dict[str, float] = field(default_factory=dict)

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Return ``base`` (default ``os.environ``) plus ``SLURM_CONF``."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.slurm_conf
        return env


# --------------------------------------------------------------------------- paths


def _paths(root: Path = STATE_DIR) -> dict[str, Path]:
    return {
        "root": root,
        "etc": root / "etc",
        "munge": root / "munge",
        "mysql": root / "mysql",
        "state": root / "state",
        "spool": root / "spool",
        "run": root / "run",
        "log": root / "log",
        "slurm_conf": root / "etc" / "slurm.conf",
        "record": root / "cluster.json",
        "etc_link": Path(os.environ.get("NTKCL_SLURM_ETC_LINK", SYSTEM_SLURM_CONF)),
        "lock": root.with_name(root.name + ".lock"),
        "munge_socket": root / "munge" / "munge.socket",
        "mysql_socket": root / "run" / "mysqld.sock",
    }


def _ports() -> dict[str, int]:
    return {
        "slurmctld": PORT_BASE + 7,
        "slurmd": PORT_BASE + 8,
        "slurmdbd": PORT_BASE + 9,
        "mariadbd": PORT_BASE + 6,
    }


# ----------------------------------------------------------------------- install


def _missing_binaries(accounting: bool) -> set[str]:
    wanted = BINARIES | (ACCOUNTING_BINARIES if accounting else set())
    return {b for b in wanted if shutil.which(b) is None}


def install_packages(accounting: bool = True) -> float:
    """Install Debian's SLURM and munge (and MariaDB + slurmdbd) with apt-get.

    Returns the seconds it took (0 when nothing was missing). Raises
    ClusterUnavailable when the machine cannot install them.
    """
    if not _missing_binaries(accounting):
        return 0.0
    if sys.platform != "linux":
        raise ClusterUnavailable(f"SLURM tests need Linux, not {sys.platform}.")
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            "SLURM is not installed and installing it needs root "
            f"(missing: {sorted(_missing_binaries(accounting))})."
        )
    if os.environ.get("NTKCL_SLURM_NO_INSTALL"):
        raise ClusterUnavailable(
            "SLURM is not installed and NTKCL_SLURM_NO_INSTALL forbids installing it."
        )
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(
            "SLURM is not installed and this machine has no apt-get to install "
            "Debian's slurmctld/slurmd/munge packages."
        )
    packages = BASE_PACKAGES + (ACCOUNTING_PACKAGES if accounting else [])
    log.info("installing %s with apt-get", " ".join(packages))
    t0 = time.monotonic()
    # Keep the packages' init scripts from starting system daemons on the
    # default ports and sockets (what Docker images do with the same file).
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        ):
            res = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=600
            )
            if res.returncode != 0:
                raise ClusterUnavailable(
                    f"`{' '.join(cmd)}` failed with exit code {res.returncode}: "
                    f"{(res.stderr or res.stdout).strip()[-800:]}"
                )
    except subprocess.TimeoutExpired as err:
        raise ClusterUnavailable(f"`{' '.join(err.cmd)}` took over 600 s.") from err
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    missing = _missing_binaries(accounting)
    if missing:
        raise ClusterUnavailable(f"apt-get ran but {sorted(missing)} are missing.")
    return time.monotonic() - t0


# ------------------------------------------------------------------------ config


def _node_resources() -> tuple[str, int, int]:
    node = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))
    meminfo = Path("/proc/meminfo").read_text().split("\n")
    total_kb = next(int(x.split()[1]) for x in meminfo if x.startswith("MemTotal:"))
    # Above what slurmd detects, the node drains; 80 % leaves room.
    return node, cpus, int(total_kb / 1024 * 0.8)


def _write_configs(p: dict[str, Path], accounting: bool) -> None:
    node, cpus, real_mem = _node_resources()
    ports = _ports()
    auth = f"socket={p['munge_socket']}"
    if accounting:
        acct = (
            "AccountingStorageType=accounting_storage/slurmdbd\n"
            "AccountingStorageHost=localhost\n"
            f"AccountingStoragePort={ports['slurmdbd']}\n"
            # The munge socket for talking to slurmdbd (AuthInfo is not used there).
            f"AccountingStoragePass={p['munge_socket']}\n"
        )
    else:
        acct = "AccountingStorageType=accounting_storage/none\n"
    slurm_conf = f"""\
# Written by tests/slurm/cluster.py: a one-node test cluster, no cgroups, no systemd.
ClusterName={CLUSTER_NAME}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo={auth}
StateSaveLocation={p["state"]}
SlurmdSpoolDir={p["spool"]}
SlurmctldPidFile={p["run"]}/slurmctld.pid
SlurmdPidFile={p["run"]}/slurmd.pid
SlurmctldLogFile={p["log"]}/slurmctld.log
SlurmdLogFile={p["log"]}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
# A job that asks for no memory would otherwise take the whole node.
DefMemPerCPU={max(100, real_mem // (4 * cpus))}
# Finished jobs stay visible to squeue/scontrol this long (squeue status needs it).
MinJobAge=600
# Seconds between SIGTERM and SIGKILL at scancel or time limit.
KillWait=10
InactiveLimit=0
GresTypes=gpu
{acct}
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_mem} Gres=gpu:1 \
State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    gres_conf = f"AutoDetect=off\nNodeName={node} Name=gpu File=/dev/null\n"
    (p["etc"] / "slurm.conf").write_text(slurm_conf)
    (p["etc"] / "gres.conf").write_text(gres_conf)
    if accounting:
        dbd = p["etc"] / "slurmdbd.conf"
        dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo={auth}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports["slurmdbd"]}
SlurmUser=root
PidFile={p["run"]}/slurmdbd.pid
LogFile={p["log"]}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["mariadbd"]}
StorageUser=slurm
StoragePass={DB_PASSWORD}
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)  # slurmdbd refuses a readable file holding a password


def _prepare_dirs(p: dict[str, Path], accounting: bool) -> None:
    p["root"].mkdir(mode=0o755, parents=True, exist_ok=True)
    p["root"].chmod(0o755)
    for key in ("etc", "state", "spool", "run", "log"):
        p[key].mkdir(mode=0o755, exist_ok=True)
    munge = pwd.getpwnam("munge")
    p["munge"].mkdir(exist_ok=True)
    p["munge"].chmod(0o755)  # munged: clients need to reach its socket
    os.chown(p["munge"], munge.pw_uid, munge.pw_gid)
    key = p["munge"] / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    os.chown(key, munge.pw_uid, munge.pw_gid)
    if accounting:
        mysql = pwd.getpwnam("mysql")
        os.chown(p["run"], 0, 0)
        p["run"].chmod(0o1777)  # mariadbd (user mysql) writes its socket and pid here
        p["mysql"].mkdir(mode=0o700, exist_ok=True)
        os.chown(p["mysql"], mysql.pw_uid, mysql.pw_gid)


# ------------------------------------------------------------------- processes


def _spawn(argv: list[str], logfile: Path, env: dict[str, str]) -> int:
    """Start a daemon in the foreground, in its own session; return its pid."""
    path = shutil.which(argv[0])
    if path is None:
        raise ClusterError(f"{argv[0]} is not on PATH.")
    append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(logfile), append, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    # Python ignores SIGPIPE; give the daemon the default handlers back.
    default = (signal.SIGPIPE, signal.SIGXFSZ)
    return os.posix_spawn(
        path, argv, env, file_actions=actions, setsid=True, setsigdef=default
    )


def _alive(pid: int, name: str) -> bool:
    """Is ``pid`` a live (not zombie) process whose command line names ``name``?"""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reaps it if it is our dead child
    except ChildProcessError:
        pass  # not our child (a pid from the record file): ask /proc
    else:
        # our child: waitpid knows, while its command line may read empty for a
        # moment as setpriv exec's the daemon
        return done == 0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    # the whole command line: munged starts as `setpriv ... munged ...`, and until
    # setpriv has exec'd it (slow on a busy machine) only its arguments name it
    return any(Path(a.decode(errors="replace")).name == name for a in cmdline)


def _stop_pid(pid: int, name: str, grace: float = 15.0) -> None:
    if not _alive(pid, name):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid, name):
            return
        time.sleep(0.2)
    log.warning("%s (pid %d) ignored SIGTERM for %.0f s: SIGKILL", name, pid, grace)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(25):
        if not _alive(pid, name):
            return
        time.sleep(0.2)


def _wait_for(what, check, timeout, logs, pid=None, name=None) -> float:
    """Poll ``check()`` until true; fail early if daemon ``pid`` dies meanwhile."""
    t0 = time.monotonic()
    died = False
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        if pid is not None and not _alive(pid, name):
            died = True
            break
        time.sleep(0.25)
    tails = "\n".join(
        f"--- {f} (last lines)\n" + "\n".join(f.read_text().splitlines()[-15:])
        for f in logs
        if f.exists()
    )
    why = f"{name} (pid {pid}) exited" if died else f"timed out after {timeout:.0f} s"
    raise ClusterError(f"Waiting for {what}: {why}.\n{tails}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ok(cmd: list[str], env: dict[str, str], timeout: float = 10) -> bool:
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return res.returncode == 0


def _out(cmd: list[str], env: dict[str, str], timeout: float = 10) -> str:
    """Stdout of ``cmd``, or "" when it fails or hangs."""
    try:
        res = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except (subprocess.TimeoutExpired, OSError):
        return ""
    return res.stdout if res.returncode == 0 else ""


def _node_state(env: dict[str, str], node: str) -> str:
    return _out(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], env).strip()


# ---------------------------------------------------------------- up and down


def _read_record(p: dict[str, Path]) -> dict | None:
    try:
        return json.loads(p["record"].read_text())
    except (OSError, ValueError):
        return None


def _running(record: dict) -> dict[str, bool]:
    return {n: _alive(pid, n) for n, pid in record.get("pids", {}).items()}


@contextlib.contextmanager
def _locked(p: dict[str, Path]):
    """Serialise up/down between processes (two pytest sessions, say)."""
    with open(p["lock"], "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _start_daemons(p: dict[str, Path], accounting: bool, timings: dict) -> dict:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "SLURM_CONF": str(p["slurm_conf"]),
        "LANG": "C.UTF-8",
    }
    node = _node_resources()[0]
    ports = _ports()
    names = DAEMONS if accounting else ["munged", "slurmctld", "slurmd"]
    for name in names:
        port = ports.get(name)
        if port is not None and _port_open(port):
            raise ClusterError(
                f"Port {port} on 127.0.0.1, meant for {name}, is already in use by "
                "a process this script did not start. Stop it, or choose other "
                "ports with NTKCL_SLURM_PORT_BASE."
            )
    pids: dict[str, int] = {}
    record = {"accounting": accounting, "node": node, "pids": pids}

    lg = p["log"]

    def launch(name: str, argv: list[str], what: str, check, logs: list[str]) -> None:
        t = time.monotonic()
        pids[name] = _spawn(argv, lg / f"{name}.out", env)
        p["record"].write_text(json.dumps(record, indent=1))  # `down` finds partials
        files = [lg / f"{name}.out"] + [lg / x for x in logs]
        _wait_for(what, check, 60, files, pids[name], name)
        timings[name] = time.monotonic() - t

    t0 = time.monotonic()
    mdir = p["munge"]
    launch(
        "munged",
        [
            "setpriv",
            "--reuid=munge",
            "--regid=munge",
            "--clear-groups",
            "munged",
            "--foreground",
            f"--socket={p['munge_socket']}",
            f"--key-file={mdir / 'munge.key'}",
            f"--pid-file={mdir / 'munged.pid'}",
            f"--seed-file={mdir / 'munged.seed'}",
            f"--log-file={lg / 'munged.log'}",
        ],
        "munged to answer",
        lambda: _ok(["munge", "-n", "-S", str(p["munge_socket"])], env),
        ["munged.log"],
    )
    if accounting:
        t = time.monotonic()
        if not (p["mysql"] / "mysql").is_dir():
            res = subprocess.run(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    "--user=mysql",
                    f"--datadir={p['mysql']}",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ],
                capture_output=True,
                text=True,
                timeout=180,
            )
            if res.returncode != 0:
                raise ClusterError(
                    f"mariadb-install-db failed:\n{res.stdout}{res.stderr}"
                )
        timings["mariadb-install-db"] = time.monotonic() - t
        sql = ["mariadb", "--no-defaults", f"--socket={p['mysql_socket']}", "-uroot"]
        launch(
            "mariadbd",
            [
                "mariadbd",
                "--no-defaults",
                "--user=mysql",
                f"--datadir={p['mysql']}",
                f"--socket={p['mysql_socket']}",
                f"--port={ports['mariadbd']}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                f"--pid-file={p['run'] / 'mariadbd.pid'}",
                "--innodb-buffer-pool-size=64M",
                "--innodb-lock-wait-timeout=900",
            ],
            "MariaDB to answer",
            lambda: _ok([*sql, "-e", "SELECT 1"], env),
            [],
        )
        grant = (
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY "
            f"'{DB_PASSWORD}'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        subprocess.run([*sql, "-e", grant], check=True, env=env, timeout=30)
        launch(
            "slurmdbd",
            ["slurmdbd", "-D"],
            "slurmdbd to listen",
            lambda: _port_open(ports["slurmdbd"]),
            ["slurmdbd.log"],
        )
    launch(
        "slurmctld",
        ["slurmctld", "-D"],
        "slurmctld to answer `scontrol ping`",
        lambda: "is UP" in _out(["scontrol", "ping"], env),
        ["slurmctld.log"],
    )
    launch(
        "slurmd",
        ["slurmd", "-D", "-N", node],
        f"node {node} to be idle in sinfo",
        lambda: _node_state(env, node) in IDLE,
        ["slurmd.log", "slurmctld.log"],
    )
    if accounting:
        # The cluster registers itself in slurmdbd; sacct answers once it has.
        t = time.monotonic()
        _wait_for(
            "sacct to answer",
            lambda: _ok(["sacct", "-n", "-X", "-a"], env),
            60,
            [lg / "slurmdbd.log", lg / "slurmctld.log"],
        )
        timings["sacct"] = time.monotonic() - t
    timings["daemons"] = time.monotonic() - t0
    return record


def _cluster(p: dict[str, Path], record: dict, started: bool, timings: dict) -> Cluster:
    return Cluster(
        state_dir=str(p["root"]),
        slurm_conf=str(p["slurm_conf"]),
        node=record["node"],
        partition=PARTITION,
        accounting=record["accounting"],
        pids=dict(record["pids"]),
        started=started,
        timings=timings,
    )


def start_cluster(accounting: bool = True, install: bool = True) -> Cluster:
    """Bring the cluster up (or find it up) and wait until its node is idle.

    Args:
        accounting: Run slurmdbd on MariaDB so ``sacct`` works (what real clusters
            do). False: no accounting; then Snakemake must use
            ``--slurm-status-command squeue`` (``MinJobAge`` is 600 s here).
        install: Install missing packages with apt-get.

    Returns:
        The running cluster; ``started`` says whether this call started it.

    Raises:
        ClusterUnavailable: SLURM cannot run here (skip the test, with the reason).
        ClusterError: it is installed but did not come up (fail the test).
    """
    timings: dict[str, float] = {}
    if sys.platform != "linux":
        raise ClusterUnavailable(f"SLURM tests need Linux, not {sys.platform}.")
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            "SLURM tests need root (to install packages and run slurmd/munged)."
        )
    if install:
        timings["install"] = install_packages(accounting)
    elif _missing_binaries(accounting):
        raise ClusterUnavailable(
            f"SLURM is not installed (missing {sorted(_missing_binaries(accounting))})."
        )
    p = _paths()
    p["root"].mkdir(mode=0o755, parents=True, exist_ok=True)
    with _locked(p):
        record = _read_record(p)
        if record:
            alive = _running(record)
            if alive and all(alive.values()) and record["accounting"] == accounting:
                env = {**os.environ, "SLURM_CONF": str(p["slurm_conf"])}
                _wait_for(
                    "the node to be idle",
                    lambda: _node_state(env, record["node"]) in IDLE,
                    60,
                    [],
                )
                _link_system_conf(p)
                log.info("cluster already up (pids %s)", record["pids"])
                return _cluster(p, record, False, timings)
            _stop_recorded(p, record)
        _prepare_dirs(p, accounting)
        _write_configs(p, accounting)
        _link_system_conf(p)
        try:
            record = _start_daemons(p, accounting, timings)
        except BaseException:
            partial = _read_record(p)
            if partial:
                _stop_recorded(p, partial)
            raise
    log.info("cluster up in %.1f s (pids %s)", timings["daemons"], record["pids"])
    return _cluster(p, record, True, timings)


def _cancel_jobs(env: dict[str, str], timeout: float = 30) -> None:
    """Cancel every job, so no slurmstepd outlives slurmd, and wait for them."""
    ids = _job_ids(env)
    if not ids:
        return
    log.info("cancelling jobs %s", " ".join(ids))
    subprocess.run(["scancel", *ids], env=env, capture_output=True, timeout=15)
    deadline = time.monotonic() + timeout
    while _job_ids(env) and time.monotonic() < deadline:
        time.sleep(0.5)


def _job_ids(env: dict[str, str]) -> list[str]:
    states = "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,REQUEUED,RESIZING"
    try:
        res = subprocess.run(
            ["squeue", "-h", "-o", "%A", "-t", states],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        return []
    return res.stdout.split() if res.returncode == 0 else []


def _stop_recorded(p: dict[str, Path], record: dict) -> list[str]:
    pids = record.get("pids", {})
    env = {**os.environ, "SLURM_CONF": str(p["slurm_conf"])}
    if pids.get("slurmctld") and _alive(pids["slurmctld"], "slurmctld"):
        _cancel_jobs(env)
    stopped = []
    for name in reversed(DAEMONS):
        pid = pids.get(name)
        if pid and _alive(pid, name):
            _stop_pid(pid, name)
            stopped.append(f"{name}({pid})")
    # Our own pid files only: the daemons never wrote any outside state_dir.
    for f in list(p["run"].glob("*.pid")) + [p["munge"] / "munged.pid"]:
        f.unlink(missing_ok=True)
    p["record"].unlink(missing_ok=True)
    _unlink_system_conf(p)
    return stopped


def _link_system_conf(p: dict[str, Path]) -> None:
    link, target = p["etc_link"], p["slurm_conf"]
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.exists() or link.is_symlink():
        raise ClusterError(
            f"{link} exists and is not this test cluster's: refusing to replace it. "
            "`srun` inside Snakemake jobs reads it (the jobstep plugin drops "
            f"SLURM_CONF). Move it away, or point NTKCL_SLURM_ETC_LINK elsewhere "
            "on a machine whose SLURM reads another default path."
        )
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _unlink_system_conf(p: dict[str, Path]) -> None:
    link = p["etc_link"]
    if link.is_symlink() and Path(os.readlink(link)) == p["slurm_conf"]:
        link.unlink()


def stop_cluster(purge: bool = False) -> list[str]:
    """Stop the daemons recorded by :func:`start_cluster`, by pid; return them.

    Running jobs are cancelled first. ``purge`` also deletes the state directory
    (configs, job state, accounting database, logs).
    """
    p = _paths()
    if not p["root"].exists():
        return []
    with _locked(p):
        record = _read_record(p)
        stopped = _stop_recorded(p, record) if record else []
        if purge:
            shutil.rmtree(p["root"], ignore_errors=True)
    log.info("stopped %s", ", ".join(stopped) or "nothing")
    return stopped


def cluster_status() -> dict:
    """Recorded pids, which are alive, and the node state."""
    p = _paths()
    record = _read_record(p)
    if not record:
        return {"up": False, "state_dir": str(p["root"])}
    alive = _running(record)
    env = {**os.environ, "SLURM_CONF": str(p["slurm_conf"])}
    node = _node_state(env, record["node"]) if alive.get("slurmctld") else "down"
    return {
        "up": all(alive.values()),
        "state_dir": str(p["root"]),
        "slurm_conf": str(p["slurm_conf"]),
        "accounting": record["accounting"],
        "pids": record["pids"],
        "alive": alive,
        "node_state": node,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the cluster (idempotent)")
    up.add_argument(
        "--no-accounting",
        action="store_true",
        help="no slurmdbd/MariaDB; use --slurm-status-command squeue",
    )
    down = sub.add_parser("down", help="stop the daemons started by `up`")
    down.add_argument("--purge", action="store_true", help="also delete the state dir")
    sub.add_parser("status", help="print the recorded pids and node state")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.cmd == "up":
            c = start_cluster(accounting=not args.no_accounting)
            print(json.dumps(asdict(c), indent=1))
            print(f"export SLURM_CONF={c.slurm_conf}")
        elif args.cmd == "down":
            stop_cluster(purge=args.purge)
        else:
            status = cluster_status()
            print(json.dumps(status, indent=1))
            return 0 if status["up"] else 3
    except ClusterUnavailable as err:
        print(f"SLURM unavailable: {err}", file=sys.stderr)
        return 2
    except ClusterError as err:
        print(f"SLURM cluster error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
