"""Development harnesses: the shipped manifests run as network-namespace pods on one machine."""
