"""The proposal stage here and on Ray, its resume and its append, timed end to end (docs/performance.md).

    python tools/bench_cluster.py [--photos 64] [--append 16] [--size 480x320] [--json OUT]

Synthetic photos with COCO ground truth (tools/make_demo_data.py), `tools/propose.py` run as a user runs it, each
row a fresh --out:
- `here`: `--workers` = the cores; `ray 1 node`: `--ray` on a one-node cluster of the same cores; `ray 2 nodes`:
  two nodes of half the cores each (ray.cluster_utils.Cluster, on this machine). photos/s over the whole command
  (Python start, Ray connection, shards and manifest included) and the engine's overhead against `here`;
- `resume`: a run SIGKILLed once half its chunks of photos are recorded, then the same command: its seconds, the
  photos and shards it reused, against a whole run;
- `append`: `--append` of `--append` new photos to the pack of the others, against proposing all of them anew.
Every Ray row's pack is checked byte-identical to `here`'s.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from crackio.cli import ArgumentParser  # noqa: E402
from tools.make_demo_data import write_photos  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROPOSE = [sys.executable, str(ROOT / "tools" / "propose.py")]


def files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != ".crackio.lock"
    }


def subset(src: Path, out: Path, names: set[str]) -> None:
    """The COCO dataset `src` (split folders) with only the photos named `names`, hard-linked into `out`."""
    for split_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        coco = json.loads((split_dir / "_annotations.coco.json").read_text())
        keep = {i["id"] for i in coco["images"] if i["file_name"] in names}
        coco["images"] = [i for i in coco["images"] if i["id"] in keep]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        (out / split_dir.name).mkdir(parents=True)
        (out / split_dir.name / "_annotations.coco.json").write_text(json.dumps(coco))
        for i in coco["images"]:
            os.link(split_dir / i["file_name"], out / split_dir.name / i["file_name"])


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - t0, done.stdout


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=64, help="photos of the pack")
    ap.add_argument("--append", type=int, default=16, help="photos appended to it")
    ap.add_argument("--size", default="480x320", help="photos' WIDTHxHEIGHT")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    cores = len(os.sched_getaffinity(0))
    flags = ["--format", "coco", "--max-proposals", "300", "--samples-per-shard", "500", "--quiet"]
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="crackio-bench-cluster-") as tmp:
        root = Path(tmp)
        write_photos(root / "all", images=args.photos + args.append, seed=3, size=(width, height), formats=("coco",))
        src = root / "all" / "coco"
        names = sorted(p.name for p in src.rglob("*.jpg"))
        subset(src, root / "base", set(names[: args.photos]))
        subset(src, root / "new", set(names[args.photos :]))
        here, out = timed([*PROPOSE, str(src), "--out", str(root / "here"), "--workers", str(cores), *flags])
        reference = files(root / "here")
        total = args.photos + args.append
        rows.append({"row": "here", "nodes": 1, "cpus": cores, "seconds": here, "photos_s": total / here})
        for nodes in (1, 2):
            cluster = Cluster(
                initialize_head=True, head_node_args={"num_cpus": cores // nodes, "include_dashboard": False}
            )
            try:
                for _ in range(nodes - 1):
                    cluster.add_node(num_cpus=cores // nodes)
                cluster.wait_for_nodes()
                target = root / f"ray{nodes}"
                seconds, _ = timed([*PROPOSE, str(src), "--out", str(target), *flags, "--ray", cluster.address])
            finally:
                cluster.shutdown()
            same = files(target) == reference
            rows.append({"row": f"ray {nodes} node{'s' if nodes > 1 else ''}", "nodes": nodes, "cpus": cores,
                         "seconds": seconds, "photos_s": total / seconds, "vs_here": here / seconds,
                         "identical": same})  # fmt: skip
        # Resume: killed once half the chunks are recorded.
        target = root / "killed"
        cmd = [*PROPOSE, str(src), "--out", str(target), "--workers", str(cores), *flags]
        chunks = -(-total // 16)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while len(list((target / ".spool").glob("chunk-*.npz"))) < chunks // 2 and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        seconds, printed = timed(cmd)
        reused = printed.split("reused from an interrupted run: ")[1].split(";")[0] if "reused from" in printed else ""
        row = {"row": "resume after kill -9 at half the chunks", "seconds": seconds, "vs_whole_run": seconds / here}
        rows.append({**row, "reused": reused, "identical": files(target) == reference})
        # Append: the first --photos, then the rest appended; against all of them proposed anew (`here`).
        target = root / "appended"
        timed([*PROPOSE, str(root / "base"), "--out", str(target), "--workers", str(cores), *flags])
        seconds, _ = timed(
            [*PROPOSE, str(root / "new"), "--out", str(target), "--workers", str(cores), *flags, "--append"]
        )
        rows.append({"row": f"append {args.append} photos to {args.photos}", "seconds": seconds,
                     "vs_whole_run": seconds / here})  # fmt: skip
    machine = f"{platform.node()} {cores} cores, {platform.processor() or platform.machine()}"
    print(f"{total} photos {width}x{height}, --max-proposals 300; {machine}; {time.strftime('%Y-%m-%d')}")
    for r in rows:
        print("  " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
