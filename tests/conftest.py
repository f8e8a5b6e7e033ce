"""Shared pytest setup: make tests/ helpers importable and keep preset caches inside the test session."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# The tiny preset's ops are far too small to gain from intra-op threads, and on a 2-core machine
# shared with Ray rank processes, spinning OpenMP workers slow every op down by 10x or more.
torch.set_num_threads(int(os.environ.get("RAYINFER_TEST_THREADS", "1")))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (everything on 127.0.0.1) for the whole test session."""
    import ray

    from rayinfer.actors.cluster import ensure_ray

    ensure_ray(num_cpus=16)  # logical CPUs: rank replicas take fractions of the 2 real cores
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()
