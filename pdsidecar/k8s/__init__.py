"""Kubernetes: sidecar injection (`inject`, `webhook`), certificates, the generated
LeaderWorkerSet manifests and their offline validation."""
