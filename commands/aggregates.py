"""The aggregate types the command side loads."""

from __future__ import annotations

from ucloud.domain import file, host, image, network, operators, sshkey, vm

from .unit_of_work import AggregateType

VM = AggregateType("vm", vm.Vm, vm.evolve, vm.stream_name, slices=vm.slices)
HOST = AggregateType("host", host.Host, host.evolve, host.stream_name, slices=host.slices)
SSHKEY = AggregateType("sshkey", sshkey.SshKey, sshkey.evolve, sshkey.stream_name)
ADMIN = AggregateType("admin", operators.AdminAccount, operators.evolve, operators.stream_name)
FILE = AggregateType("file", file.File, file.evolve, file.stream_name)
IMAGE = AggregateType("image", image.Image, image.evolve, image.stream_name)

NETWORK = AggregateType("network", network.Network, network.evolve, network.stream_name, slices=network.slices)
# One stream per value in use (ipam-vni-42, ipam-mac-02:...): the guard against handing it out twice.
CLAIM = AggregateType("ipam-claim", network.Claim, network.evolve_claim, network.claim_stream)
POOL = AggregateType("ipam-pool", network.Pool, network.evolve_pool, lambda _: network.POOL_STREAM)
