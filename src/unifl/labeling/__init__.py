"""Aesthetic preference labeling with Label Studio, or with simulated annotators.

* `label_config`: the labeling interface (prompt, images A and B, A / B / Tie per dimension).
* `tasks`: the pair manifest schema shared with pair generation, and its tasks.
* `client`: the Label Studio client (project, tasks, storages, annotations, export).
* `export`: a JSON export -> the votes and majority pair tables of `unifl.data.preferences`.
* `agreement`: Krippendorff's alpha per dimension, annotators' agreement with the majority.
* `annotators`: the simulated panel (export file or posts through the API).
* `server`: a real local Label Studio in its own virtual environment.
* `pipeline`: the push, pull and label steps the CLI, DVC and KFP call.

Modules import their heavy dependencies (the SDK, pandas) themselves; importing
the package is cheap.
"""
