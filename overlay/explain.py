"""`overlay explain`: run one packet through the very same core the live distributor uses and show the
whole trace — roles of each address, table cell, hashed key, row, first and second choice, the bytes."""

from __future__ import annotations

import json
from typing import Any

from overlay.decision import HASH_SRC, NAT_ABLE, NODE, TO_DEST, VIRTUAL, XLATE
from overlay.distributor.core import Decision, Distributor, Verdict, format_address
from overlay.flowspec import describe, format_endpoint
from overlay.packet import Flow, parse_flow

_ROLE_NAMES = ((VIRTUAL, "virtual"), (NODE, "node"), (NAT_ABLE, "nat-able"), (XLATE, "nat-xlate"))


def role_names(bits: int) -> list[str]:
    return [name for bit, name in _ROLE_NAMES if bits & bit]


def explain(distributor: Distributor, packet: bytes, peer: tuple[str, int] | None = None) -> dict[str, Any]:
    """The trace as a JSON-able dict. With `peer`, the packet is taken as arriving over the overlay
    from that underlay address (e.g. a TM's), encapsulated as the peer would."""
    trace: dict[str, Any] = {"packet": describe(packet), "length": len(packet)}
    if peer is not None:
        from overlay import gre

        verdict = distributor.from_overlay(gre.encapsulate(packet), peer)
        trace["from_peer"] = format_endpoint(*peer)
        trace.update(_verdict_fields(verdict))
        return trace
    flow = parse_flow(packet)
    verdict = distributor.from_tun(packet)
    trace.update(_verdict_fields(verdict))
    if isinstance(flow, Flow):
        trace["flow"] = _flow_fields(flow)
        decision = distributor.decide(flow)
        trace["step"] = decision.step
        trace["source"] = {"address": format_address(flow.version, flow.src), "roles": role_names(decision.src_roles), "row": decision.row}
        trace["destination"] = {"address": format_address(flow.version, flow.dst), "roles": role_names(decision.dst_roles), "column": decision.column}
        trace["cell_action"] = decision.cell
        trace["cell_overridden"] = bool(decision.row and (decision.row, decision.column) in distributor.config.decision.overridden)
        if decision.refinement is not None:
            trace["refinement"] = _refinement(decision, trace["destination"]["address"])
        if decision.hashed is not None:
            trace["hashed"] = decision.hashed
            trace["hash_key"] = decision.key.hex() if decision.key else None
            trace["hash"] = f"{decision.hash_value:016x}"
            trace["table_row"] = decision.table_row
            trace["table_rows"] = distributor.table.rows
        trace["first_choice"] = decision.first
        trace["second_choice"] = decision.second
    return trace


def _refinement(decision: Decision, destination: str) -> dict[str, Any]:
    """The owner refinement of an unknown → xlate hash-src cell, with its reason (docs/design-decision.md):
    the TM that owns an xlate address chose it as a NAT source, so packets to it are replies that only
    that TM has state for — whatever the hash would say."""
    if decision.refinement == "owner":
        why = (f"{decision.first} owns {destination}: packets to an xlate address are replies to the "
               "connections its owner source-NATed, and only the owner has their state")
        return {"rule": "owner", "applied": True, "from": HASH_SRC, "to": TO_DEST, "owner": decision.first, "why": why}
    why = f"no TM owns {destination}: nobody source-NATed to it, so the cell's {HASH_SRC} stands"
    return {"rule": "owner", "applied": False, "from": HASH_SRC, "to": HASH_SRC, "owner": None, "why": why}


def _flow_fields(flow: Flow) -> dict[str, Any]:
    return {
        "version": flow.version,
        "src": format_address(flow.version, flow.src),
        "dst": format_address(flow.version, flow.dst),
        "proto": flow.proto,
        "sport": flow.sport,
        "dport": flow.dport,
        "fragment": flow.fragment,
        "icmp_error": flow.icmp_error,
    }


def _verdict_fields(verdict: Verdict) -> dict[str, Any]:
    fields: dict[str, Any] = {"action": verdict.action, "tm": verdict.tm, "reason": verdict.reason, "cell": verdict.cell}
    if verdict.dest is not None:
        fields["dest"] = format_endpoint(*verdict.dest)
    if verdict.packet is not None:
        key = "encapsulated" if verdict.dest is not None else "output"
        fields[key] = verdict.packet.hex()
    return fields


def render(trace: dict[str, Any]) -> str:
    """The trace for a person, one fact per line."""
    lines = [f"packet       {trace['packet']}"]
    if "from_peer" in trace:
        lines.append(f"arrived      over the overlay from {trace['from_peer']}")
    flow = trace.get("flow")
    if flow and flow["icmp_error"]:
        lines.append("icmp error   decided by the quoted packet, turned around (the flow the error belongs to)")
    if flow and flow["fragment"]:
        lines.append("fragment     ports are not used for hashing")
    if trace.get("step") == "management":
        lines.append(f"management   {trace['destination']['address']} is TM {trace['tm']}'s management address")
    elif "source" in trace:
        src, dst = trace["source"], trace["destination"]
        lines.append(f"source       {src['address']:<24} roles: {', '.join(src['roles']) or 'none'} -> row {src['row']}")
        lines.append(f"destination  {dst['address']:<24} roles: {', '.join(dst['roles']) or 'none'} -> column {dst['column']}")
        mark = " (overridden)" if trace.get("cell_overridden") else ""
        lines.append(f"cell         {src['row']} > {dst['column']} = {trace['cell_action']}{mark}")
        refinement = trace.get("refinement")
        if refinement is not None and refinement["applied"]:
            lines.append(f"refinement   {refinement['from']} -> {refinement['to']}: {refinement['why']} (owner refinement)")
        elif refinement is not None:
            lines.append(f"refinement   none: {refinement['why']} (owner refinement)")
    if "hashed" in trace:
        lines.append(
            f"hash         {trace['hashed']} key {trace['hash_key']} -> {trace['hash']} -> row {trace['table_row']} of {trace['table_rows']}"
        )
    if trace.get("first_choice") or trace.get("second_choice"):
        lines.append(f"choice       first {trace.get('first_choice')}, second {trace.get('second_choice')}")
    target = f" {trace['tm']}" if trace.get("tm") else ""
    dest = f" via {trace['dest']}" if trace.get("dest") else ""
    lines.append(f"verdict      {trace['action']}{target}{dest} (reason: {trace['reason']})")
    if "encapsulated" in trace:
        data = bytes.fromhex(trace["encapsulated"])
        lines.append(f"encapsulated GRE-in-UDP payload, {len(data)} bytes (outer IP/UDP added by the socket):")
        lines.extend("  " + _hexdump_line(data, offset) for offset in range(0, min(len(data), 128), 16))
        if len(data) > 128:
            lines.append(f"  ... {len(data) - 128} more bytes")
    elif "output" in trace:
        lines.append(f"output       {describe(bytes.fromhex(trace['output']))} written to the TUN")
    return "\n".join(lines)


def _hexdump_line(data: bytes, offset: int) -> str:
    chunk = data[offset : offset + 16]
    return f"{offset:04x}  {' '.join(f'{b:02x}' for b in chunk)}"


def to_json(trace: dict[str, Any]) -> str:
    return json.dumps(trace, indent=2, sort_keys=False)
