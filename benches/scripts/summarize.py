#!/usr/bin/env python3
"""Turns `cargo bench -p edgehub-benches` output into the ratio tables of
BENCHMARKS.md: each edgehub figure next to its reference in the same run."""

import re
import sys

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse(text):
    results, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^([a-z_0-9]+/[A-Za-z0-9_./-]+)\s*(time:.*)?$", line.strip())
        if m and not line.startswith(" "):
            name = m.group(1)
            line = m.group(2) or ""
        t = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if t and name:
            results[name] = float(t.group(1)) * UNITS[t.group(2)]
            name = None
    return results


def fmt(s):
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s:.3g} s"


def main():
    r = parse(sys.stdin.read())
    pairs = []
    for name, secs in sorted(r.items()):
        group, impl, *param = name.split("/")
        for ours, ref in (("edgehub-v311", "mqttbytes-v4"), ("edgehub-v5", "mqttbytes-v5"), ("trie", "linear-scan")):
            if impl == ours:
                ref_name = "/".join([group, ref, *param])
                if ref_name in r:
                    pairs.append((name, secs, ref_name, r[ref_name]))
    print("| benchmark | edgehub | reference | reference time | reference / edgehub |")
    print("|---|---|---|---|---|")
    for name, secs, ref_name, ref_secs in pairs:
        print(f"| `{name}` | {fmt(secs)} | `{ref_name.split('/')[1]}` | {fmt(ref_secs)} | {ref_secs / secs:.2f}x |")


if __name__ == "__main__":
    main()
