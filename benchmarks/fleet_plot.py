"""The fleet simulation's Fig. 13-like plot: each shard's running batch over time, per policy."""

from __future__ import annotations

from benchmarks.fleet_model import Fleet
from benchmarks.fleet_sim import Simulation


def plot(runs: dict[str, Simulation], fleet: Fleet, path: str) -> bool:
    """Fig. 13-like: each shard's batch over time under each policy; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(runs) + 1, 1, figsize=(10, 3 + 3 * len(runs)), sharex=True, constrained_layout=True
    )
    first = next(iter(runs.values()))
    times = first.sample_times
    rate = [fleet.peak_rate * (1 - abs(2 * t / fleet.duration_s - 1)) for t in times]
    axes[0].plot(times, rate, color="black")
    axes[0].set_ylabel("arrivals / s")
    axes[0].set_title(
        f"{fleet.shards} shards, max batch {fleet.max_batch}, Poisson arrivals ramping to "
        f"{fleet.peak_rate:.0f}/s and back, {fleet.adapters} Zipf({fleet.zipf_exponent}) adapters"
    )
    for ax, (name, sim) in zip(axes[1:], runs.items(), strict=True):
        grid = list(map(list, zip(*sim.samples, strict=True)))  # shards x time
        image = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            cmap="Blues",
            vmin=0,
            vmax=fleet.max_batch,
            extent=(times[0], times[-1], -0.5, fleet.shards - 0.5),
            interpolation="nearest",
        )
        share = sim.state_s
        total = sum(share.values())
        ax.set_title(
            f"{name}: GPU time full {share['full'] / total:.0%}, partial "
            f"{share['partial'] / total:.0%}, idle {share['idle'] / total:.0%}"
        )
        ax.set_ylabel("shard (StatefulSet ordinal)")
        twin = ax.twinx()
        twin.plot(times, sim.releasable_top, color="tab:red", linewidth=1)
        twin.set_ylabel("releasable by scale-in", color="tab:red")
        twin.set_ylim(0, fleet.shards)
        fig.colorbar(image, ax=ax, label="running batch", pad=0.08)
    axes[-1].set_xlabel("seconds")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
