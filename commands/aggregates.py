"""The aggregate types the command side loads."""

from __future__ import annotations

from ucloud.domain import file, host, image, operators, sshkey, vm

from .unit_of_work import AggregateType

VM = AggregateType("vm", vm.Vm, vm.evolve, vm.stream_name, slices=vm.slices)
HOST = AggregateType("host", host.Host, host.evolve, host.stream_name, slices=host.slices)
SSHKEY = AggregateType("sshkey", sshkey.SshKey, sshkey.evolve, sshkey.stream_name)
ADMIN = AggregateType("admin", operators.AdminAccount, operators.evolve, operators.stream_name)
FILE = AggregateType("file", file.File, file.evolve, file.stream_name)
IMAGE = AggregateType("image", image.Image, image.evolve, image.stream_name)
