"""The container images, checked without a Docker engine (there is none here).

What can be checked offline is checked: every file the Dockerfiles COPY exists
and is inside the build context (.dockerignore), the package's own sources
are all copied, the images run as a non-root user and bake in no secret, pip
keeps no cache, and the entry points are the ones the pipeline calls.

The constraints file is checked against the environment the tests run in: the
whole dependency closure of the package (from the installed distributions'
metadata) must be pinned, at the installed version, and every pin must satisfy
every requirement on it, i.e. the pinned set is a consistent resolution. That
the same pins resolve on the package index is checked by
`make constraints-check` (network, minutes).
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from unifl.cluster.trainjob import IMAGE_USER_ID, distributed_stage_command

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "cpu": ROOT / "docker" / "Dockerfile.cpu",
    "cuda": ROOT / "docker" / "Dockerfile.cuda",
    "mlflow": ROOT / "docker" / "Dockerfile.mlflow",
}
PACKAGE_IMAGES = ("cpu", "cuda")
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

SECRET_WORDS = {
    "PASSWORD",
    "PASSWD",
    "SECRET",
    "TOKEN",
    "KEY",
    "CREDENTIAL",
    "CREDENTIALS",
    "PRIVATE",
}


def _looks_secret(name: str) -> bool:
    """A name with a word such as TOKEN or KEY (TOKENIZERS_PARALLELISM is fine)."""
    return bool(SECRET_WORDS & set(re.split(r"[^A-Z0-9]+", name.upper())))


# ---------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    keyword: str
    arguments: str
    flags: dict[str, str] = field(default_factory=dict)

    def words(self) -> list[str]:
        return shlex.split(self.arguments)


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile: continuation lines joined, comments dropped."""
    logical: list[str] = []
    buffer = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append(buffer + stripped)
        buffer = ""
    assert not buffer, f"{path}: dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        flags = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
        instruction = Instruction(keyword, rest.strip(), flags)
        if keyword == "FROM":
            words = instruction.words()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(base=words[0], name=name, instructions=[]))
        elif not stages:
            assert keyword == "ARG", f"{path}: {keyword} before the first FROM"
            arg_name, _, default = instruction.arguments.partition("=")
            global_args[arg_name] = default
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def _exec_form(instruction: Instruction) -> list[str]:
    import json

    value = json.loads(instruction.arguments)
    assert isinstance(value, list), f"{instruction.keyword} must use the exec (JSON) form"
    return value


def _dockerignore_patterns() -> list[re.Pattern[str]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not expected in .dockerignore"
        regex = ""
        for token in re.split(r"(\*\*/?|\*|\?)", line.strip("/")):
            if token in ("**", "**/"):
                regex += "(.*/)?" if token == "**/" else ".*"
            elif token == "*":
                regex += "[^/]*"
            elif token == "?":
                regex += "[^/]"
            else:
                regex += re.escape(token)
        patterns.append(re.compile(regex + "(/.*)?"))
    return patterns


def _ignored(relative: str, patterns: list[re.Pattern[str]]) -> bool:
    return any(pattern.fullmatch(relative) for pattern in patterns)


# ---------------------------------------------------------------- tests: Dockerfiles


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_copied_files_exist_inside_the_build_context(image: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[image])
    patterns = _dockerignore_patterns()
    copies = [item for stage in stages for item in stage.all("COPY") if "from" not in item.flags]
    assert copies
    for item in copies:
        *sources, _destination = item.words()
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"{image}: COPY {source} does not exist"
            assert not _ignored(source, patterns), f"{image}: COPY {source} is in .dockerignore"


def test_dockerignore_keeps_environments_caches_and_data_out() -> None:
    patterns = _dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".cache/unifl/toy/vae.safetensors",
        "runs/pefl/checkpoint-2/model.safetensors",
        "tests/fixtures/k8s/trainjob_succeeds.json",
        ".git/HEAD",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        ".env",
        "src/unifl/__pycache__/cli.cpython-311.pyc",
    ):
        assert _ignored(path, patterns), path
    for path in ("src/unifl/cli.py", "requirements/constraints.txt", "pyproject.toml"):
        assert not _ignored(path, patterns), path


@pytest.mark.parametrize("image", PACKAGE_IMAGES)
def test_package_images_copy_every_source_the_build_needs(image: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[image])
    copied = {
        source
        for stage in stages
        for item in stage.all("COPY")
        if "from" not in item.flags
        for source in item.words()[:-1]
    }
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "requirements/constraints.txt"}
    package_dirs = PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    needed |= {path for path in package_dirs if path}
    assert needed <= copied, f"{image}: not copied: {sorted(needed - copied)}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_final_stage_runs_as_the_unprivileged_user(image: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[image])
    final = stages[-1]
    users = final.all("USER")
    assert users, f"{image}: the final stage sets no USER (it would run as root)"
    uid, _, gid = users[-1].arguments.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid != "0"
    assert int(uid) == IMAGE_USER_ID, "the training jobs' securityContext expects this uid"
    created = " ".join(item.arguments for item in final.all("RUN"))
    assert f"--uid {uid}" in created, f"{image}: user {uid} is never created"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_no_secret_is_baked_in(image: str) -> None:
    global_args, stages = parse_dockerfile(DOCKERFILES[image])
    names = list(global_args)
    for stage in stages:
        for item in stage.all("ARG"):
            names.append(item.arguments.partition("=")[0])
        for item in stage.all("ENV"):
            names += [word.partition("=")[0] for word in item.words()]
    assert names and _looks_secret("AWS_SECRET_ACCESS_KEY") and _looks_secret("HF_TOKEN")
    leaked = [name for name in names if _looks_secret(name)]
    assert leaked == [], f"{image}: secret-looking ARG/ENV {leaked}"
    for stage in stages:
        for item in stage.all("COPY"):
            assert not any(
                ".env" in word or word.endswith((".pem", ".key")) for word in item.words()
            )


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_layers_stay_small(image: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[image])
    assert len(stages) >= 2, f"{image}: build in one stage, copy only the environment out"
    for stage in stages:
        for item in stage.all("RUN"):
            if "pip install" in item.arguments:
                assert "--no-cache-dir" in item.arguments, f"{image}: {item.arguments}"
    final = stages[-1]
    build_names = {stage.name for stage in stages[:-1]}
    final_copies = final.all("COPY")
    assert final_copies and all(item.flags.get("from") in build_names for item in final_copies)


@pytest.mark.parametrize("image", PACKAGE_IMAGES)
def test_entry_points_are_those_the_pipeline_calls(image: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[image])
    final = stages[-1]
    assert not final.all("ENTRYPOINT"), "components set the command; no ENTRYPOINT in the way"
    (cmd,) = final.all("CMD")
    assert _exec_form(cmd)[0] == "unifl"
    assert PYPROJECT["project"]["scripts"]["unifl"] == "unifl.cli:app"
    scripts = {
        entry.name: entry.value
        for entry in metadata.distribution("unifl").entry_points
        if entry.group == "console_scripts"
    }
    assert scripts["unifl"] == "unifl.cli:app"
    torch_scripts = {entry.name for entry in metadata.distribution("torch").entry_points}
    assert distributed_stage_command("pefl")[0] in torch_scripts
    env_path = [item.arguments for item in final.all("ENV") if "PATH=" in item.arguments]
    assert env_path and "/opt/unifl/bin" in env_path[0], "the venv's scripts must be on PATH"
    # `torchrun --module unifl.cli` runs the module as a script: it must start the app.
    result = subprocess.run(
        [sys.executable, "-m", "unifl.cli", "stage", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "stage" in result.stdout.lower()


# ---------------------------------------------------------------- tests: constraints


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, raw in enumerate(CONSTRAINTS.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.!]*)", line)
        assert match, f"{CONSTRAINTS.name}:{number}: expected name==version, got {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{CONSTRAINTS.name}:{number}: {name} pinned twice"
        pins[name] = match.group(2)
    return pins


def _installed_version(name: str) -> Version:
    return Version(Version(metadata.version(name)).public)


def _dependency_closure() -> dict[str, list[tuple[Requirement, str]]]:
    """Every distribution the package needs at run time, with the requirements on it."""
    required: dict[str, list[tuple[Requirement, str]]] = {}
    todo = [(Requirement(text), "pyproject") for text in PYPROJECT["project"]["dependencies"]]
    expanded: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirement, parent = todo.pop()
        name = canonicalize_name(requirement.name)
        required.setdefault(name, []).append((requirement, parent))
        key = (name, frozenset(requirement.extras))
        if key in expanded:
            continue
        expanded.add(key)
        extras = set(requirement.extras) | {""}
        for text in metadata.distribution(name).requires or []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in extras):
                todo.append((child, name))
    return required


def test_constraints_pin_the_whole_runtime_closure_at_installed_versions() -> None:
    pins = _pins()
    closure = _dependency_closure()
    assert len(closure) > 100  # torch, diffusers, mlflow, kfp, ... and their dependencies
    missing = sorted(name for name in closure if name not in pins)
    assert missing == [], f"not pinned (run `make constraints`): {missing}"
    stale = {
        name: (pins[name], str(_installed_version(name)))
        for name in closure
        if Version(pins[name]) != _installed_version(name)
    }
    assert stale == {}, f"pins differ from the environment (run `make constraints`): {stale}"


def test_pinned_versions_are_a_consistent_resolution() -> None:
    pins = _pins()
    conflicts = [
        f"{parent} requires {requirement}, pinned {pins[name]}"
        for name, requirements in _dependency_closure().items()
        for requirement, parent in requirements
        if not requirement.specifier.contains(Version(pins[name]), prereleases=True)
    ]
    assert conflicts == []


def test_torch_pin_agrees_everywhere() -> None:
    torch = _pins()["torch"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(rf"^TORCH \?= torch=={re.escape(torch)}$", makefile, re.M)
    cpu_stage = parse_dockerfile(DOCKERFILES["cpu"])[1][0]
    cuda_args, cuda_stages = parse_dockerfile(DOCKERFILES["cuda"])
    for instruction in cpu_stage.all("ARG") + cuda_stages[0].all("ARG"):
        name, _, default = instruction.arguments.partition("=")
        if name == "TORCH_VERSION":
            assert default == torch
    assert cuda_args["CUDA_BASE_IMAGE"].startswith(f"pytorch/pytorch:{torch}-cuda")
    assert "+" not in torch, "the local build tag (+cpu) belongs to the image, not the pin"


def test_mlflow_server_image_matches_the_pipeline_and_the_manifest() -> None:
    pins = _pins()
    server = {}
    for line in (ROOT / "requirements" / "mlflow-server.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            server[canonicalize_name(name)] = version
    assert server["mlflow"] == pins["mlflow"]
    for name, version in server.items():
        if name in pins:
            assert pins[name] == version, name
    assert {"psycopg2-binary", "boto3"} <= set(server)
    deployment = next(
        doc
        for doc in yaml.safe_load_all((ROOT / "k8s" / "base" / "mlflow.yaml").read_text())
        if doc["kind"] == "Deployment"
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"unifl-mlflow:{server['mlflow']}"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "-t $(IMAGE)-mlflow:$(MLFLOW_VERSION)" in makefile
