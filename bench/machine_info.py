"""What a benchmark ran on (CPU model, cores, memory, GPUs, library versions), printed beside its numbers."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe_machine(with_tensorflow: bool = True) -> dict[str, Any]:
    """Facts about this machine; ``with_tensorflow`` adds TF/Keras versions and visible GPUs (imports TF)."""
    facts: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    if with_tensorflow:
        import keras

        facts["keras"] = keras.__version__
        facts["keras_backend"] = keras.backend.backend()
        if facts["keras_backend"] == "tensorflow":
            import tensorflow as tf

            facts["tensorflow"] = tf.__version__
            facts["gpus"] = [device.name for device in tf.config.list_physical_devices("GPU")]
        else:
            from worker.inference import configure_devices

            facts["gpus"] = configure_devices()
    return facts


def machine_line(facts: dict[str, Any]) -> str:
    """One human line, e.g. for the README next to a table."""
    gpus = facts.get("gpus")
    gpu_text = "no GPU" if not gpus else f"{len(gpus)} GPU(s)"
    parts = [facts["cpu"], f"{facts['cores_available']} cores", f"{facts['memory_gib']} GiB RAM", facts["os"],
             f"Python {facts['python']}"]
    if "tensorflow" in facts:
        parts += [f"TensorFlow {facts['tensorflow']}", gpu_text]
    elif "keras_backend" in facts:
        parts += [f"Keras {facts['keras']} on {facts['keras_backend']}", gpu_text]
    return ", ".join(parts)
