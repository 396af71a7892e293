"""Prints, after the pytest-benchmark table, each implementation's speed-up over the others and
its GB/s against the minimal traffic (CONTRACT §5), from the medians of this one run."""

from collections import defaultdict


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = defaultdict(dict)
    traffic = {}
    for b in session.benchmarks:
        impl = b.extra_info.get("impl")
        if impl is None:
            continue
        groups[b.group][impl] = b.stats.median
        traffic[b.group] = b.extra_info.get("bytes")
    tr = terminalreporter
    tr.write_sep("=", "calibkernels: medians of this run (ms), GB/s vs minimal traffic, ratios")
    for group, medians in sorted(groups.items()):
        cells = [f"{impl} {t * 1e3:.2f} ms ({traffic[group] / t / 1e9:.1f} GB/s)"
                 for impl, t in sorted(medians.items())]
        tr.write_line(f"{group}: " + ", ".join(cells))
        if "fused" in medians:
            ratios = [f"{medians[o] / medians['fused']:.2f}x vs {o}"
                      for o in sorted(medians) if o != "fused"]
            tr.write_line("    fused is " + ", ".join(ratios))
