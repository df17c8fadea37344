"""Geometry of the dashboard's small charts; the templates draw it as inline SVG (no script, nothing downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

#: Drawing area of a rate chart, in SVG user units.
CHART_WIDTH = 600
CHART_HEIGHT = 120
#: Room left of the plot for the axis values, and under it for the time ticks.
LEFT_MARGIN = 44
BOTTOM_MARGIN = 18


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    #: What a pointer over the bar shows (SVG ``<title>``).
    label: str


@dataclass(frozen=True)
class Tick:
    x: float
    text: str


@dataclass(frozen=True)
class RateChart:
    """Per-minute rates as bars, scaled to the busiest minute."""

    title: str
    unit: str
    bars: tuple[Bar, ...]
    ticks: tuple[Tick, ...]
    peak: float
    mean: float
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT
    left: int = LEFT_MARGIN
    bottom: int = BOTTOM_MARGIN

    @property
    def plot_height(self) -> int:
        return self.height - self.bottom


def rate_chart(title: str, unit: str, counts_per_minute: list[int], end: datetime) -> RateChart:
    """Bars of ``count / 60`` per second for each minute up to ``end`` (oldest first), with ticks every 15 minutes."""
    minutes = len(counts_per_minute)
    rates = [count / 60.0 for count in counts_per_minute]
    peak = max(rates, default=0.0)
    plot_width = CHART_WIDTH - LEFT_MARGIN
    plot_height = CHART_HEIGHT - BOTTOM_MARGIN
    slot = plot_width / max(minutes, 1)
    start = end - timedelta(minutes=minutes)
    bars = []
    for index, (count, rate) in enumerate(zip(counts_per_minute, rates, strict=True)):
        height = 0.0 if peak == 0 else plot_height * rate / peak
        minute = start + timedelta(minutes=index)
        bars.append(Bar(x=LEFT_MARGIN + index * slot + 0.5, y=plot_height - height, width=max(slot - 1.0, 0.5),
                        height=height, label=f"{minute:%H:%M} UTC: {count} {unit} ({rate:.2f}/s)"))
    ticks = tuple(Tick(x=LEFT_MARGIN + index * slot, text=f"-{minutes - index} min" if index < minutes else "now")
                  for index in range(0, minutes + 1, 15))
    mean = sum(rates) / minutes if minutes else 0.0
    return RateChart(title=title, unit=unit, bars=tuple(bars), ticks=ticks, peak=peak, mean=mean)
