"""scripts/run-local.sh (`make run`): the environment its parts start with. The script runs for real on a
copy of itself, with a stand-in Python that writes out the environment the dev node would start with and
exits (so the script stops at once, as it does when a part dies), and a stand-in redis-server."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from conftest import ROOT, clean_env, free_port

FAKE_PYTHON = """#!/usr/bin/env bash
# port checks and health probes: "-" (a script on stdin) is a free port; the dev node writes its environment
if [ "$1" = "-" ]; then cat >/dev/null; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "devnode" ]; then env >"$ENV_OUT"; exit 1; fi
exit 1
"""


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def started_environment(tmp_path: Path, **exported: str) -> dict[str, str]:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "run-local.sh", tmp_path / "scripts" / "run-local.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "redis-server", "#!/usr/bin/env bash\nexec sleep 30\n")
    env = clean_env(PYTHON=str(executable(tmp_path / "python", FAKE_PYTHON)), ENV_OUT=str(tmp_path / "env"),
                    PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", REDIS_PORT=str(free_port()),
                    API_PORT=str(free_port()), DEVNODE_PORT=str(free_port()), **exported)
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "run-local.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "devnode stopped during start-up" in done.stderr, done.stderr
    return dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)


def test_make_run_ignores_exported_redis_settings(tmp_path):
    exported = {"REDIS_SENTINELS": "10.0.0.5:26379", "REDIS_SENTINEL_MASTER": "prod",
                "REDIS_SENTINEL_PASSWORD": "sentinel-secret", "REDIS_PASSWORD": "redis-secret",
                "REDIS_MIN_REPLICA_ACKS": "1", "REDIS_HOST": "redis.example", "REDIS_URL": "redis://10.0.0.6:6379/0"}
    env = started_environment(tmp_path, **exported)
    port = env["REDIS_PORT"]
    assert env["REDIS_URL"] == f"redis://127.0.0.1:{port}/0"  # its own redis-server
    for name in exported:
        if name != "REDIS_URL":
            assert name not in env, f"{name} reached the parts of make run"
