"""Joining or starting Ray, the same way for every command that needs it."""
from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray in this process.

    Returns True when this call started or joined Ray (the caller then shuts it down), False when
    Ray was already initialised (a test session, a notebook): that session is left as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # local single-user session
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level=logging.WARNING)
    return True
