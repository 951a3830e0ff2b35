"""Image stores (filesystem, Ceph RBD) and the qcow2 checks: infrastructure shared by the
image scanner (processes/images.py) and the host agent. Imports nothing of ours."""
