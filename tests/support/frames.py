"""Raw Ethernet frames for firewall tests: ``send IFACE HEX...`` writes frames on an
interface; ``sniff IFACE SECONDS MARKER...`` prints how many frames carrying each marker
arrived. Run inside a guest namespace; AF_PACKET, no libraries."""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import struct
import sys
import time


def mac_bytes(mac: str) -> bytes:
    return bytes(int(p, 16) for p in mac.split(":"))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv6(src_mac: str, dst_mac: str, src: str, dst: str, next_header: int, payload: bytes,
         hop_limit: int = 255) -> bytes:
    """An Ethernet frame carrying IPv6 (ICMPv6 and UDP checksums filled in)."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    pseudo = s + d + struct.pack("!I3xB", len(payload), next_header)
    if next_header == 58:
        payload = payload[:2] + struct.pack("!H", _checksum(pseudo + payload[:2] + b"\0\0" + payload[4:])) + payload[4:]
    elif next_header == 17:
        payload = payload[:6] + struct.pack("!H", _checksum(pseudo + payload[:6] + b"\0\0" + payload[8:])) + payload[8:]
    header = struct.pack("!IHBB", 6 << 28, len(payload), next_header, hop_limit) + s + d
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x86\xdd" + header + payload


def echo_request(marker: str) -> bytes:
    return struct.pack("!BBHHH", 128, 0, 0, 1, 1) + marker.encode()


def router_advertisement(prefix: str, marker: str) -> bytes:
    option = struct.pack("!BBBBIII", 3, 4, 64, 0xC0, 86400, 14400, 0) + ipaddress.IPv6Address(prefix).packed
    return struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + option + struct.pack("!BB", 253, 1) + \
        marker.encode().ljust(6, b"\0")[:6]


def neighbor_advertisement(target: str, mac: str, marker: str) -> bytes:
    option = struct.pack("!BB", 2, 1) + mac_bytes(mac)
    return struct.pack("!BBHI", 136, 0, 0, 0x20000000) + ipaddress.IPv6Address(target).packed + option + \
        struct.pack("!BB", 253, 1) + marker.encode().ljust(6, b"\0")[:6]


def udp(sport: int, dport: int, marker: str) -> bytes:
    body = marker.encode()
    return struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body


def send(iface: str, frames: list[str]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((iface, 0))
        for frame in frames:
            sock.send(bytes.fromhex(frame))


def sniff(iface: str, seconds: float, markers: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(markers, 0)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as sock:
        sock.bind((iface, 0))
        print("ready", file=sys.stderr, flush=True)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            frame = sock.recv(65535)
            for marker in markers:
                if marker.encode() in frame:
                    counts[marker] += 1
    return counts


def router_advertisement_options(iface: str, seconds: float) -> dict[str, list[str]]:
    """The first router advertisement arriving on ``iface`` within ``seconds``, read by
    hand: its prefixes (option 3) and recursive DNS servers (option 25, RFC 8106)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD)) as sock:
        sock.bind((iface, 0))
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            frame = sock.recv(65535)
            # Ethernet (14) + IPv6 (40) + ICMPv6 type 134 (RA header 16 bytes), no extension headers.
            if len(frame) < 70 or frame[20] != 58 or frame[54] != 134:
                continue
            found: dict[str, list[str]] = {"prefixes": [], "rdnss": []}
            at = 70
            while at + 2 <= len(frame) and frame[at + 1]:
                kind, length = frame[at], frame[at + 1] * 8
                body = frame[at:at + length]
                if kind == 3 and len(body) >= 32:
                    found["prefixes"].append(f"{ipaddress.IPv6Address(body[16:32])}/{body[2]}")
                elif kind == 25:
                    found["rdnss"] += [str(ipaddress.IPv6Address(body[i:i + 16])) for i in range(8, len(body), 16)]
                at += length
            return found
    return {}


if __name__ == "__main__":
    command, iface, *rest = sys.argv[1:]
    if command == "send":
        send(iface, rest)
    elif command == "ra":
        print(json.dumps(router_advertisement_options(iface, float(rest[0]))))
    else:
        print(json.dumps(sniff(iface, float(rest[0]), rest[1:])))
