"""Run a pipeline on this machine with `kfp.local`: the embedded default of `unifl run`.

The same pipeline graph and components as on Kubeflow, executed by KFP's local
`SubprocessRunner` in this Python environment (no containers): the toy world (bootstrap
cached by configuration), simulated annotators, and MLflow on a local SQLite file. What
differs from a cluster is only what has no meaning here: Kubernetes placement (ignored by
the local runner) and the checkpoint volume (a local directory instead).

Layout of `out_dir` (default `<project.work_dir>/local`), shared by successive runs so the
MLflow UI shows their history and the promotion gates find the previous champion:

    run.lock             held by the run using the directory: one run at a time
    mlflow.db            the tracking and registry database (SQLite)
    mlartifacts/         MLflow's artifact store
    pipeline_root/       KFP's outputs, one directory per run and task
    kfp-cache/           KFP's cache of the data steps
    checkpoints/         the training steps' work and checkpoints, per run id and stage
    logs/<run id>.log    everything the steps printed; a resumed run (same run id) appends

Invalid parameters are reported before anything starts, naming the parameter; so is an
unreachable MLflow server, and a directory that another run is using.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from unifl.config import ConfigError, Params, TrackingConfig
from unifl.orchestration.parameters import (
    PIPELINE_NAMES,
    PIPELINE_PARAMETERS,
    resolve_run_parameters,
)
from unifl.orchestration.summary import RunSummary, summarize_run
from unifl.tracking.redaction import redact_url_credentials, safe_params_yaml

SUBPROCESS_ENV: dict[str, str] = {
    # Spin-waiting OpenMP threads make a busy 2-core machine 10-20x slower.
    "OMP_WAIT_POLICY": "PASSIVE",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}
"""Set for the step subprocesses (kept when already set)."""


class LocalRunError(RuntimeError):
    """The local run failed; the message names the step and where its log is."""


@dataclass(frozen=True)
class LocalLayout:
    """Where a local run keeps everything (see the module docstring)."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.database}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def pipeline_root(self) -> Path:
        return self.root / "pipeline_root"

    @property
    def cache_root(self) -> Path:
        return self.root / "kfp-cache"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def lock_file(self) -> Path:
        return self.root / "run.lock"

    def log_file(self, run_id: str) -> Path:
        return self.root / "logs" / f"{run_id}.log"


@contextlib.contextmanager
def exclusive_use(layout: LocalLayout, run_id: str) -> Iterator[None]:
    """Hold the layout's lock for a run: a second run in the same directory fails at once.

    Successive runs share the directory (MLflow history, the KFP cache), but a run finds its
    outputs as the pipeline root's new directory, which only holds while it is alone there.
    The lock is an `flock` on `run.lock`, released by the kernel when this process ends, so
    a killed run leaves nothing to clean up; the file names the holder for the error.
    """
    import fcntl

    layout.root.mkdir(parents=True, exist_ok=True)
    with layout.lock_file.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            raise LocalRunError(
                f"{layout.root} is in use by another run ({holder or 'unknown'}): wait for it "
                "to finish or pass another output directory (--out)"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()}, pipeline run id {run_id}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def new_run_id() -> str:
    """A local pipeline run id: sortable by time, unique."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"local-{stamp}-{uuid.uuid4().hex[:6]}"


def local_params(params: Params, layout: LocalLayout) -> Params:
    """The configuration a local run uses: MLflow on the layout's SQLite file unless another
    tracking URI was configured explicitly, and absolute cache paths (steps run as
    subprocesses, possibly elsewhere)."""
    resolved = params.model_copy(deep=True)
    default_uri = TrackingConfig.model_fields["tracking_uri"].default
    if resolved.tracking.tracking_uri == default_uri:
        resolved.tracking.tracking_uri = layout.tracking_uri
    resolved.bootstrap.cache_dir = str(Path(resolved.bootstrap.cache_dir).resolve())
    return resolved


def check_local_inputs(
    pipeline: str, prompt_source: str, labels_export: str, pairs_uri: str, prompts_uri: str
) -> None:
    """Files named by the run's parameters must exist before anything starts."""
    for part in (p.strip() for p in prompt_source.split(",") if p.strip()):
        if not Path(part).is_file():
            raise ConfigError(f"pipeline parameter 'prompt_source': {part} not found")
    if labels_export and not Path(labels_export).is_file():
        raise ConfigError(f"pipeline parameter 'labels_export': {labels_export} not found")
    if pipeline == "train":
        for name, value in (("pairs_uri", pairs_uri), ("prompts_uri", prompts_uri)):
            if not value:
                raise ConfigError(
                    f"pipeline parameter {name!r} is required by the train pipeline: the "
                    "output of a collect run (see `unifl run --pipeline collect`)"
                )
            if not Path(value).exists():
                raise ConfigError(f"pipeline parameter {name!r}: {value} not found")


def latest_collect_outputs(layout: LocalLayout) -> tuple[str, str]:
    """The pairs and prompts of the newest local collect run, for a following train run."""
    from unifl.orchestration.summary import task_outputs

    runs = sorted(layout.pipeline_root.glob("unifl-collect-*"), key=lambda p: p.stat().st_mtime)
    for run_dir in reversed(runs):
        outputs = task_outputs(run_dir)
        pairs = outputs.get(("generate-pairs", "pairs"))
        prompts = outputs.get(("curate-prompts", "prompts"))
        if pairs and prompts and pairs.exists() and prompts.exists():
            return str(pairs), str(prompts)
    return "", ""


def prepare_tracking(params: Params, layout: LocalLayout) -> None:
    """Fail now if MLflow cannot be used; give a new local experiment its artifact store."""
    from unifl.tracking.runs import connect, tracking_errors

    client = connect(params.tracking)
    uri = params.tracking.tracking_uri
    if uri.startswith("sqlite:"):
        with tracking_errors(uri):
            if client.get_experiment_by_name(params.tracking.experiment) is None:
                layout.artifacts.mkdir(parents=True, exist_ok=True)
                client.create_experiment(
                    params.tracking.experiment, artifact_location=layout.artifacts.as_uri()
                )


def tracking_credentials_env(tracking_uri: str) -> dict[str, str]:
    """The login of a tracking URI with credentials, as MLflow's environment variables.

    The steps get the configuration with URL credentials redacted (it lands in logs and
    artifacts); locally they run as subprocesses of this one and find the login here.
    """
    from urllib.parse import unquote, urlsplit

    from unifl.cluster.settings import MLFLOW_CREDENTIAL_KEYS

    parts = urlsplit(tracking_uri)
    if parts.username is None or parts.password is None:
        return {}
    username, password = MLFLOW_CREDENTIAL_KEYS
    return {username: unquote(parts.username), password: unquote(parts.password)}


def _task_names(pipeline: Any) -> tuple[dict[str, str], int]:
    """Task key -> display name over the whole graph, and the number of executed tasks."""
    spec = pipeline.pipeline_spec
    names: dict[str, str] = {}
    dags = [spec.root.dag] + [c.dag for c in spec.components.values() if c.HasField("dag")]
    for dag in dags:
        for key, task in dag.tasks.items():
            names[key] = task.task_info.name or key
    return names, len(spec.deployment_spec["executors"])


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '?([\w-]+)'?")
_DONE = re.compile(
    r"Task '?([\w-]+)'? (?:finished with status (\w+)|cache hit)|Skipping task ([\w-]+)"
)
_INNER_BAR = re.compile(r"^\s*([^|:]{1,40}):\s+(\d+)%\|[^|]*\|\s*(\d+)/(\d+)")
"""A step's own progress bar (tqdm), e.g. `pefl:  18%|##  | 35/200 [...]`: shown beside
the bar of the steps, since the steps' subprocess output reaches us line by line."""


class _ProgressStream(io.TextIOBase):
    """Receives everything the local runner prints: writes it to the log, moves the bar."""

    def __init__(self, log: TextIO, bar: Any, names: Mapping[str, str]) -> None:
        self.log = log
        self.bar = bar
        self.names = names
        self.buffer_text = ""
        self.failed: list[str] = []
        self.done: set[str] = set()
        self.log_start = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        self.buffer_text += text
        *lines, self.buffer_text = self.buffer_text.split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def _line(self, line: str) -> None:
        inner = _INNER_BAR.match(line)
        if inner:
            name, _, done, total = inner.groups()
            self.bar.set_postfix_str(f"{name.strip()} {done}/{total}", refresh=True)
            return
        started = _STARTED.search(line)
        if started and "Streamed logs" not in line:
            key = started.group(1)
            self.bar.set_postfix_str("", refresh=False)
            self.bar.set_description_str(self.names.get(key, key))
            return
        done = _DONE.search(line)
        if done:
            key = done.group(1) or done.group(3)
            status = done.group(2)
            if status and status != "SUCCESS":
                self.failed.append(key)
            if key not in self.done:
                self.done.add(key)
                self.bar.update(1)


@contextlib.contextmanager
def _captured(
    log_file: Path, header: str, total: int, names: Mapping[str, str], progress: bool
) -> Iterator[Any]:
    """Everything printed goes to `log_file`, appended: a resumed run keeps the log of the
    attempt before it. `stream.log_start` is where this attempt's part begins."""
    from tqdm.auto import tqdm

    log_file.parent.mkdir(parents=True, exist_ok=True)
    with (
        log_file.open("a", encoding="utf-8") as log,
        tqdm(total=total, unit="step", disable=not progress, file=sys.stderr) as bar,
    ):
        log_start = log.tell()
        log.write(("\n" if log_start else "") + header + "\n")
        log.flush()
        stream = _ProgressStream(log, bar, names)
        stream.log_start = log_start
        with contextlib.redirect_stdout(stream), warnings.catch_warnings():
            # The local runner warns for every Kubernetes-only setting and for a base image
            # without "python" in its name; both are expected here.
            warnings.filterwarnings("ignore", message=".*have no effect in the current local")
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image")
            yield stream


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _absent_optional_inputs_left_out() -> Iterator[None]:
    """Leave an optional input the task was not given out of its executor input.

    kfp.local (2.17) fills such an input with the component's empty default and then
    casts every integer input with `int()`, which fails on it before the step starts (the
    collect pipeline does not give `resolve-config` the training steps' counts). On a
    cluster the input is left out and the function's default (None) applies: do the same.
    """
    from kfp.local import executor_input_utils

    original = executor_input_utils.executor_input_to_dict

    def without_absent(executor_input: Any, component_spec: Any) -> dict[str, Any]:
        values = executor_input.inputs.parameter_values
        for name in [name for name, value in values.items() if value.WhichOneof("kind") is None]:
            del values[name]
        return original(executor_input=executor_input, component_spec=component_spec)

    executor_input_utils.executor_input_to_dict = without_absent
    try:
        yield
    finally:
        executor_input_utils.executor_input_to_dict = original


def run_local(
    params: Params,
    pipeline: str = "full",
    out_dir: str | Path | None = None,
    pipeline_run_id: str | None = None,
    prompt_source: str = "",
    labels_export: str = "",
    pairs_uri: str = "",
    prompts_uri: str = "",
    cache: bool = True,
    progress: bool = True,
    on_start: Callable[[str, Path], None] | None = None,
) -> RunSummary:
    """Run pipeline `pipeline` (full, collect, train) locally and summarize what it produced.

    Everything that can be checked is checked before the first step starts: the run's
    parameters (as the pipeline's first step resolves them), input files, MLflow, and that
    no other run uses `out_dir` (`exclusive_use`). Then `on_start(run id, log file)` is
    called, before the first step: the run id is what resumes an interrupted run.
    """
    if pipeline not in PIPELINE_NAMES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; expected one of {PIPELINE_NAMES}")
    layout = LocalLayout(Path(out_dir or Path(params.project.work_dir) / "local").resolve())
    run_id = pipeline_run_id or new_run_id()
    with exclusive_use(layout, run_id):
        return _run_locked(
            params,
            pipeline,
            layout,
            run_id,
            prompt_source,
            labels_export,
            pairs_uri,
            prompts_uri,
            cache,
            progress,
            on_start,
        )


def _run_locked(
    params: Params,
    pipeline: str,
    layout: LocalLayout,
    run_id: str,
    prompt_source: str,
    labels_export: str,
    pairs_uri: str,
    prompts_uri: str,
    cache: bool,
    progress: bool,
    on_start: Callable[[str, Path], None] | None,
) -> RunSummary:
    import kfp.local

    from unifl.pipelines.unifl_pipelines import PIPELINE_IDS, build_pipeline

    params = local_params(params, layout)
    if pipeline == "train" and not (pairs_uri and prompts_uri):
        found_pairs, found_prompts = latest_collect_outputs(layout)
        pairs_uri, prompts_uri = pairs_uri or found_pairs, prompts_uri or found_prompts
    check_local_inputs(pipeline, prompt_source, labels_export, pairs_uri, prompts_uri)
    if pipeline != "full" and not (params.labeling.url or os.environ.get("LABEL_STUDIO_URL")):
        raise ConfigError(
            f"pipeline parameter 'label_studio_url': the {pipeline} pipeline talks to Label "
            "Studio; start one (`unifl labeling serve`) and pass --set labeling.url=URL "
            "--set labeling.token_file=FILE"
        )
    # The steps' inputs are written to the pipeline root and the log: no URL credentials.
    params_yaml = safe_params_yaml(params)
    # What the first step will do, done here too: a bad value stops the run before any work.
    resolve_run_parameters(params_yaml, [], {}, label_studio_from_env=pipeline != "full")
    prepare_tracking(params, layout)

    # The local runner needs a value for every parameter: the configured ones.
    arguments: dict[str, Any] = {
        parameter.name: parameter.default(params)
        for parameter in PIPELINE_PARAMETERS
        if pipeline in parameter.pipelines
    }
    arguments = {
        name: redact_url_credentials(value) if isinstance(value, str) else value
        for name, value in arguments.items()
    }
    arguments.update(params_yaml=params_yaml, pipeline_run_id=run_id)
    if pipeline != "train":
        arguments["prompt_source"] = prompt_source
    if pipeline == "full":
        arguments["labels_export"] = labels_export
    if pipeline == "train":
        arguments.update(pairs_uri=pairs_uri, prompts_uri=prompts_uri)

    layout.checkpoints.mkdir(parents=True, exist_ok=True)
    pipeline_func = build_pipeline(pipeline, params, checkpoint_root=str(layout.checkpoints))
    names, total = _task_names(pipeline_func)
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(layout.pipeline_root),
        raise_on_error=True,
        enable_caching=cache,
        cache_root=str(layout.cache_root),
    )
    existing = set(layout.pipeline_root.glob("*")) if layout.pipeline_root.exists() else set()
    log_file = layout.log_file(run_id)
    if on_start is not None:
        on_start(run_id, log_file)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    header = f"==== {PIPELINE_IDS[pipeline]}, pipeline run id {run_id}, started {stamp} ===="
    started = time.perf_counter()
    error: BaseException | None = None
    environment = {**SUBPROCESS_ENV, **tracking_credentials_env(params.tracking.tracking_uri)}
    with (
        _environment(environment),
        _absent_optional_inputs_left_out(),
        _captured(log_file, header, total, names, progress) as stream,
    ):
        try:
            pipeline_func(**arguments)
        except Exception as exc:
            error = exc
    seconds = time.perf_counter() - started
    new_dirs = sorted(set(layout.pipeline_root.glob("*")) - existing)
    run_dir = new_dirs[-1] if new_dirs else layout.pipeline_root
    if error is not None or stream.failed:
        failed = ", ".join(names.get(key, key) for key in stream.failed) or "a step"
        tail = _log_tail(log_file, start=stream.log_start)
        reason = f"\n{type(error).__name__}: {error}" if error is not None else ""
        raise LocalRunError(
            f"{PIPELINE_IDS[pipeline]} failed in {failed} after {seconds:.0f} s "
            f"(pipeline run id {run_id}); full log: {log_file}\n{tail}{reason}"
        )
    shown_uri = redact_url_credentials(params.tracking.tracking_uri)
    return summarize_run(PIPELINE_IDS[pipeline], run_id, run_dir, shown_uri, seconds, log_file)


def _log_tail(log_file: Path, lines: int = 25, start: int = 0) -> str:
    """The failing step's traceback from the log from byte `start` on (this attempt's part),
    the executor's JSON dumps left out."""
    try:
        with log_file.open("rb") as handle:
            handle.seek(start)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [_ANSI.sub("", line).rstrip() for line in text.splitlines() if "\r" not in line]
    starts = [index for index, line in enumerate(kept) if "Traceback (most recent call" in line]
    if starts:
        block = []
        for line in kept[starts[-1] :]:
            if "finished with status" in line:
                break
            block.append(line.strip() if not line.startswith("        ") else line[4:])
        return "\n".join(block[-lines:])
    plain = [
        line for line in kept if line.strip() and not line.lstrip().startswith(('"', "{", "}", "]"))
    ]
    return "\n".join(plain[-lines:])
