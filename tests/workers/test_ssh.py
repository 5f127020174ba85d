"""The ssh transport against a real OpenSSH server on 127.0.0.1, started by the test with throw-away keys."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from worker_support import FAKE, SPEC, async_test, follow

from workbench.backends.client import WorkerClient
from workbench.backends.transports import SshTransport
from workbench.cli import main
from workbench.history import History

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A private sshd accepting one throw-away user key; yields what a client needs to reach it."""
    missing = [tool for tool in (SSHD, "ssh", "ssh-keygen") if not (os.path.isfile(tool) or shutil.which(tool))]
    if missing:
        pytest.skip(f"the ssh transport test needs OpenSSH ({', '.join(missing)} not installed; "
                    "Debian: apt-get install openssh-server openssh-client)")
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        try:  # sshd running as root insists on its privilege separation folder (systemd creates it normally)
            os.makedirs("/run/sshd", mode=0o755)
        except OSError as exc:
            pytest.skip(f"sshd needs /run/sshd and it cannot be created: {exc}")
    folder = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    port = _free_port()
    config = folder / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"HostKey {folder / 'host_key'}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        f"PidFile {folder / 'sshd.pid'}", "StrictModes no", "UsePAM no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin yes", "",
    ]))
    log = open(folder / "sshd.log", "wb")
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config), "-p", str(port)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sshd did not start: {(folder / 'sshd.log').read_text()}")
                time.sleep(0.05)
        options = [f"Port={port}", f"IdentityFile={folder / 'user_key'}", "StrictHostKeyChecking=no",
                   f"UserKnownHostsFile={folder / 'known_hosts'}", "LogLevel=ERROR"]
        yield {"port": port, "options": options, "folder": folder}
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def _remote(home) -> str:
    """The remote command: this interpreter's workbench, with the test's home (ssh does not pass our environment)."""
    return f"WORKBENCH_HOME={home} {sys.executable} -m workbench worker"


@async_test
async def test_a_fake_worker_over_ssh_runs_and_cancels_jobs_and_gets_its_environment(sshd, tmp_path):
    transport = SshTransport(host="127.0.0.1", options=sshd["options"], remote_command=_remote(tmp_path),
                             args=[*FAKE, "--fake-delay", "0.02"], gpus=["3"])
    client = WorkerClient(transport)
    hello = await client.start()
    try:
        assert hello["fake"] and hello["home"] == str(tmp_path)
        assert hello["cuda_visible_devices"] == "3"  # set on the remote side by the ssh command line
        assert [d["name"] for d in hello["devices"] if d["kind"] == "cuda"] == ["Fake GPU 3"]
        assert hello["pid"] != client.pid  # client.pid is the local ssh process; the worker is sshd's grandchild
        updates = await follow(client, await client.submit("run", spec=SPEC))
        assert updates[-1].kind == "result"
        assert [u.event.layer for u in updates if u.kind == "event" and u.event.type == "layer_done"] == list(range(8))

        job = await client.submit("run", spec=SPEC)
        async for update in client.events(job):
            if update.kind == "event" and update.event.type == "layer_done":
                await client.cancel(job)
        assert update.data["kind"] == "cancelled"
        assert await client.ping() < 5
    finally:
        await client.close()


@async_test
async def test_when_the_ssh_connection_dies_the_remote_worker_exits_and_the_job_fails(sshd, tmp_path):
    client = WorkerClient(SshTransport(host="127.0.0.1", options=sshd["options"], remote_command=_remote(tmp_path),
                                       args=[*FAKE, "--fake-delay", "0.05"]), restart=False)
    hello = await client.start()
    try:
        job = await client.submit("run", spec=SPEC)
        async for update in client.events(job):
            if update.kind == "event" and update.event.type == "layer_done":
                os.killpg(client.pid, signal.SIGKILL)  # the local ssh client dies, as when a laptop's network drops
        assert update.data["kind"] == "worker_died" and "ssh 127.0.0.1" in update.data["message"]
    finally:
        await client.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the remote worker sees the end of its input and leaves
        try:
            os.kill(hello["pid"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the remote worker outlived its connection")


def test_cli_run_over_ssh_is_recorded_and_a_refused_login_is_one_clear_message(sshd, tmp_path, capsys):
    base = ["run", "quickstart", "--backend", f"ssh://127.0.0.1:{sshd['port']}",
            "--worker-command", f"{_remote(tmp_path)} {' '.join(FAKE)}", "--set", "evaluate.limit=2", "--quiet"]
    options = [arg for opt in sshd["options"] if not opt.startswith("Port=") for arg in ("--ssh-option", opt)]
    code = main(base + options + ["--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    with History() as h:
        record = h.get(summary["run_id"])
        events = h.events(record.id)
    assert record.status == "finished" and record.out_dir == f"127.0.0.1:{tmp_path}/runs/{record.id}"
    assert events[0]["message"].startswith("worker ssh 127.0.0.1: pid ") and events[-1]["type"] == "run_finished"

    stranger = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    wrong = [arg if not arg.startswith("IdentityFile=") else f"IdentityFile={stranger}" for arg in options]
    code = main(base + wrong + ["--ssh-option", "IdentitiesOnly=yes"])
    err = capsys.readouterr().err
    assert code == 2
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1
    assert "Permission denied" in err and "key authentication" in err
