"""The deployment files, checked statically (no Docker engine here): docker-compose.yml, Dockerfile,
Dockerfile.gpu and .dockerignore parse; every service, volume and health check is there; every HSC_*
variable they set is a field of Settings and validates; every command they run exists in the hsc CLI;
the API image's package list covers what hsc.core and hsc.service import; the health-check programs
run against a real HTTP server and a real Redis. Plus the shipped demo checkpoint against its README.
"""

from __future__ import annotations

import ast
import hashlib
import http.server
import importlib.metadata as md
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from hsc.core.cli import build_parser
from hsc.core.queue import worker_key
from hsc.core.settings import DEMO_CHECKPOINT, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
REDIS_TEST_URL = "redis://127.0.0.1:6379/15"
PYPROJECT_TEXT = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11 only)


# --------------------------------------------------------------------------------------------------
# helpers


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    assert not pending, f"{name}: a continuation line at the end"
    return out


def _env_of(args: str) -> dict[str, str]:
    """``ENV A=1 B=2`` (the only form used here) as a dict."""
    pairs = shlex.split(args)
    assert all("=" in p for p in pairs), f"ENV {args!r}: use KEY=value pairs"
    return dict(p.split("=", 1) for p in pairs)


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` with NAME unset: the default."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def _service_env(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment: use the mapping form"
    return {str(k): None if v is None else str(v) for k, v in env.items()}


def _settings_field(var: str) -> str | None:
    if not var.startswith("HSC_"):
        return None
    name = var[len("HSC_") :].lower()
    return name if name in Settings.model_fields else None


def _validate_settings(env: dict[str, str], where: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for var in list(os.environ):
        if var.startswith("HSC_"):
            monkeypatch.delenv(var)
    for var, value in env.items():
        assert _settings_field(var), f"{where}: {var} is not a field of hsc.core.settings.Settings"
        monkeypatch.setenv(var, value)
    return Settings()


def _health_code(service: str) -> str:
    test = _compose()["services"][service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], f"{service}: health check is not a python program"
    code = test[3]
    assert "$" not in code, f"{service}: compose would interpolate '$' in the health check"
    compile(code, f"<{service} healthcheck>", "exec")
    return code


def _run_python(code: str, env: dict[str, str], prelude: str = "") -> int:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HSC_")} | env
    return subprocess.run(
        [sys.executable, "-c", prelude + code], env=full_env, capture_output=True, timeout=60
    ).returncode


# --------------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_has_every_service_volume_and_health_check():
    c = _compose()
    services = c["services"]
    assert set(services) == {"redis", "api", "worker", "cvat-gateway"}
    assert services["cvat-gateway"]["profiles"] == ["cvat"], "the CVAT gateway is opt-in"
    assert set(c["volumes"]) == {"redis-data", "checkpoints", "datasets", "results"}
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: no health check"
        for key in ("interval", "timeout", "retries"):
            assert key in hc, f"{name}: health check without {key}"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            assert source in c["volumes"], f"{name}: volume {source!r} is not declared"

    mounts = {
        n: {m.split(":")[1]: m.split(":")[0] for m in s.get("volumes", [])} for n, s in services.items()
    }
    # API and worker see job results, uploads and datasets at the same paths
    for path in ("/data/results", "/data/datasets"):
        assert mounts["api"][path] == mounts["worker"][path] == mounts["cvat-gateway"][path]
    assert mounts["worker"]["/checkpoints"] == "checkpoints"
    assert mounts["redis"]["/data"] == "redis-data"

    redis_cmd = services["redis"]["command"]
    assert redis_cmd[0] == "redis-server"
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes", "Redis without AOF persistence"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name in ("api", "worker", "cvat-gateway"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["build"]["dockerfile"] == "Dockerfile"
    assert services["worker"]["build"]["dockerfile"] == "Dockerfile.gpu"


@pytest.mark.parametrize("service", ["api", "worker", "cvat-gateway"])
def test_compose_settings_are_hsc_fields_that_validate(service, monkeypatch):
    env = _service_env(_compose()["services"][service])
    assert env, f"{service}: no environment"
    for var in env:
        assert _settings_field(var), f"{service}: {var} is not a field of hsc.core.settings.Settings"
    # what the container gets when the shell sets none of the pass-through variables
    given = {k: _interpolate(v) for k, v in env.items() if v is not None}
    s = _validate_settings(given, service, monkeypatch)
    assert s.redis_url == "redis://redis:6379/0" and not s.embedded
    assert str(s.results_dir) == "/data/results"
    assert s.allowed_roots == ["/data/datasets"]
    if service == "api":
        assert (s.host, s.port) == ("0.0.0.0", 8000)
    elif service == "worker":
        assert (s.device, s.worker_pool) == ("cuda", "solo")


def test_compose_interpolates_only_settings_or_compose_variables():
    text = COMPOSE.read_text()
    names = {m.group(1) for m in _INTERPOLATION.finditer(text)}
    assert names, "expected ${...} defaults in docker-compose.yml"
    for name in names:
        if name.startswith("HSC_"):
            assert _settings_field(name), f"${{{name}}} is not a field of Settings"
    # a non-HSC variable may only shape the compose file itself (the published port), never a setting
    for svc in _compose()["services"].values():
        for value in _service_env(svc).values():
            for m in _INTERPOLATION.finditer(value or ""):
                assert m.group(1).startswith("HSC_")


@pytest.mark.parametrize(
    "service,subcommand", [("api", "serve"), ("worker", "worker"), ("cvat-gateway", "cvat-gateway")]
)
def test_compose_commands_exist_in_the_cli(service, subcommand):
    cmd = _compose()["services"][service]["command"]
    assert cmd[0] == "hsc"
    args = build_parser().parse_args(cmd[1:])
    assert args.command == subcommand and callable(args.handler)


def test_cli_serve_and_worker_options():
    p = build_parser()
    a = p.parse_args(
        ["serve", "--host", "0.0.0.0", "--port", "8001", "--checkpoint", "a.pth", "--checkpoint", "b"]
    )
    assert (a.command, a.host, a.port, a.checkpoints) == ("serve", "0.0.0.0", 8001, ["a.pth", "b"])
    w = p.parse_args(["worker", "--checkpoint", "x.safetensors", "--redis-url", "redis://r:6379/0"])
    assert (w.command, w.checkpoints, w.redis_url) == ("worker", ["x.safetensors"], "redis://r:6379/0")
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--no-such-option"])


# --------------------------------------------------------------------------------------------------
# health-check programs, run for real


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[http.server.HTTPServer, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_api_health_check_program(health_server):
    server, handler = health_server
    code = _health_code("api")
    env = {"HSC_PORT": str(server.server_address[1])}
    assert _run_python(code, env) == 0
    handler.status = 503
    assert _run_python(code, env) == 1
    server.shutdown()
    server.server_close()
    assert _run_python(code, env) == 1  # nothing listening


def test_worker_health_check_program():
    code = _health_code("worker")
    host = f"deploytest-{uuid.uuid4().hex[:12]}"
    prelude = f"import socket\nsocket.gethostname = lambda: {host!r}\n"
    env = {"HSC_REDIS_URL": REDIS_TEST_URL}
    client = redis.Redis.from_url(REDIS_TEST_URL)
    key = worker_key(f"hsc@{host}")
    try:
        assert _run_python(code, env, prelude) == 1  # no heartbeat
        client.set(key, json.dumps({"hostname": f"hsc@{host}", "models": []}), ex=60)
        assert _run_python(code, env, prelude) == 1  # heartbeat without a loaded model
        client.set(key, json.dumps({"hostname": f"hsc@{host}", "models": [{"id": "m"}]}), ex=60)
        assert _run_python(code, env, prelude) == 0
        assert _run_python(code, {"HSC_REDIS_URL": "redis://127.0.0.1:1/0"}, prelude) == 1  # no Redis
    finally:
        client.delete(key)
        client.close()


# --------------------------------------------------------------------------------------------------
# Dockerfiles and .dockerignore


def _requirements_in(args: str) -> list[Requirement]:
    """The requirement specifiers among the words of a ``pip install``/``pip wheel`` command."""
    words = [w for w in shlex.split(args) if w not in ("pip", "install", "wheel")]
    return [Requirement(w) for w in words if re.match(r"[A-Za-z0-9][\w.-]*(\[[\w,]+\])?([<>=!~].*)?$", w)]


def _pyproject_deps() -> dict[str, Requirement]:
    """The installed hsc's run-time requirements (pyproject.toml's ``dependencies``, no extras)."""
    reqs = [Requirement(t) for t in md.requires("hsc") or []]
    return {canonicalize_name(r.name): r for r in reqs if r.marker is None}


def _package_dirs() -> set[str]:
    """The folders pyproject.toml maps into the hsc namespace (``package-dir``)."""
    line = next(ln for ln in PYPROJECT_TEXT.splitlines() if ln.startswith("package-dir"))
    return set(re.findall(r'"hsc\.\w+"\s*=\s*"([^"]+)"', line))


def _api_requirements() -> list[Requirement]:
    runs = [a for i, a in _dockerfile("Dockerfile") if i == "RUN" and a.startswith("pip install")]
    listed = [a for a in runs if "--no-deps" not in a]
    assert len(listed) == 1, "Dockerfile: expected one `pip install` of the API's packages"
    assert any("--no-deps ." in a for a in runs), "Dockerfile: the package must be installed with --no-deps"
    return _requirements_in(listed[0])


def _closure(reqs: list[Requirement]) -> set[str]:
    """Installed distributions the requirements pull in (extras honoured), by canonical name."""
    seen: set[str] = set()
    todo = [(r.name, frozenset(r.extras)) for r in reqs]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        dist = md.distribution(name)
        seen.add(key)
        for text in dist.requires or []:
            r = Requirement(text)
            if r.marker and not any(r.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            if canonicalize_name(r.name) not in seen:
                todo.append((r.name, frozenset(r.extras)))
    return seen


def _third_party_imports(package: str) -> dict[str, str]:
    """Top-level third-party modules imported anywhere in a package (also inside functions)."""
    out: dict[str, str] = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top != "hsc" and top not in sys.stdlib_module_names and top != "__future__":
                    out.setdefault(top, f"{f.relative_to(ROOT)}:{node.lineno}")
    return out


def test_api_image_packages_match_pyproject_and_leave_torch_out():
    deps = _pyproject_deps()
    listed = _api_requirements()
    for r in listed:
        key = canonicalize_name(r.name)
        assert key in deps, f"Dockerfile installs {r.name}, not a dependency in pyproject.toml"
        assert str(r) == str(deps[key]), f"Dockerfile has {r}, pyproject.toml {deps[key]}"
    names = {canonicalize_name(r.name) for r in listed}
    assert not names & {"torch", "pydensecrf2", "safetensors"}, "the API image must not carry the model stack"


def test_api_image_packages_cover_what_core_and_service_import():
    provided = _closure(_api_requirements())
    module_dists = md.packages_distributions()
    missing = []
    for package in ("core", "service"):
        for module, where in _third_party_imports(package).items():
            dists = {canonicalize_name(d) for d in module_dists.get(module, [])}
            if not dists & provided:
                missing.append(f"{where} imports {module} ({sorted(dists) or 'not installed'})")
    assert not missing, "the API image (Dockerfile) lacks: " + "; ".join(missing)


def test_api_dockerfile():
    instrs = _dockerfile("Dockerfile")
    base = next(a for i, a in instrs if i == "FROM")
    assert base.startswith("python:3.") and "slim" in base and "cuda" not in base
    env: dict[str, str] = {}
    for i, a in instrs:
        if i == "ENV":
            env |= _env_of(a)
    cmd = json.loads(next(a for i, a in reversed(instrs) if i == "CMD"))
    assert cmd[:2] == ["hsc", "serve"] and build_parser().parse_args(cmd[1:]).command == "serve"
    assert "8000" in next(a for i, a in instrs if i == "EXPOSE")
    assert env["HSC_PORT"] == "8000"


def test_gpu_dockerfile():
    instrs = _dockerfile("Dockerfile.gpu")
    args = dict(a.split("=", 1) for i, a in instrs if i == "ARG" and "=" in a)
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-runtime", args["BASE"])
    assert m, f"Dockerfile.gpu: BASE {args['BASE']} is not a CUDA runtime image of pytorch/pytorch"
    assert m.group(1) in SpecifierSet(str(_pyproject_deps()["torch"].specifier)), "base torch too old"
    froms = [a for i, a in instrs if i == "FROM"]
    assert froms == ["${BASE} AS wheels", "${BASE}"]
    runs = " ".join(a for i, a in instrs if i == "RUN")
    assert "build-essential" in runs, "pydensecrf2 compiles C++: the build stage needs g++"
    wheel = next(a for i, a in instrs if i == "RUN" and "pip wheel" in a)
    crf = next(r for r in _requirements_in(wheel.split("pip wheel", 1)[1]) if r.name == "pydensecrf2")
    assert str(crf) == str(_pyproject_deps()["pydensecrf2"])
    env: dict[str, str] = {}
    for i, a in instrs:
        if i == "ENV":
            env |= {k: v for k, v in _env_of(a).items() if k.startswith("HSC_")}
    assert env["HSC_DEVICE"] == "cuda"
    cmd = json.loads(next(a for i, a in reversed(instrs) if i == "CMD"))
    assert cmd[:2] == ["hsc", "worker"] and build_parser().parse_args(cmd[1:]).command == "worker"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_settings_validate(name, monkeypatch):
    env: dict[str, str] = {}
    for i, a in _dockerfile(name):
        if i == "ENV":
            env |= {k: v for k, v in _env_of(a).items() if k.startswith("HSC_")}
    assert env
    _validate_settings(env, name, monkeypatch)


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        out.append((negate, re.compile(rx.strip("/"))))
    return out


def _ignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, rx in _ignore_patterns():
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_copies_the_package_and_dockerignore_keeps_it(name):
    copied = set()
    for i, a in _dockerfile(name):
        if i == "COPY" and not a.startswith("--from"):
            *sources, _dest = shlex.split(a)
            for s in sources:
                assert (ROOT / s).exists(), f"{name}: COPY {s}: no such file"
                assert not _ignored(s), f"{name}: COPY {s}, but .dockerignore excludes it"
                copied.add(s)
    readme = re.search(r'^readme = "([^"]+)"', PYPROJECT_TEXT, re.M)
    assert readme and _package_dirs() == {"model", "training", "worker", "service", "core"}
    assert _package_dirs() | {"pyproject.toml", readme.group(1)} <= copied
    demo = DEMO_CHECKPOINT.relative_to(ROOT).as_posix()
    assert demo.startswith("core/assets/") and not _ignored(demo), "the demo checkpoint must reach the image"
    for bulky in (".git/HEAD", ".venv/bin/python", "tests/conftest.py", "runs/x/final.safetensors", "a.pth"):
        assert _ignored(bulky), f".dockerignore lets {bulky} into the build context"


# --------------------------------------------------------------------------------------------------
# the shipped demo checkpoint


def test_demo_checkpoint_is_small_loads_and_matches_its_readme():
    readme = (DEMO_CHECKPOINT.parent / "README.md").read_text()
    data = DEMO_CHECKPOINT.read_bytes()
    assert len(data) < 10 * 1024 * 1024, "the demo checkpoint should be a few MB"
    assert hashlib.sha256(data).hexdigest() in readme, "core/assets/README.md: sha256 out of date"
    assert f"{len(data):,}" in readme, "core/assets/README.md: size out of date"
    from hsc.model.checkpoint import load_checkpoint

    ck = load_checkpoint(DEMO_CHECKPOINT)
    assert ck.info.net.width == 0.125
    assert 0.0 < ck.info.bg_threshold < 1.0
    t = re.search(r"^default background threshold: ([0-9.]+)$", readme, re.M)
    assert t and float(t.group(1)) == ck.info.bg_threshold, "core/assets/README.md: threshold out of date"
    m = re.search(r"^classes: (\[.*\])$", readme, re.M)
    assert m, "core/assets/README.md: no `classes: [...]` line"
    assert list(ck.class_names) == json.loads(m.group(1))
