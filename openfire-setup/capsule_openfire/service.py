"""Run Openfire as a service: a systemd unit where the host runs systemd, else Openfire's own
launcher (``bin/openfire.sh``, which execs java) under a PID file and a log file.

Containers usually have no systemd; ``has_systemd`` is the check systemd itself documents
(``/run/systemd/system`` exists). The launcher starts Openfire in its own session as the
service user, so ``stop`` can signal the whole process group and wait for it to end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

UNIT = """[Unit]
Description=Openfire XMPP server (installed by Capsule's openfire-setup)
After=network.target mariadb.service

[Service]
Type=simple
User={user}
WorkingDirectory={dir}
Environment=JAVA_HOME={java_home}
ExecStart={dir}/bin/openfire.sh
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


class ServiceError(Exception):
    """Openfire could not be started or stopped."""


def has_systemd(root: Path = Path("/")) -> bool:
    return (root / "run/systemd/system").is_dir()


def java_home() -> str:
    """The JVM of the ``java`` on PATH (the one the installer put there). Without JAVA_HOME,
    openfire.sh takes the last-sorted JDK in /usr/lib/jvm, whichever version that is."""
    java = shutil.which("java")
    if java is None:
        raise ServiceError("no java on PATH: apt-get install openjdk-17-jre-headless")
    return str(Path(java).resolve().parent.parent)


def _cmd(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ServiceError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")


@dataclass
class Systemd:
    install_dir: Path
    user: str
    unit_path: Path

    def describe(self) -> str:
        return f"systemd unit {self.unit_path.name}"

    def commands(self) -> list[list[str]]:
        return [["systemctl", "daemon-reload"], ["systemctl", "enable", "openfire"],
                ["systemctl", "start", "openfire"]]

    def files(self) -> list[str]:
        return [str(self.unit_path)]

    def install(self) -> None:
        self.unit_path.parent.mkdir(parents=True, exist_ok=True)
        self.unit_path.write_text(UNIT.format(dir=self.install_dir, user=self.user,
                                              java_home=java_home()))
        _cmd(["systemctl", "daemon-reload"])
        _cmd(["systemctl", "enable", "openfire"])

    def start(self) -> None:
        _cmd(["systemctl", "start", "openfire"])

    def stop(self) -> None:
        _cmd(["systemctl", "stop", "openfire"])

    def running(self) -> bool:
        return subprocess.run(["systemctl", "is-failed", "--quiet", "openfire"],
                              check=False).returncode != 0

    def status(self) -> str:
        proc = subprocess.run(["systemctl", "is-active", "openfire"], capture_output=True,
                              text=True, check=False)
        return f"systemd unit openfire: {proc.stdout.strip() or 'unknown'}"


@dataclass
class Launcher:
    """``bin/openfire.sh`` as ``user``, its PID in ``pid_file``, its output in ``log_file``."""

    install_dir: Path
    user: str
    pid_file: Path
    log_file: Path

    def describe(self) -> str:
        return f"no systemd: bin/openfire.sh, PID file {self.pid_file}, log {self.log_file}"

    def commands(self) -> list[list[str]]:
        return [self.command()]

    def files(self) -> list[str]:
        return [str(self.pid_file), str(self.log_file)]

    def install(self) -> None:
        """Nothing to register: there is no init system to tell."""

    def command(self) -> list[str]:
        script = ["/bin/sh", str(self.install_dir / "bin/openfire.sh")]  # also when not +x
        if os.geteuid() != 0:  # tests run it as themselves
            return script
        return ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups",
                "--", *script]

    def pid(self) -> int | None:
        """The recorded PID if that process is alive and runs from our install dir."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, ValueError):
            return None
        return pid if str(self.install_dir).encode() in cmdline and state != "Z" else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> None:
        if self.pid() is not None:
            return
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(self.command(), cwd=self.install_dir, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "JAVA_HOME": java_home()})
        self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 10  # until it has exec'd (its cmdline names our dir)
        while self.pid() is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, timeout: float = 60) -> None:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)  # stale or absent: nothing of ours runs
            return
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_alive(pid):  # java and anything else it started
            if time.monotonic() > deadline:
                _signal_group(pid, signal.SIGKILL)
                deadline += timeout
            _reap(pid)
            time.sleep(0.2)
        _reap(pid)
        self.pid_file.unlink(missing_ok=True)

    def status(self) -> str:
        pid = self.pid()
        return (f"openfire.sh running, PID {pid} ({self.pid_file}), log {self.log_file}"
                if pid else f"not running (no live PID in {self.pid_file})")


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # it ended meanwhile


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count)."""
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue  # not a process, or it just ended
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _reap(pid: int) -> None:
    """Collect the exit status when we are the parent (the install step, tests)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
