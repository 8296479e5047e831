"""Running unifl on a Kubernetes cluster.

- `settings`: the endpoints and credentials a pipeline pod reads from the
  `unifl-endpoints` ConfigMap and the unifl Secrets, checked at start.
- `trainjob`: manifests of multi-node training jobs (Kubeflow Trainer v2
  `TrainJob`, legacy Training Operator `PyTorchJob`).
- `launcher`: create such a job, stream its status, fail with its reason,
  delete it on cancellation, and hand back the checkpoint location.

Nothing here imports kfp; the `kubernetes` client is imported only by the
launcher.
"""
