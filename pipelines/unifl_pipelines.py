"""The three pipelines: unifl-collect, unifl-train and unifl-full.

* unifl-collect: curate prompts -> validate -> generate pairs -> push tasks to Label
  Studio. People annotate for days afterwards; no pod waits for them.
* unifl-train: pull labels -> validate -> reward models -> PeFL -> decoupled FL ->
  adversarial FL -> evaluate -> promotion gate. The pairs and prompts of the collect run
  are imported by URI (the run's artifacts, shown in the Kubeflow UI).
* unifl-full: both in one run, labelled by simulated annotators or an existing export.

Every run starts with `resolve-config` (validates the parameters, opens the MLflow parent
run) and ends with `finish-tracking` (an exit handler closing the parent run, whatever
happened). Placement and robustness:

* GPU steps (pair generation, reward training, the three feedback stages, evaluation) use
  the CUDA image, request `gpu_count` x `gpu_type`, run on the GPU node pool
  (`gpu_node_selector`, `gpu_tolerations`) and get a memory-backed /dev/shm (PyTorch data
  loaders and NCCL need more than the container default of 64 MB). CPU steps request none.
* Training steps are retried after a pod failure and resume from their checkpoints, which
  live on the checkpoint PersistentVolumeClaim mounted at `pipeline.checkpoint_root`, in a
  directory per pipeline run and stage (the output artifact itself is only uploaded after
  success, so it cannot hold checkpoints). Caching is off for them and for every step
  that talks to MLflow or Label Studio; the pure data steps (toy bootstrap, curation,
  validation, pair generation, simulated labels) are cached, and get only the data
  sections of the configuration so that a new learning rate does not invalidate them.
* Secrets (the Label Studio token, S3 and MLflow credentials) come from Kubernetes Secrets
  as environment variables; endpoints from the `unifl-endpoints` ConfigMap. No secret is
  ever a parameter.

`build_pipeline(name, params, image)` returns the pipeline function with its parameters'
defaults and descriptions taken from `params`; `unifl.pipelines.compile` writes them.
"""

# KFP reads parameter types from the signatures: no postponed annotations, and optional
# parameters as typing.Optional (it does not read `X | None`).
# ruff: noqa: UP045

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from kfp import dsl, kubernetes

from unifl.cluster.settings import MLFLOW_CREDENTIAL_KEYS, MLFLOW_CREDENTIALS_SECRET
from unifl.components import build_components, default_image, gpu_image_for
from unifl.config import Params
from unifl.orchestration.parameters import (
    PARAMETERS_BY_NAME,
    parameter_defaults,
    parameter_description,
)

PIPELINE_IDS: dict[str, str] = {
    "full": "unifl-full",
    "collect": "unifl-collect",
    "train": "unifl-train",
}
"""`unifl run --pipeline NAME` -> the pipeline's name in Kubeflow."""

PIPELINE_DESCRIPTIONS: dict[str, str] = {
    "full": "UniFL end to end: curate prompts, generate pairs, label them (simulated annotators "
    "or an existing export), train reward models, PeFL, decoupled and adversarial feedback "
    "learning, evaluate, and run the promotion gates.",
    "collect": "Collect preference data: curate prompts, validate, generate image pairs and "
    "push them to Label Studio for annotation.",
    "train": "Train from collected preferences: pull labels from Label Studio, validate, train "
    "reward models, PeFL, decoupled and adversarial feedback learning, evaluate, promote.",
}

CONFIG_MAP_KEYS: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "LABEL_STUDIO_URL",
    "UNIFL_TASK_IMAGES_BUCKET",
    "UNIFL_MLFLOW_ARTIFACTS_BUCKET",
)
"""Endpoints every step reads from the ConfigMap (an absent map is tolerated: the
configuration's values apply)."""

OTHER_PARAMETER_DESCRIPTIONS: dict[str, str] = {
    "params_yaml": "The whole configuration (params.yaml as YAML text). The named parameters "
    "override it where set; secrets never belong here.",
    "overrides": "Further configuration overrides, a list of 'section.key=value' strings, "
    "applied after params_yaml and before the named parameters.",
    "pipeline_run_id": "Names the MLflow parent run and the checkpoint directories; empty: the "
    "Kubeflow run id. Reuse a run id only to resume that run.",
    "gpu_node_selector": "Node labels of the GPU node pool the GPU steps run on.",
    "gpu_tolerations": "Tolerations of the GPU steps (the GPU pool's NoSchedule taint).",
    "prompt_source": "Prompt files (CSV, JSONL or Parquet with a 'prompt' column; comma-"
    "separated paths readable in the pods); empty: the toy world's captions.",
    "real_data": "A toy-format data set (images, masks, captions) on a mounted volume for PeFL, "
    "adversarial training and the Frechet distance; only for a base model other than 'toy'.",
    "labels_export": "A Label Studio JSON export of this run's pairs to train on instead of "
    "simulated annotators; empty: simulate.",
    "promotion_target": "Where the promotion gates may move the new version: staging, or "
    "production (staging first, then production).",
    "pairs_uri": "URI of the pairs artifact of the collect run (its generate-pairs step).",
    "prompts_uri": "URI of the prompts artifact of the collect run (its curate-prompts step).",
}


@dataclass(frozen=True)
class Placement:
    """Compile-time settings of the pods: images, checkpoint volume, retries, /dev/shm."""

    image: str
    gpu_image: str | None
    checkpoint_pvc: str
    checkpoint_root: str
    retries: int
    retry_backoff_s: int
    shm_size: str
    mount_volumes: bool = True

    @classmethod
    def from_params(
        cls,
        params: Params,
        image: Optional[str] = None,
        gpu_image: Optional[str] = None,
        checkpoint_root: Optional[str] = None,
    ) -> "Placement":
        pipeline = params.pipeline
        return cls(
            image=image or pipeline.image or default_image(),
            gpu_image=gpu_image,
            checkpoint_pvc=pipeline.checkpoint_pvc,
            checkpoint_root=checkpoint_root or pipeline.checkpoint_root,
            # Locally a failed step is not retried: re-running with the same run id resumes.
            retries=pipeline.retries if checkpoint_root is None else 0,
            retry_backoff_s=pipeline.retry_backoff_s,
            shm_size=pipeline.shm_size,
            mount_volumes=checkpoint_root is None,
        )


class _Graph:
    """Helpers that build tasks with the project's conventions."""

    def __init__(self, placement: Placement, run: dict[str, Any]) -> None:
        self.placement = placement
        self.components = build_components(placement.image, placement.gpu_image)
        self.run = run

    def task(self, name: str, display: str, *, cache: bool, **inputs: Any) -> Any:
        task = self.components[name](**inputs).set_display_name(display)
        task.set_caching_options(cache)
        kubernetes.use_config_map_as_env(
            task, "unifl-endpoints", {key: key for key in CONFIG_MAP_KEYS}, optional=True
        )
        return task

    def tracked(self, task: Any) -> Any:
        """A step that writes to MLflow: optional credentials for an authenticating server."""
        kubernetes.use_secret_as_env(
            task,
            MLFLOW_CREDENTIALS_SECRET,
            {key: key for key in MLFLOW_CREDENTIAL_KEYS},
            optional=True,
        )
        return task

    def secrets(self, task: Any, groups: tuple[str, ...], optional: bool = False) -> Any:
        from unifl.cluster.settings import secret_env_sources

        for secret, keys in secret_env_sources(groups).items():
            kubernetes.use_secret_as_env(task, secret, keys, optional=optional)
        return task

    def gpu(self, task: Any) -> Any:
        """Accelerators, the GPU node pool, and a memory-backed /dev/shm."""
        task.set_accelerator_type(self.run["gpu_type"])
        task.set_accelerator_limit(self.run["gpu_count"])
        kubernetes.add_node_selector_json(task, self.run["gpu_node_selector"])
        kubernetes.add_toleration_json(task, self.run["gpu_tolerations"])
        kubernetes.empty_dir_mount(
            task,
            volume_name="dshm",
            mount_path="/dev/shm",
            medium="Memory",
            size_limit=self.placement.shm_size,
        )
        return task

    def training(self, task: Any) -> Any:
        """Retried after a pod failure, resuming from checkpoints on the shared volume."""
        if self.placement.retries > 0:
            task.set_retry(
                self.placement.retries,
                backoff_duration=f"{self.placement.retry_backoff_s}s",
                backoff_factor=2.0,
            )
        # A multi-node stage starts its job with the step's own image (cluster.num_nodes > 1).
        task.set_env_variable(
            "UNIFL_IMAGE", self.placement.gpu_image or gpu_image_for(self.placement.image)
        )
        if self.placement.mount_volumes:
            kubernetes.mount_pvc(
                task,
                pvc_name=self.placement.checkpoint_pvc,
                mount_path=self.placement.checkpoint_root,
            )
        return task

    def gpu_inputs(self) -> dict[str, Any]:
        # Handing the GPU settings to the component also makes KFP pass them into the exit
        # handler's sub-DAG, where the accelerator fields read them.
        return {"gpu_type": self.run["gpu_type"], "gpu_count": self.run["gpu_count"]}


def _resolve(graph: _Graph, pipeline: str, named: tuple[str, ...]) -> Any:
    run = graph.run
    task = graph.task(
        "resolve_config",
        "Resolve configuration",
        cache=False,
        params_yaml=run["params_yaml"],
        overrides=run["overrides"],
        pipeline=pipeline,
        pipeline_run_id=run["pipeline_run_id"],
        kfp_job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        gpu_node_selector=run["gpu_node_selector"],
        gpu_tolerations=run["gpu_tolerations"],
        label_studio_from_env=pipeline != "full",
        **{name: run[name] for name in named},
    )
    return graph.tracked(task)


def _collect_data(graph: _Graph, resolved: Any) -> dict[str, Any]:
    """Bootstrap, curation, prompt validation and pairs: the cached data steps."""
    run = graph.run
    data = resolved.outputs["data_params_yaml"]
    boot = graph.task(
        "bootstrap_toy",
        "Toy world / base model",
        cache=True,
        params_yaml=data,
        real_data=run["real_data"],
    )
    base = boot.outputs["base_model"]
    curate = graph.task(
        "curate_prompts",
        "Curate prompts",
        cache=True,
        params_yaml=data,
        base_model=base,
        prompt_source=run["prompt_source"],
        dvc_remote=run["dvc_remote"],
    )
    graph.secrets(curate, ("s3",), optional=True)
    prompts = curate.outputs["prompts"]
    check_prompts = graph.task(
        "validate_data",
        "Validate prompts",
        cache=True,
        params_yaml=data,
        kind="prompts",
        table=prompts,
        table_file="prompts.parquet",
    )
    pairs = graph.task(
        "generate_pairs",
        "Generate image pairs",
        cache=True,
        params_yaml=data,
        base_model=base,
        prompts=prompts,
        dvc_remote=run["dvc_remote"],
        **graph.gpu_inputs(),
    ).after(check_prompts)
    graph.gpu(pairs)
    graph.secrets(pairs, ("s3",), optional=True)
    return {"boot": boot, "curate": curate, "check_prompts": check_prompts, "pairs": pairs}


def _validate_labels(graph: _Graph, data: Any, labels: Any, pairs: Any) -> Any:
    return graph.task(
        "validate_data",
        "Validate preference pairs",
        cache=True,
        params_yaml=data,
        kind="pairs",
        table=labels,
        table_file="pairs.parquet",
        images=pairs,
    )


def _train(
    graph: _Graph,
    resolved: Any,
    boot: Any,
    prompts: Any,
    pairs: Any,
    labels: Any,
    after: list[Any],
) -> Any:
    """Reward models -> PeFL -> decoupled -> adversarial -> evaluate -> promotion gate."""
    run = graph.run
    common = {
        "params_yaml": resolved.outputs["params_yaml"],
        "parent_run_id": resolved.outputs["parent_run_id"],
    }
    training = {
        **common,
        "run_id": resolved.outputs["run_id"],
        "checkpoint_root": graph.placement.checkpoint_root,
    }
    reward = graph.task(
        "train_reward",
        "Train reward models",
        cache=False,
        labels=labels,
        pairs=pairs,
        **common,
        **graph.gpu_inputs(),
    )
    for task in after:
        reward.after(task)
    reward_model = reward.outputs["reward_model"]
    pefl = graph.task(
        "pefl",
        "PeFL (perceptual feedback)",
        cache=False,
        base_model=boot.outputs["base_model"],
        train_data=boot.outputs["train_data"],
        reward_model=reward_model,
        segmenter=boot.outputs["segmenter"],
        **training,
        **graph.gpu_inputs(),
    )
    decoupled = graph.task(
        "decoupled",
        "Decoupled aesthetic feedback",
        cache=False,
        base_model=pefl.outputs["model"],
        prompts=prompts,
        train_data=boot.outputs["train_data"],
        reward_model=reward_model,
        **training,
        **graph.gpu_inputs(),
    )
    adversarial = graph.task(
        "adversarial",
        "Adversarial feedback (few-step)",
        cache=False,
        base_model=decoupled.outputs["model"],
        train_data=boot.outputs["train_data"],
        reward_model=reward_model,
        **training,
        **graph.gpu_inputs(),
    )
    evaluate = graph.task(
        "evaluate",
        "Evaluate and register",
        cache=False,
        model=adversarial.outputs["model"],
        eval_data=boot.outputs["eval_data"],
        segmenter=boot.outputs["segmenter"],
        reward_model=reward_model,
        base_model=boot.outputs["base_model"],
        **common,
        **graph.gpu_inputs(),
    )
    for task in (reward, pefl, decoupled, adversarial, evaluate):
        graph.tracked(graph.gpu(task))
    for task in (reward, pefl, decoupled, adversarial):
        graph.training(task)
    promote = graph.task(
        "promote",
        "Promotion gate",
        cache=False,
        model_version=evaluate.outputs["Output"],
        target=run["promotion_target"],
        **common,
    )
    graph.tracked(promote)
    return promote


def _finish(graph: _Graph) -> Any:
    run = graph.run
    task = graph.task(
        "finish_tracking",
        "Finish tracking",
        cache=False,
        params_yaml=run["params_yaml"],
        overrides=run["overrides"],
        pipeline_run_id=run["pipeline_run_id"],
        kfp_job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        mlflow_tracking_uri=run["mlflow_tracking_uri"],
        mlflow_experiment=run["mlflow_experiment"],
    )
    return graph.tracked(task)


def _docstring(summary: str, names: list[str], params: Params) -> str:
    lines = [summary, "", "Args:"]
    for name in names:
        if name in PARAMETERS_BY_NAME:
            text = parameter_description(PARAMETERS_BY_NAME[name], params)
        else:
            text = OTHER_PARAMETER_DESCRIPTIONS[name]
        lines.append(f"    {name}: {text}")
    return "\n".join(lines) + "\n"


def _named(pipeline: str) -> tuple[str, ...]:
    from unifl.orchestration.parameters import PIPELINE_PARAMETERS

    return tuple(p.name for p in PIPELINE_PARAMETERS if pipeline in p.pipelines)


def build_pipeline(
    name: str,
    params: Params,
    image: Optional[str] = None,
    gpu_image: Optional[str] = None,
    checkpoint_root: Optional[str] = None,
) -> Callable[..., Any]:
    """The pipeline `name` (full, collect, train), its defaults and descriptions from `params`.

    `checkpoint_root` (for local runs) replaces the checkpoint volume by a local directory.
    """
    if name not in PIPELINE_IDS:
        raise ValueError(f"unknown pipeline {name!r}; expected one of {sorted(PIPELINE_IDS)}")
    placement = Placement.from_params(params, image, gpu_image, checkpoint_root)
    defaults = parameter_defaults(params, name)
    builders = {"full": _full, "collect": _collect, "train": _train_pipeline}
    function = builders[name](placement, defaults)
    parameters = [
        parameter for parameter in function.__code__.co_varnames[: function.__code__.co_argcount]
    ]
    function.__doc__ = _docstring(PIPELINE_DESCRIPTIONS[name], parameters, params)
    return dsl.pipeline(name=PIPELINE_IDS[name], description=PIPELINE_DESCRIPTIONS[name])(function)


# The pipeline functions below spell out their parameters because KFP reads the UI's
# parameter list (names, types, defaults) from the function signature.


def _full(placement: Placement, d: dict[str, Any]) -> Callable[..., Any]:
    def unifl_full(
        params_yaml: str = d["params_yaml"],
        overrides: list = d["overrides"],
        pipeline_run_id: str = "",
        base_model: Optional[str] = d["base_model"],
        prompt_source: str = "",
        real_data: str = "",
        labels_export: str = "",
        label_studio_url: Optional[str] = d["label_studio_url"],
        label_studio_project: Optional[str] = d["label_studio_project"],
        reward_epochs: Optional[int] = d["reward_epochs"],
        reward_learning_rate: Optional[float] = d["reward_learning_rate"],
        pefl_steps: Optional[int] = d["pefl_steps"],
        pefl_learning_rate: Optional[float] = d["pefl_learning_rate"],
        decoupled_steps: Optional[int] = d["decoupled_steps"],
        decoupled_learning_rate: Optional[float] = d["decoupled_learning_rate"],
        adversarial_steps: Optional[int] = d["adversarial_steps"],
        adversarial_learning_rate: Optional[float] = d["adversarial_learning_rate"],
        gpu_type: str = d["gpu_type"],
        gpu_count: int = d["gpu_count"],
        gpu_node_selector: dict = d["gpu_node_selector"],
        gpu_tolerations: list = d["gpu_tolerations"],
        mlflow_tracking_uri: Optional[str] = d["mlflow_tracking_uri"],
        mlflow_experiment: Optional[str] = d["mlflow_experiment"],
        registered_model: Optional[str] = d["registered_model"],
        reward_registered_model: Optional[str] = d["reward_registered_model"],
        dvc_remote: str = d["dvc_remote"],
        promotion_target: str = "staging",
    ) -> None:
        run = dict(locals())
        graph = _Graph(placement, run)
        with dsl.ExitHandler(_finish(graph), name="UniFL run"):
            resolved = _resolve(graph, "full", _named("full"))
            data = _collect_data(graph, resolved)
            data_yaml = resolved.outputs["data_params_yaml"]
            pairs = data["pairs"].outputs["pairs"]
            label = graph.task(
                "label_preferences",
                "Label preferences",
                cache=True,
                params_yaml=data_yaml,
                pairs=pairs,
                labels_export=labels_export,
                dvc_remote=dvc_remote,
            )
            graph.secrets(label, ("labeling", "s3"), optional=True)
            labels = label.outputs["labels"]
            check_labels = _validate_labels(graph, data_yaml, labels, pairs)
            lineage = graph.task(
                "log_data_lineage",
                "Record data lineage",
                cache=False,
                params_yaml=resolved.outputs["params_yaml"],
                parent_run_id=resolved.outputs["parent_run_id"],
                prompts=data["curate"].outputs["prompts"],
                prompts_validation=data["check_prompts"].outputs["validation"],
                pairs=pairs,
                labels=labels,
                labels_validation=check_labels.outputs["validation"],
            )
            graph.tracked(lineage)
            _train(
                graph,
                resolved,
                data["boot"],
                data["curate"].outputs["prompts"],
                pairs,
                labels,
                after=[check_labels, lineage],
            )

    return unifl_full


def _collect(placement: Placement, d: dict[str, Any]) -> Callable[..., Any]:
    def unifl_collect(
        params_yaml: str = d["params_yaml"],
        overrides: list = d["overrides"],
        pipeline_run_id: str = "",
        base_model: Optional[str] = d["base_model"],
        prompt_source: str = "",
        real_data: str = "",
        label_studio_url: Optional[str] = d["label_studio_url"],
        label_studio_project: Optional[str] = d["label_studio_project"],
        gpu_type: str = d["gpu_type"],
        gpu_count: int = d["gpu_count"],
        gpu_node_selector: dict = d["gpu_node_selector"],
        gpu_tolerations: list = d["gpu_tolerations"],
        mlflow_tracking_uri: Optional[str] = d["mlflow_tracking_uri"],
        mlflow_experiment: Optional[str] = d["mlflow_experiment"],
        registered_model: Optional[str] = d["registered_model"],
        dvc_remote: str = d["dvc_remote"],
    ) -> None:
        run = dict(locals())
        graph = _Graph(placement, run)
        with dsl.ExitHandler(_finish(graph), name="UniFL collect"):
            resolved = _resolve(graph, "collect", _named("collect"))
            data = _collect_data(graph, resolved)
            pairs = data["pairs"].outputs["pairs"]
            lineage = graph.task(
                "log_data_lineage",
                "Record data lineage",
                cache=False,
                params_yaml=resolved.outputs["params_yaml"],
                parent_run_id=resolved.outputs["parent_run_id"],
                prompts=data["curate"].outputs["prompts"],
                prompts_validation=data["check_prompts"].outputs["validation"],
                pairs=pairs,
            )
            graph.tracked(lineage)
            push = graph.task(
                "push_to_label_studio",
                "Push tasks to Label Studio",
                cache=False,
                params_yaml=resolved.outputs["params_yaml"],
                parent_run_id=resolved.outputs["parent_run_id"],
                pairs=pairs,
            ).after(lineage)
            graph.tracked(graph.secrets(push, ("labeling",)))
            # With labeling.storage 's3' the push uploads the pair images to the bucket.
            graph.secrets(push, ("s3",), optional=True)

    return unifl_collect


def _train_pipeline(placement: Placement, d: dict[str, Any]) -> Callable[..., Any]:
    def unifl_train(
        pairs_uri: str,
        prompts_uri: str,
        params_yaml: str = d["params_yaml"],
        overrides: list = d["overrides"],
        pipeline_run_id: str = "",
        base_model: Optional[str] = d["base_model"],
        real_data: str = "",
        label_studio_url: Optional[str] = d["label_studio_url"],
        label_studio_project: Optional[str] = d["label_studio_project"],
        reward_epochs: Optional[int] = d["reward_epochs"],
        reward_learning_rate: Optional[float] = d["reward_learning_rate"],
        pefl_steps: Optional[int] = d["pefl_steps"],
        pefl_learning_rate: Optional[float] = d["pefl_learning_rate"],
        decoupled_steps: Optional[int] = d["decoupled_steps"],
        decoupled_learning_rate: Optional[float] = d["decoupled_learning_rate"],
        adversarial_steps: Optional[int] = d["adversarial_steps"],
        adversarial_learning_rate: Optional[float] = d["adversarial_learning_rate"],
        gpu_type: str = d["gpu_type"],
        gpu_count: int = d["gpu_count"],
        gpu_node_selector: dict = d["gpu_node_selector"],
        gpu_tolerations: list = d["gpu_tolerations"],
        mlflow_tracking_uri: Optional[str] = d["mlflow_tracking_uri"],
        mlflow_experiment: Optional[str] = d["mlflow_experiment"],
        registered_model: Optional[str] = d["registered_model"],
        reward_registered_model: Optional[str] = d["reward_registered_model"],
        promotion_target: str = "staging",
    ) -> None:
        run = dict(locals())
        graph = _Graph(placement, run)
        with dsl.ExitHandler(_finish(graph), name="UniFL train"):
            resolved = _resolve(graph, "train", _named("train"))
            boot = graph.task(
                "bootstrap_toy",
                "Toy world / base model",
                cache=True,
                params_yaml=resolved.outputs["data_params_yaml"],
                real_data=real_data,
            )
            pairs = dsl.importer(
                artifact_uri=pairs_uri, artifact_class=dsl.Dataset, reimport=False
            ).set_display_name("Import pairs")
            prompts = dsl.importer(
                artifact_uri=prompts_uri, artifact_class=dsl.Dataset, reimport=False
            ).set_display_name("Import prompts")
            pull = graph.task(
                "pull_labels",
                "Pull labels from Label Studio",
                cache=False,
                params_yaml=resolved.outputs["params_yaml"],
                parent_run_id=resolved.outputs["parent_run_id"],
                dvc_remote="",
            )
            graph.tracked(graph.secrets(pull, ("labeling",)))
            # The labels are pushed to the DVC remote when pipeline.dvc_remote is s3://.
            graph.secrets(pull, ("s3",), optional=True)
            labels = pull.outputs["labels"]
            check_labels = _validate_labels(
                graph, resolved.outputs["data_params_yaml"], labels, pairs.output
            )
            lineage = graph.task(
                "log_data_lineage",
                "Record data lineage",
                cache=False,
                params_yaml=resolved.outputs["params_yaml"],
                parent_run_id=resolved.outputs["parent_run_id"],
                prompts=prompts.output,
                pairs=pairs.output,
                labels=labels,
                labels_validation=check_labels.outputs["validation"],
            )
            graph.tracked(lineage)
            _train(
                graph,
                resolved,
                boot,
                prompts.output,
                pairs.output,
                labels,
                after=[check_labels, lineage],
            )

    return unifl_train
