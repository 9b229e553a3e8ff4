"""What `GET /metrics` shows, in Prometheus' text format: a few counters and histograms, no dependency.

- `imagine_jobs_total{kind,status}`: jobs shown to members, by kind and final status
- `imagine_modelslab_errors_total{kind}`: ModelsLab answers that were errors, by kind
- `imagine_queue_depth{key}`: jobs waiting in the bot's own queue, by API key (a short fingerprint)
- `imagine_ack_latency_seconds`: from the command to Discord's acknowledgement
- `imagine_ready_to_posted_seconds`: from the result known at ModelsLab to the images posted
- `imagine_discord_rate_limited_total{scope}`: Discord's 429 answers, by scope (`user`, `shared`, `global`), and the
  ones that were not Discord's own limits: `ban` (Cloudflare's answer to a banned IP), `proxy` (made up by a REST proxy)
- `imagine_discord_banned`: 1 while Discord's edge refuses the bot (a ban), else 0
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(pairs: Mapping[str, str]) -> str:
    if not pairs:
        return ""

    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(str(v))}"' for k, v in pairs.items()) + "}"


class LabelledCounter:
    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...]) -> None:
        self.name, self.help_text, self.label_names = name, help_text, label_names
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *values: str, amount: float = 1.0) -> None:
        self._values[values] = self._values.get(values, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} counter"]
        for values, amount in sorted(self._values.items()):
            lines.append(f"{self.name}{_labels(dict(zip(self.label_names, values, strict=True)))} {amount:g}")
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help_text, self.buckets = name, help_text, buckets
        self._counts = [0] * len(buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self._counts):
            self._counts[index] += 1
        self._sum += value
        self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self._counts, strict=True):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self._count}')
        lines.append(f"{self.name}_sum {self._sum:g}")
        lines.append(f"{self.name}_count {self._count}")
        return lines


class Metrics:
    def __init__(self) -> None:
        self.jobs = LabelledCounter(
            "imagine_jobs_total", "Jobs shown to members, by kind and final status.", ("kind", "status")
        )
        self.modelslab_errors = LabelledCounter(
            "imagine_modelslab_errors_total", "ModelsLab answers that were errors, by kind.", ("kind",)
        )
        self.ack_latency = Histogram("imagine_ack_latency_seconds", "From the command to its acknowledgement.")
        self.ready_to_posted = Histogram(
            "imagine_ready_to_posted_seconds", "From the result known at ModelsLab to the images posted in Discord."
        )
        self.queue_depths: Callable[[], Mapping[str, int]] = dict
        self.discord_rate_limited = LabelledCounter(
            "imagine_discord_rate_limited_total",
            "Discord answers of 429, by scope (user, shared, global; ban: Cloudflare's ban; proxy: made by a proxy).",
            ("scope",),
        )
        self.discord_banned: Callable[[], bool] = lambda: False

    def render(self) -> str:
        lines = [*self.jobs.render(), *self.modelslab_errors.render()]
        lines += [
            "# HELP imagine_queue_depth Jobs waiting in the bot's queue, by API key.",
            "# TYPE imagine_queue_depth gauge",
        ]
        for key, depth in sorted(self.queue_depths().items()):
            lines.append(f"imagine_queue_depth{_labels({'key': key})} {depth}")
        lines += [*self.ack_latency.render(), *self.ready_to_posted.render(), *self.discord_rate_limited.render()]
        lines += [
            "# HELP imagine_discord_banned 1 while Discord's edge refuses every request of the bot (a ban), else 0.",
            "# TYPE imagine_discord_banned gauge",
            f"imagine_discord_banned {int(self.discord_banned())}",
        ]
        return "\n".join(lines) + "\n"
