"""chunkfs's Kubernetes CSI node plugin (``chunkfs csi``).

Layer: beside ``chunkfs``, not inside it. The plugin drives chunkfs only through its mount
contract: it runs ``chunkfs mount ... --background`` daemons (one per staged volume per node,
each in its own session so it outlives the plugin), bind-mounts their directories into pod
target paths, and reads ``/proc/self/mountinfo``. ``csi.proto`` is the subset of the CSI v1
spec it serves; ``csi_pb2*.py`` are generated from it (scripts/gen_csi_proto.py).
"""
