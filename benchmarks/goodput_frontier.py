"""Goodput of an online bench.py run under several SLO pairs, from its per-request JSON: which setup serves more
requests within a given first-token and per-token latency, for SLOs tighter than the run's own (TTFT <= 1 s,
TPOT <= 100 ms, which every mode met for every request in session 30's Qwen3-8B runs). Also how many requests
never waited longer than 50 ms between two tokens (streaming without a visible stall).

Goodput as bench.py counts it: requests meeting both bounds, divided by the run's wall time.

    python benchmarks/goodput_frontier.py RUN.json [RUN.json ...] [--slo TTFT_MS,TPOT_MS ...]
"""
import argparse
import json

DEFAULT_SLOS = ["1000,100", "500,20", "300,15", "300,12", "200,10"]


def goodput(run: dict, ttft_ms: float, tpot_ms: float) -> float:
    met = sum(q["ttft_ms"] <= ttft_ms and (q["tpot_ms"] is None or q["tpot_ms"] <= tpot_ms)
              for q in run["per_request"])
    return met / run["seconds"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="bench.py --online ... --json files")
    p.add_argument("--slo", nargs="+", default=DEFAULT_SLOS, metavar="TTFT_MS,TPOT_MS")
    args = p.parse_args()
    slos = [tuple(map(float, pair.split(","))) for pair in args.slo]
    rows = [(path, run) for path in args.runs for run in json.load(open(path))["results"] if "per_request" in run]
    header = "".join(f"{f'{t:g}/{p:g}':>10}" for t, p in slos)
    width = max(len(path.split("/")[-1]) for path, _ in rows)
    for rate in sorted({run["rate"] for _, run in rows}):
        print(f"--- {rate:g} req/s: goodput (req/s) at TTFT/TPOT SLOs (ms); requests with no inter-token gap > 50 ms")
        print(f"{'mode':12} {'file':{width}}{header}  no gap > 50")
        for path, run in rows:
            if run["rate"] == rate:
                values = "".join(f"{goodput(run, t, p):10.2f}" for t, p in slos)
                smooth = sum(q["max_itl_ms"] is not None and q["max_itl_ms"] <= 50 for q in run["per_request"])
                print(f"{run['mode']:12} {path.split('/')[-1]:{width}}{values}  {smooth:4}/{len(run['per_request'])}")


if __name__ == "__main__":
    main()
