"""An instance whose launcher is gone while it is still loading leaves at once, instead of
loading for minutes and then idling for good with its memory (a real process; its model's
config.json is a FIFO held open and never written, so loading blocks for as long as the
test wants)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from distserve.cluster.messages import SECRET_ENV

LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-m", "distserve.cluster.instance", "--role", "colocated",
                          "--instance-id", "colocated-0", "--controller", "tcp://127.0.0.1:9",
                          "--config-json", sys.argv[1]])
print(child.pid, flush=True)
child.wait()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_an_instance_loading_when_its_launcher_dies_exits(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / "config.json")
    env = {**os.environ, SECRET_ENV: "00" * 32}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, f'{{"model": "{model}"}}'],
                                stdout=subprocess.PIPE, text=True, env=env)
    instance = int(launcher.stdout.readline())
    writer = None
    try:
        # wait until the instance reads config.json (its imports done, its launcher noted):
        # till then a FIFO refuses a writer that will not wait. The writer is kept open, so
        # the instance stays blocked reading it, loading for as long as the test wants
        deadline = time.monotonic() + 120
        while writer is None and _alive(instance) and time.monotonic() < deadline:
            try:
                writer = os.open(model / "config.json", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:   # ENXIO: no reader yet
                time.sleep(0.05)
        assert writer is not None and _alive(instance), "the instance never read its config"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 10
        while _alive(instance) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(instance)
    finally:
        if _alive(instance):
            os.kill(instance, signal.SIGKILL)
        if writer is not None:
            os.close(writer)
