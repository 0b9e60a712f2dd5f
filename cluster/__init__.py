"""lorafleet.cluster: getting a Ray cluster + MLflow — the local stack (`lorafleet up` / `down`) and the cloud
launcher / runtime-env YAMLs."""
