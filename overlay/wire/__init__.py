"""Wire facts and checked packet views shared by the two roles: the distributor (`overlay.packet`, which
decides where a packet goes) and the TM (`overlay.tm.packet`, which tracks and rewrites it).

One module per layer, in the spirit of smoltcp's `wire/`: `ipv6` (which extension headers are walked, how,
the fragment header), `icmp` (which types are echo and which are errors that quote a flow, per family, and
the checked view of a quoted packet), `views` (the checked views of a whole packet: IP header, fragment,
transport and flow key), `reasons` (what a view says when it refuses). A view checks lengths once and
returns plain offsets, so nothing read after it can fail — and no object is built per packet: CPython
pays for every call and allocation on the hot path (tests/tm/bench_tm.py, tests/distributor/bench_decide.py).

Both roles read packets only through these views, so they cannot disagree on what a packet is;
tests/test_wire_agreement.py holds them to it. The decisions behind the tables are in docs/wire-format.md.
"""
