"""rayinfer's simulator: a deployment in simulated time (`rayinfer simulate`).

The project's own scheduler, block manager, disk-tier logic, prefill/decode balancers and EPLB run unchanged
over simulated ranks (rank.py, cluster.py); step durations come from a per-kernel cost model (cost.py) over
hardware profiles (hardware.py, fitted to published kernel figures in calibration.py); traffic is synthetic or
a replayed trace (workload.py); run.py drives the hours and results.py turns what happened into the metric
series `rayinfer report` reads. No Ray and no torch on the hot path (torch only places experts, once).
"""
