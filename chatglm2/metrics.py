"""The engine's state in Prometheus' text format, for GET /metrics (the names follow vLLM's, under chatglm2_)."""
from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from chatglm2.engine import Engine


class EngineCollector:
    """Reads the engine's counters at each scrape, so serving pays nothing between scrapes."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        pool = stats["kv_cache"]
        yield GaugeMetricFamily("chatglm2_num_requests_running", "Requests in the running batch", stats["running"])
        yield GaugeMetricFamily("chatglm2_num_requests_waiting", "Requests waiting to be admitted", stats["waiting"])
        blocks = GaugeMetricFamily("chatglm2_kv_cache_blocks", "Blocks of the KV cache pool by state",
                                   labels=["state"])
        for state in ("used", "cached", "free"):
            blocks.add_metric([state], pool[f"blocks_{state}"])
        yield blocks
        yield GaugeMetricFamily("chatglm2_kv_cache_usage_perc", "Fraction of the pool's blocks held by requests",
                                pool["blocks_used"] / pool["blocks"])
        yield GaugeMetricFamily("chatglm2_prefix_cache_hit_rate", "Prompt tokens found cached / prompt tokens",
                                pool["prefix_hit_rate"])
        yield CounterMetricFamily("chatglm2_prompt_tokens", "Prompt tokens admitted", pool["queried_tokens"])
        yield CounterMetricFamily("chatglm2_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                                  pool["hit_tokens"])
        yield CounterMetricFamily("chatglm2_generation_tokens", "Tokens generated", stats["generated_tokens"])
        yield CounterMetricFamily("chatglm2_num_preemptions", "Requests preempted for lack of KV blocks",
                                  stats["preemptions"])
        finished = CounterMetricFamily("chatglm2_request_success", "Requests finished, by reason",
                                       labels=["finished_reason"])
        for reason, count in stats["finished"].items():
            finished.add_metric([reason], count)
        yield finished


def metrics_registry(engine: Engine) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return registry

