"""Compile the pipelines to the YAML files people upload in the Kubeflow UI.

`pipelines/compiled/<pipeline id>.yaml` is what the repository ships; `unifl compile`
rewrites it, and a test fails when the committed files differ from a fresh compile (a
changed component, graph, configuration default or image tag).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from unifl.config import Params

COMPILED_DIR = Path(__file__).resolve().parent / "compiled"
"""Where the committed pipeline files live."""


def compile_pipeline(
    name: str,
    params: Params,
    package_path: str | Path,
    image: str | None = None,
    gpu_image: str | None = None,
) -> Path:
    """Compile pipeline `name` (full, collect, train) to `package_path` (written whole)."""
    from kfp import compiler

    from unifl.io import atomic_path
    from unifl.pipelines.unifl_pipelines import build_pipeline

    pipeline = build_pipeline(name, params, image=image, gpu_image=gpu_image)
    target = Path(package_path)
    with atomic_path(target) as tmp:
        yaml_tmp = tmp.with_suffix(".yaml")
        try:
            compiler.Compiler().compile(pipeline, str(yaml_tmp))
            text = _comment_out_header(yaml_tmp.read_text(encoding="utf-8"))
        finally:
            yaml_tmp.unlink(missing_ok=True)
        tmp.write_text(text, encoding="utf-8")
    return target


def _comment_out_header(text: str) -> str:
    """Replace KFP's leading comment block by a stable, valid one.

    KFP lists the inputs with their defaults above the YAML, one per line: a multi-line
    default (`params_yaml`) spills out of the comment and makes the file invalid YAML, and
    mapping defaults come out in hash order, which would make the staleness check flaky.
    The same information is written here with every default as one line of sorted JSON.
    """
    import json

    import yaml

    lines = text.split("\n")
    end = next(index for index, line in enumerate(lines) if line.startswith("components:"))
    body = "\n".join(lines[end:])
    spec = next(yaml.safe_load_all(body))
    header = ["# PIPELINE DEFINITION", f"# Name: {spec['pipelineInfo']['name']}"]
    description = spec["pipelineInfo"].get("description")
    if description:
        header.append(f"# Description: {' '.join(description.split())}")
    parameters = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    if parameters:
        header.append("# Inputs:")
    for name in sorted(parameters):
        definition = parameters[name]
        line = f"#    {name}: {definition['parameterType']}"
        if "defaultValue" in definition:
            line += f" [Default: {json.dumps(definition['defaultValue'], sort_keys=True)}]"
        header.append(line)
    return "\n".join(header) + "\n" + body


def compile_pipelines(
    params: Params,
    out_dir: str | Path = COMPILED_DIR,
    image: str | None = None,
    gpu_image: str | None = None,
    names: Sequence[str] = ("full", "collect", "train"),
) -> list[Path]:
    """Compile every pipeline into `out_dir` as `<pipeline id>.yaml`; return the paths."""
    from unifl.pipelines.unifl_pipelines import PIPELINE_IDS

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return [
        compile_pipeline(name, params, directory / f"{PIPELINE_IDS[name]}.yaml", image, gpu_image)
        for name in names
    ]
