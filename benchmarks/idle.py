"""What an idle expert-parallel gang costs: CPU of its rank processes between requests, thread by thread.

Target (issue 4): a 4-rank idle gang uses under 5% of one core. This starts a gang on a local Ray
cluster, serves a batch (so every rank has run collectives), waits for it to go idle, then
samples every thread of every rank process over a window, next to a bare Ray actor started in
the same cluster (the floor any Ray actor process pays). Threads are grouped by who runs them:
  - engine loop: rayinfer's step loop (blocked on the gang's doorbell while idle);
  - ray main: the worker's main thread (Ray wakes it every 10 ms to check for signals);
  - gloo loop: torch.distributed's gloo transport thread (epoll with a 10 ms timeout);
  - other: Ray's io/gRPC threads, Serve's event loops, rayinfer's request handlers.
Run: python benchmarks/idle.py [--ep 4] [--window 30] [--model tiny]
"""
from __future__ import annotations

import argparse
import collections
import os
import time

TARGET = 0.05  # of one core, for the whole gang


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12]))
    return out


def group_of(pid: int, tid: int, name: str, engine_tid: int | None) -> str:
    if tid == engine_tid:
        return "engine loop"
    if tid == pid:
        return "ray main"
    if name.startswith("gloo"):
        return "gloo loop"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--window", type=float, default=30.0, help="seconds sampled (the heartbeat is 30 s)")
    args = ap.parse_args()

    import ray

    from rayinfer import LLM, SamplingParams
    from rayinfer.actors.cluster import ensure_ray

    ensure_ray()

    @ray.remote(num_cpus=0)
    class Bare:
        def pid(self) -> int:
            return os.getpid()

    bare = Bare.remote()
    bare_pid = ray.get(bare.pid.remote())
    llm = LLM(args.model, ep_size=args.ep)
    try:
        llm.generate([[5 + i] * (8 + i) for i in range(8)], SamplingParams(max_tokens=16, ignore_eos=True),
                     use_tqdm=False)
        time.sleep(3.0)
        stats = llm.gang.stats()
        procs = {s["pid"]: s["engine_tid"] for s in stats}
        procs[bare_pid] = None
        before = {pid: thread_ticks(pid) for pid in procs}
        t0 = time.time()
        time.sleep(args.window)
        elapsed = time.time() - t0
        after = {pid: thread_ticks(pid) for pid in procs}
        votes = [s["votes"] for s in llm.gang.stats()], [s["votes"] for s in stats]
    finally:
        llm.shutdown()
        ray.kill(bare)

    hz = os.sysconf("SC_CLK_TCK")
    share = {}
    for pid, engine_tid in procs.items():
        groups = collections.Counter()
        for tid, (name, ticks) in after[pid].items():
            groups[group_of(pid, tid, name, engine_tid)] += ticks - before[pid].get(tid, (name, 0))[1]
        share[pid] = {g: n / hz / elapsed for g, n in groups.items()}
    names = ["engine loop", "ray main", "gloo loop", "other"]
    print(f"model={args.model} ep={args.ep}: idle window {elapsed:.1f} s, collectives run in it per rank: "
          f"{[a - b for a, b in zip(*votes)]}")
    print(f"{'process':<16}" + "".join(f"{n:>13}" for n in names) + f"{'total':>10}   (% of one core)")
    for pid in procs:
        label = "bare Ray actor" if pid == bare_pid else f"rank pid {pid}"
        print(f"{label:<16}" + "".join(f"{100 * share[pid].get(n, 0.0):>13.2f}" for n in names)
              + f"{100 * sum(share[pid].values()):>10.2f}")
    gang = sum(sum(share[pid].values()) for pid in procs if pid != bare_pid)
    floor = args.ep * sum(share[bare_pid].values())
    print(f"idle {args.ep}-rank gang: {100 * gang:.2f}% of one core (target < {100 * TARGET:.0f}%: "
          f"{'met' if gang < TARGET else 'NOT met'}); {args.ep} bare Ray actors would use {100 * floor:.2f}%")


if __name__ == "__main__":
    main()
