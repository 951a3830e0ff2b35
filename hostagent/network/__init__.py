"""Host networking: the network driver port and its Linux driver (pyroute2, nftables, radvd)."""
