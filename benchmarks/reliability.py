"""Reliability suite of the gRPC service (issue 13): fuzzing through the real API, bombs,
stream faults, SIGKILL during ingest, the auth matrix, a PHI grep, and overload.

One ``medseek serve`` subprocess (tokens on, a de-identification key configured, an 8 MiB
message limit) takes the PHI probe, then the fuzz cases, then the auth matrix; after a
graceful stop its store, index files and log, and every response it gave, are searched for
the probe's identifiers and the patient names and ids of the fuzzer's DICOM seeds. SIGKILL
trials and the overload run use servers of their own. ``tests/test_reliability.py`` runs a
CI-sized tier of the same code; the long tier is this script::

    nice -n 19 python benchmarks/reliability.py --cases 10000 --sigkill 20 --overload \\
        --out /tmp/reliability --json /tmp/reliability/summary.json

One case again (its number and the run's ``--seed`` fix it)::

    python benchmarks/reliability.py --only-case 1234 --seed 0 --sigkill 0

Targets (long tier): 0 crashes, 0 hangs, 0 INTERNAL over >= 10,000 cases; 0 acked items
lost over 20 SIGKILL trials; 0 PHI; light p99 under a 64-client heavy/light mix <= 3x its
unloaded p99 (reported, not asserted). The overload as RESULTS.md reports it (light
clients at one query per 0.5 s each, the ONNX Runtime towers, image and volume searches in
an upload worker)::

    python benchmarks/reliability.py --cases 0 --sigkill 0 --overload --overload-seconds 30 \
        --light-interval 0.5 --overload-encoder onnx --serve-set upload_workers=1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402

from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

import reliability_fuzz as fz  # noqa: E402
import reliability_seeds as seeds  # noqa: E402
import reliability_trials as trials  # noqa: E402
from reliability_server import MIB, ServerProcess  # noqa: E402

DEFECT_KINDS = ("crash", "hang", "internal")


def ingest_baseline(server: ServerProcess) -> None:
    """The items fuzz cases refer to (``base-img`` with a region, ``base-vol`` with an
    organ, ``base-txt``) and a few more, so searches reach non-empty collections."""
    with RetrievalClient(server.address, token=server.token) as c:
        c.ingest([pb.IngestItem(id="base-img", image=seeds.png_bytes(48), labels=["a"],
                                regions=[pb.Region(name="centre",
                                                   box=pb.Box(x0=8, y0=8, x1=40, y1=40))]),
                  pb.IngestItem(id="base-vol", volume=seeds.nifti_bytes(), labels=["b"],
                                regions=[pb.Region(name="liver",
                                                   z_range=pb.ZRange(z_start=2, z_end=9))]),
                  pb.IngestItem(id="base-txt", text=seeds.REPORTS[0], labels=["effusion"])]
                 + [pb.IngestItem(id=f"base-r{i}", text=r) for i, r in enumerate(seeds.REPORTS)]
                 + [pb.IngestItem(id=f"base-i{i}", image=seeds.png_bytes(40, i))
                    for i in range(4)], timeout=600)


class FuzzRun:
    """Runs cases ``start .. start+count-1`` with ``workers`` threads against ``server``,
    restarting it after a crash; ``summary()`` counts the outcomes."""

    def __init__(self, server: ServerProcess, run_seed: int, out_dir: Path | None,
                 needles: list[bytes], log=print) -> None:
        self.server, self.log, self.out_dir, self.needles = server, log, out_dir, needles
        self.factory = fz.CaseFactory(seeds.build_seeds(), run_seed, 8 * MIB)
        self.lock = threading.Lock()
        self.kinds, self.codes, self.by_target = Counter(), Counter(), Counter()
        self.defects, self.phi_hits, self.crashes = [], [], []
        self.generation = 0
        self._connect()

    def _connect(self) -> None:
        self.channel = grpc.insecure_channel(self.server.address, options=[
            ("grpc.max_send_message_length", 64 * MIB),
            ("grpc.max_receive_message_length", 64 * MIB)])
        self.stub = fz.RawStub(self.channel)

    def _record(self, case: fz.Case, out: fz.Outcome, generation: int) -> None:
        with self.lock:
            if out.kind == "crash":
                if generation != self.generation:  # in flight when another case crashed it
                    out.kind = "crash-collateral"
                else:
                    self.crashes.append({"cases": [out.n], "returncode": self.server.returncode()})
                    self.log(f"  CRASH at case {out.n} ({out.target}); restarting")
                    self.server.kill()
                    self.server.start()
                    self.channel.close()
                    self._connect()
                    self.generation += 1
            self.kinds[out.kind] += 1
            self.codes[out.code] += 1
            self.by_target[(out.target.split(".")[0], out.code)] += 1
            for resp in out.responses:
                self.phi_hits += [f"case {out.n}: {n.decode(errors='replace')}"
                                  for n in self.needles if n in resp]
            if out.kind in DEFECT_KINDS:
                self.defects.append({k: getattr(out, k) for k in (
                    "n", "target", "seed", "mutation", "code", "kind", "detail", "elapsed")})
                if self.out_dir is not None:
                    (self.out_dir / "cases").mkdir(parents=True, exist_ok=True)
                    (self.out_dir / "cases" / f"{out.n}.bin").write_bytes(case.payload)

    def run(self, start: int, count: int, workers: int = 1, time_limit: float = float("inf")
            ) -> int:
        """Run the cases; returns how many ran (fewer when ``time_limit`` s ran out)."""
        numbers = iter(range(start, start + count))
        t0, ran = time.monotonic(), Counter()

        def worker() -> None:
            while time.monotonic() - t0 < time_limit:
                with self.lock:
                    n = next(numbers, None)
                    generation, stub = self.generation, self.stub
                if n is None:
                    return
                try:
                    case = self.factory.make(n)
                except Exception as exc:  # noqa: BLE001 - a fault of this script, not the server
                    with self.lock:
                        self.kinds["harness-error"] += 1
                        self.log(f"  case {n}: the fuzzer could not build it: {exc!r}")
                    continue
                out = fz.run_case(case, stub, self.server.metadata, self.server.alive)
                self._record(case, out, generation)
                with self.lock:
                    ran["n"] += 1
                    if ran["n"] % 500 == 0:
                        self.log(f"  {ran['n']} cases, {time.monotonic() - t0:.0f} s, "
                                 f"{dict(self.kinds)}")

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return ran["n"]

    def consistency(self) -> dict:
        """After the cases: the server answers, and every index agrees with the store."""
        with RetrievalClient(self.server.address, token=self.server.token) as c:
            stats = c.stats(timeout=120)
        return {c.name: (c.items, c.indexed) for c in stats.collections}

    def summary(self, ran: int) -> dict:
        return {"cases": ran, "crashes": len(self.crashes), "hangs": self.kinds["hang"],
                "internal": self.kinds["internal"], "kinds": dict(self.kinds),
                "codes": dict(self.codes),
                "by_target": {f"{t} {c}": v for (t, c), v in sorted(self.by_target.items())},
                "defects": self.defects[:200], "crash_events": self.crashes,
                "server_starts": self.server.starts}


def fuzz_phi_auth(workdir: Path, cases: int, seed: int = 0, workers: int = 1,
                  time_limit: float = float("inf"), only_case: int | None = None,
                  out_dir: Path | None = None, log=print) -> dict:
    """The PHI probe, ``cases`` fuzz cases and the auth matrix on one server, then the PHI
    grep of its files, log and responses."""
    server = ServerProcess(Path(workdir), tokens=True)
    needles = trials.phi_strings() + trials.seed_phi_strings()
    server.start()
    try:
        ingest_baseline(server)
        probe_responses = trials.phi_probe(server)
        run = FuzzRun(server, seed, out_dir, needles, log)
        t0 = time.monotonic()
        if only_case is not None:
            ran = run.run(only_case, 1)
        else:
            ran = run.run(0, cases, workers, time_limit)
        fuzz_s = time.monotonic() - t0
        rss = server.rss_mib()
        index_vs_store = run.consistency()
        auth = trials.auth_matrix(server)
        run.channel.close()
    finally:
        exit_code = server.stop()
    phi = trials.grep_phi(server.files() + [server.log_path], probe_responses, needles)
    result = run.summary(ran)
    result.update(fuzz_s=fuzz_s, server_rss_mib=rss, index_vs_store=index_vs_store,
                  index_mismatch={k: v for k, v in index_vs_store.items() if v[0] != v[1]},
                  auth=auth, phi_found=len(phi) + len(run.phi_hits),
                  phi_hits=(phi + run.phi_hits)[:50], phi_needles=len(needles),
                  phi_files=[p.name for p in server.files()], clean_exit=exit_code == 0)
    return result


def _serve_sets(pairs: list[str]) -> dict:
    """``--serve-set KEY=JSON`` pairs -> ServeConfig overrides."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--serve-set {pair!r}: expected KEY=JSON")
        out[key] = json.loads(value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="concurrent fuzz clients")
    p.add_argument("--fuzz-minutes", type=float, default=float("inf"),
                   help="stop starting new cases after this long")
    p.add_argument("--only-case", type=int, help="run this one case (a reproducer)")
    p.add_argument("--sigkill", type=int, default=20, help="SIGKILL trials")
    p.add_argument("--overload", action="store_true", help="run the 64-client overload mix")
    p.add_argument("--overload-seconds", type=float, default=60.0)
    p.add_argument("--light-interval", type=float, default=0.0,
                   help="overload: each light client sends one request per this many seconds "
                        "(0: back to back)")
    p.add_argument("--overload-encoder", choices=("local", "onnx"), default="local",
                   help="overload: the server's encoder, torch in process or the same towers "
                        "in ONNX Runtime")
    p.add_argument("--heavy-nice", type=int, default=0,
                   help="overload: niceness of the heavy clients' process (they stand in for "
                        "other machines)")
    p.add_argument("--serve-set", action="append", default=[], metavar="KEY=JSON",
                   help="overload: a ServeConfig key for the server, e.g. "
                        "gil_switch_interval_ms=0.5 (repeatable)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write the summary here")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="medseek-reliability-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    summary = {"argv": sys.argv[1:] if argv is None else argv}
    print(f"fuzz + PHI + auth ({args.cases} cases, {args.workers} workers) in {out}", flush=True)
    summary["fuzz"] = fuzz_phi_auth(out / "fuzz", args.cases, args.seed, args.workers,
                                    args.fuzz_minutes * 60, args.only_case, out)
    f = summary["fuzz"]
    print(f"  {f['cases']} cases in {f['fuzz_s']:.0f} s: {f['crashes']} crashes, {f['hangs']} "
          f"hangs, {f['internal']} internal; PHI found {f['phi_found']}; auth failures "
          f"{len(f['auth']['failures'])}; codes {f['codes']}", flush=True)
    _dump(summary, args.json)
    if args.sigkill:
        print(f"SIGKILL trials: {args.sigkill}", flush=True)
        summary["sigkill"] = trials.sigkill_trials(out / "sigkill", args.sigkill, args.seed)
        print(f"  {summary['sigkill']}", flush=True)
        _dump(summary, args.json)
    if args.overload:
        from reliability_load import overload

        print(f"overload: {args.clients} clients", flush=True)
        summary["overload"] = overload(out / "overload", args.clients,
                                       duration_s=args.overload_seconds,
                                       light_interval_s=args.light_interval,
                                       encoder=args.overload_encoder,
                                       heavy_nice=args.heavy_nice,
                                       serve_extra=_serve_sets(args.serve_set))
        print(f"  {summary['overload']}", flush=True)
    summary["wall_s"] = time.monotonic() - t0
    _dump(summary, args.json)
    bad = f["crashes"] + f["hangs"] + f["internal"] + f["phi_found"] + len(f["auth"]["failures"])
    bad += summary.get("sigkill", {}).get("lost", 0)
    return 1 if bad else 0


def _dump(summary: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
