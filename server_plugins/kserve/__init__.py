"""KServe v2 / Triton gRPC proxy: distillguard in front of a Triton server (Open Inference Protocol v2).

Needs ``tritonclient[grpc]`` (its compiled ``service_pb2``) and ``googleapis-common-protos`` (retry info on
throttles): ``pip install distillguard[kserve]``. Run it with ``distillguard kserve-proxy``; see
``examples/kserve.yaml`` for the proxy's config.
"""
