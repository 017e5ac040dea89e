"""The Prometheus text exposition (version 0.0.4) of a serving engine and its HTTP connections.
Pure formatting: callers hand in the state (the engine's under its lock)."""

from __future__ import annotations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


class _Text:
    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples) -> None:
        """One metric: its HELP and TYPE lines, then a line per (labels, value) sample."""
        self.lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        for labels, value in samples:
            lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    def __str__(self) -> str:
        return "\n".join(self.lines) + "\n"


def engine_text(e) -> str:
    """The engine's gauges and counters (`e` is a serve.engine.Engine; call under its lock)."""
    d, dev, c = e.last, e.last_device, e.counters
    variants = [r.name for r in d.rows] if d else []
    t = _Text()
    t.metric("lsaq_variant_loaded", "gauge", "1 for the variant serving requests.",
             [({"variant": v}, int(v == e.current)) for v in variants])
    t.metric("lsaq_paused", "gauge", "1 while no variant fits and requests wait.",
             [({}, int(e.model is None and not e.switching))])
    t.metric("lsaq_switching", "gauge", "1 while a variant is being loaded.",
             [({}, int(e.switching))])
    t.metric("lsaq_free_bytes", "gauge", "Free memory the last plan compared needs "
             "against (the probe's free + the loaded variant's bytes, budget applied).",
             [({}, d.free_bytes if d else 0)])
    t.metric("lsaq_device_free_bytes", "gauge", "Free memory the last probe saw.",
             [({"device": dev.label}, dev.free_bytes)] if dev else [])
    if e.last_budget is not None:
        t.metric("lsaq_budget_bytes", "gauge", "The memory budget at the last probe.",
                 [({}, e.last_budget)])
    t.metric("lsaq_variant_need_bytes", "gauge", "Memory need of each variant at this "
             "context (predicted + safety margin).",
             [({"variant": r.name}, r.need_bytes) for r in (d.rows if d else [])
              if r.need_bytes is not None])
    t.metric("lsaq_switches_total", "counter", "Variant switches by direction.",
             [({"direction": k}, v) for k, v in c["switches"].items()])
    t.metric("lsaq_queue_length", "gauge", "Requests waiting (the running one not "
             "counted).", [({}, len(e.jobs))])
    t.metric("lsaq_queue_limit", "gauge", "Most requests that may wait.",
             [({}, e.max_queue)])
    t.metric("lsaq_running", "gauge", "1 while a generation runs.",
             [({}, int(e.running is not None))])
    t.metric("lsaq_requests_total", "counter", "Finished requests by outcome.",
             [({"outcome": k}, v) for k, v in c["requests"].items()])
    t.metric("lsaq_prompt_tokens_total", "counter", "Prompt tokens processed.",
             [({}, c["prompt_tokens"])])
    t.metric("lsaq_completion_tokens_total", "counter", "Tokens generated.",
             [({}, c["completion_tokens"])])
    t.metric("lsaq_generation_seconds_total", "counter", "Seconds spent generating.",
             [({}, round(c["generation_seconds"], 6))])
    t.metric("lsaq_tokens_per_second", "gauge", "Generated tokens per second of the "
             "last finished request (prefill included).",
             [({}, round(e.last_tps or 0.0, 3))])
    t.metric("lsaq_probes_total", "counter", "Memory probes and plans.",
             [({}, c["probes"])])
    return str(t)


def connections_text(guard) -> str:
    """The HTTP layer's connection gauges (`guard` is server._ConnectionGuard)."""
    return (f"# HELP lsaq_http_connections_open Open HTTP connections.\n"
            f"# TYPE lsaq_http_connections_open gauge\n"
            f"lsaq_http_connections_open {len(guard.open)}\n"
            f"# HELP lsaq_http_connections_limit Most HTTP connections open at once.\n"
            f"# TYPE lsaq_http_connections_limit gauge\n"
            f"lsaq_http_connections_limit {guard.max}\n"
            f"# HELP lsaq_http_connections_closed_total Connections the server closed: "
            f"evicted at the cap, refused at the cap, no request head in time.\n"
            f"# TYPE lsaq_http_connections_closed_total counter\n"
            + "".join(f'lsaq_http_connections_closed_total{{reason="{k}"}} {v}\n'
                      for k, v in guard.counts.items()))
