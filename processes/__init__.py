"""ucloud.processes: process managers (scheduler, failure detector, billing, IPAM allocator
on one framework, processes/framework.py; the image scanner under the same leader lease)
and `ucloud processes`, which runs them. No migrator yet."""
