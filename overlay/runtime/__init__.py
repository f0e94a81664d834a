"""The asyncio runtime: TUN and UDP transports, host network setup and the agents that wire them to the cores.

Everything here only moves bytes between the kernel and a sans-I/O core; no packet decision is made here.
"""
