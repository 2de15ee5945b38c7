"""`python -m chaos run ...`: the chaos suite against real daemons (docs/chaos.md).

    python -m chaos run --smoke                       # 3 nemeses, about a minute
    python -m chaos run --full                        # every nemesis >= 30 s, then a 10-minute random mix
    python -m chaos run --seed 7 --nemeses kill,pause --per-nemesis 20 --mix 60 --out /tmp/chaos-7
    python -m chaos run --plant no_witness --nemeses kill   # a planted bug must be caught (exit 1)
    python -m chaos plants                            # every planted bug must be caught (exit 1 if one is not)
    python -m chaos list                              # the nemeses and the plants

(`python -m chaos.sim` and `python -m chaos.check` are the simulator and the offline checker.)
Exit status: 0 every check passed; 1 a violation; 2 a harness error or an unknown verdict.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
from pathlib import Path

FULL_PER_NEMESIS_S = 30.0
FULL_MIX_S = 600.0


def _names(text: str, known: list[str], what: str) -> list[str]:
    if text == "all":
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"chaos: unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _hold(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    return float(low), float(high or low)


def _rerun(args: argparse.Namespace, seed: int) -> str:
    parts = ["python", "-m", "chaos", "run", "--seed", str(seed), "--out", args.out]
    for text in args.site_setting:
        parts += ["--site-setting", text]
    for option in ("nemeses", "mix_nemeses", "hold", "plant", "plant_sites"):
        value = getattr(args, option)
        if value:
            parts += [f"--{option.replace('_', '-')}", value]
    for option in ("per_nemesis", "mix", "clients", "keys", "liveness_bound", "combine"):
        value = getattr(args, option)
        if value is not None:
            parts += [f"--{option.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def main(argv: list[str] | None = None) -> int:
    from chaos.suite import nemeses, run
    from chaos.suite.workload import WorkloadConfig
    from replicator.core.config import PLANTS

    parser = argparse.ArgumentParser(prog="python -m chaos", description="The chaos suite (real daemons).")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the nemeses and the plants")
    one = commands.add_parser("run", help="one run: deployment, workload, faults, checks, report")
    one.add_argument("--seed", type=int, default=None, help="the fault schedule's seed (default: random, printed)")
    one.add_argument("--out", default=None, help="report folder (default /tmp/chaos-SEED); emptied first")
    one.add_argument("--smoke", action="store_true", help=f"preset: {', '.join(run.SMOKE_NEMESES)}, one episode each")
    one.add_argument("--full", action="store_true",
                     help=f"preset: every nemesis for {FULL_PER_NEMESIS_S:.0f} s, then a {FULL_MIX_S:.0f} s mix")
    one.add_argument("--nemeses", default=None, help="comma-separated, run each alone in order, or 'all'")
    one.add_argument("--per-nemesis", type=float, default=None, help="seconds of each nemesis (>= 1 episode)")
    one.add_argument("--mix", type=float, default=None, help="seconds of random combinations afterwards")
    one.add_argument("--mix-nemeses", default=None, help="what the mix draws from (default all)")
    one.add_argument("--combine", type=int, default=None, help="at most this many nemeses at once in the mix (2)")
    one.add_argument("--hold", default=None, help="fault hold time MIN:MAX seconds (default 2:5)")
    one.add_argument("--plant", default=None, help="a planted bug in the sites (REPLICATOR_CHAOS=1 is set for them)")
    one.add_argument("--plant-sites", default=None, help="which sites get the plant: a, b or a,b (default)")
    one.add_argument("--clients", type=int, default=None, help="clients per site (3)")
    one.add_argument("--keys", type=int, default=None, help="key space size (8)")
    one.add_argument("--liveness-bound", type=float, default=None, help="seconds to be SYNC again after a heal (60)")
    one.add_argument("--site-setting", action="append", default=[], metavar="SITE.NAME=INT",
                     help="a [site] setting for one site, e.g. b.peer_timeout_ms=3000 (repeatable)")
    one.add_argument("--no-client-proxies", action="store_true",
                     help="clients talk to the sites directly (the client-link proxies carry no traffic)")
    plants = commands.add_parser(
        "plants", help="run every planted bug with the nemeses aimed at it; exit 1 unless each is caught"
    )
    plants.add_argument("--only", default=None, help="comma-separated plants (default all)")
    plants.add_argument("--attempts", type=int, default=4, help="runs per plant, fresh seed each (4)")
    plants.add_argument("--per-nemesis", type=float, default=30.0, help="seconds of each aimed nemesis per run (30)")
    plants.add_argument("--seed", type=int, default=1, help="base seed (attempt k of seed s runs seed 100*s+k)")
    plants.add_argument("--out", default="/tmp/chaos-plants", help="report folders go under here")
    args = parser.parse_args(argv)

    if args.command == "plants":
        return _plants(args)
    if args.command == "list":
        print("nemeses:")
        for name, cls in nemeses.NEMESES.items():
            print(f"  {name:<20} {cls.description}")
        print("plants (--plant):")
        for name, text in PLANTS.items():
            print(f"  {name:<24} {text}")
        return 0

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    args.out = args.out or f"/tmp/chaos-{seed}"
    config = run.RunConfig(out=Path(args.out), seed=seed)
    if args.full:
        config.nemeses = list(nemeses.NEMESES)
        config.per_nemesis_s = FULL_PER_NEMESIS_S
        config.mix_s = FULL_MIX_S
    if args.nemeses in ("", "none"):
        config.nemeses = []
    elif args.nemeses:
        config.nemeses = _names(args.nemeses, list(nemeses.NEMESES), "nemesis")
    if args.per_nemesis is not None:
        config.per_nemesis_s = args.per_nemesis
    if args.mix is not None:
        config.mix_s = args.mix
    if args.mix_nemeses:
        config.mix_nemeses = _names(args.mix_nemeses, list(nemeses.NEMESES), "nemesis")
    if args.combine is not None:
        config.combine_max = args.combine
    if args.hold:
        config.hold_min_s, config.hold_max_s = _hold(args.hold)
    if args.plant:
        if args.plant not in PLANTS:
            raise SystemExit(f"chaos: unknown plant {args.plant}; known: {', '.join(PLANTS)}")
        config.plant = args.plant
        if args.plant_sites:
            config.plant_sites = tuple(_names(args.plant_sites, ["a", "b"], "site"))
    config.workload = WorkloadConfig(
        clients_per_site=args.clients or 3, keys=args.keys or 8, seed=seed
    )
    config.client_proxies = not args.no_client_proxies
    for text in args.site_setting:
        target, _, value = text.partition("=")
        site, _, name = target.partition(".")
        if site not in ("a", "b") or not name or not value.lstrip("-").isdigit():
            raise SystemExit(f"chaos: --site-setting wants SITE.NAME=INT with SITE a or b, got {text!r}")
        config.site_overrides.setdefault(site, {})[name] = int(value)
    if args.liveness_bound is not None:
        config.liveness_bound_s = args.liveness_bound
    config.command = _rerun(args, seed)
    print(f"chaos: seed {seed}, report in {args.out}", flush=True)
    summary = run.run(config, log=lambda line: print(line, flush=True))
    for check in summary["checks"]:
        print(f"  {check['checker']:<16} {check['status']:<10} {str(check['message'])[:160]}")
    for name, row in sorted(summary["per_nemesis"].items()):
        w = row["write_rto_ms"]
        print(f"  {name:<20} episodes {row['episodes']:<3} write RTO median {w['median']} ms, worst {w['worst']} ms")
    ops = summary["operations"]
    print(f"chaos: {summary['status'].upper()}: {ops['total']} operations, {ops['acknowledged_writes']} acknowledged "
          f"writes, {summary['faults']['episodes']} fault episodes; report {args.out}/summary.md")
    if not summary["passed"]:
        print(f"chaos: run it again with: {summary['rerun']}", file=sys.stderr)
        return 1 if summary["status"] == "violation" else 2
    return 0


def _plants(args: argparse.Namespace) -> int:
    import json

    from chaos.suite import plants
    from replicator.core.config import PLANTS

    names = _names(args.only, list(PLANTS), "plant") if args.only else list(PLANTS)
    missing = [n for n in names if n not in plants.AIMED]
    if missing:
        raise SystemExit(f"chaos: no aimed nemeses for {', '.join(missing)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = plants.run_plants(names, out, seed=args.seed, attempts=args.attempts, per_nemesis_s=args.per_nemesis,
                                log=lambda line: print(line, flush=True))
    (out / "plants.json").write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    print(f"{'plant':<24} {'caught':<7} {'attempts':<9} {'seconds':<8} by")
    for r in results:
        print(f"{r.plant:<24} {'yes' if r.caught else 'NO':<7} {r.attempts:<9} {r.seconds:<8} {', '.join(r.checkers)}")
    missed = [r.plant for r in results if not r.caught]
    if missed:
        print(f"chaos: NOT CAUGHT: {', '.join(missed)} (results in {out}/plants.json)", file=sys.stderr)
        return 1
    print(f"chaos: every plant caught ({len(results)}); results in {out}/plants.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
