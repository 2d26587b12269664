"""Does `moska serve --device cuda:N` put everything on GPU N? Starts the server on the
built-in tiny model (CUDA graphs on, as served), sends a greedy completion of token ids,
and reads which GPUs the server's process holds memory on (`nvidia-smi`): weights, KV,
graph pools and Triton's launches all follow the device, so only GPU N may appear. The
same completion on `--device cuda:0` (or cpu) must give the same tokens.

    python -m moska.bench.pd_device_check --device cuda:1 --out /tmp/out/device_check.json
    python -m moska.bench.pd_device_check --device cpu --reference-device cpu   # CPU form
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import httpx

from moska.pd.cluster import Cluster, free_port


def _serve(device: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "moska.cli", "serve", "--port", str(port), "--device", device,
           "--no-demo-library"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def gpus_of(pid: int) -> dict[str, int]:
    """GPU index -> MiB this pid holds (empty without nvidia-smi)."""
    try:
        uuids = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
        apps = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    index = {u.strip(): i.strip() for i, u in (x.split(",") for x in uuids.splitlines() if x)}
    out: dict[str, int] = {}
    for line in apps.splitlines():
        p, uuid, mib = (x.strip() for x in line.split(","))
        if p == str(pid):
            out[index.get(uuid, uuid)] = out.get(index.get(uuid, uuid), 0) + int(mib)
    return out


def run_one(device: str, prompt: list[int], max_tokens: int) -> dict:
    proc, url = _serve(device)
    cluster = Cluster(urls={"s": url}, processes={"s": proc})
    try:
        t0 = time.monotonic()
        _wait(proc, url, 300.0)
        started = time.monotonic() - t0
        body = {"model": _model(url), "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "logprobs": 0}  # fmt: skip
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        tokens = choice.get("token_ids") or choice["text"]
        return {"device": device, "startup_s": round(started, 2), "output": tokens,
                "gpu_mib_by_index": gpus_of(proc.pid)}  # fmt: skip
    finally:
        cluster.stop()


def _model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def _wait(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"moska serve exited ({proc.returncode}): {err}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"moska serve not up within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    from moska.bench.common import environment, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:1")
    ap.add_argument("--reference-device", default="cuda:0")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default="bench/results/pd_device_check.json")
    args = ap.parse_args(argv)
    prompt = [(37 * i + 11) % 200 + 10 for i in range(40)]
    runs = [run_one(d, prompt, args.max_tokens) for d in (args.device, args.reference_device)]
    want = args.device.split(":")[1] if ":" in args.device else None
    on = runs[0]["gpu_mib_by_index"]
    summary = {
        "same_tokens": runs[0]["output"] == runs[1]["output"],
        "gpus_used": sorted(on),
        "only_its_gpu": None if want is None or not on else sorted(on) == [want],
    }
    report = {"benchmark": "pd_device_check", "environment": environment(),
              "config": vars(args), "runs": runs, "summary": summary}  # fmt: skip
    write_json(args.out, report)
    print(json.dumps(summary), f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
