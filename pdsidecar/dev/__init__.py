"""Development harness: real vLLM engines as subprocesses (`engines`, `procs`), tiny
random-weight models, the local P/D stack (`pdsidecar local`) and the shipped manifests
run as network-namespace pods on one machine."""
