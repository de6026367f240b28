"""Masking benchmark: prints figures and writes bench/results/mask.json.

Run: .venv/bin/python bench/mask_bench.py
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from broker.config import Masking
from proxy.jsonmask import JsonStreamMasker
from proxy.mask import Masker

CHUNK = 32 * 1024
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "total",
    "drwxr-xr-x",
    "root",
    "user",
    "4096",
    "Jan",
    "12",
    "10:22",
    "config.yaml",
    "README.md",
    "src",
    "tests",
    "error",
    "warning",
    "info",
    "GET",
    "/api/v1/users",
    "200",
    "ms",
    "/usr/lib/python3.11/site-packages",
]


def best(fn: object, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.process_time()  # CPU time: the machine is shared, wall time is noisy
        fn()  # type: ignore[operator]
        times.append(time.process_time() - t)
    return min(times)


def ssh_text(rng: random.Random, lines: int, sensitive_every: int) -> bytes:
    out = []
    for i in range(lines):
        line = f"2024-01-{i % 28 + 1:02d} 12:{i % 60:02d}:{i % 60:02d} host-{i % 97} pid={i} "
        line += " ".join(rng.choice(WORDS) for _ in range(8))
        if sensitive_every and i % sensitive_every == 0:
            line += rng.choice([" user=alice@example.com", " card=4111 1111 1111 1111", " AKIAIOSFODNN7EXAMPLE"])
        out.append(line)
    return ("\n".join(out) + "\n").encode()


def bench_ssh(masker: Masker, data: bytes) -> float:
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]

    def run() -> None:
        s = masker.stream()
        for c in chunks:
            s.feed(c)
        s.flush()

    return len(data) / best(run) / 1e6


def bench_rows(masker: Masker, rows: int) -> dict[str, float]:
    """A result with 5 text columns, 2 of them masked by column rules (hash and partial)."""
    rng = random.Random(2)
    table = [
        [
            str(i).encode(),
            rng.choice([b"alice", b"bob", b"carol", b"dave"]),
            f"user{i % 5000}@example.com".encode(),
            b"4111111111111111",
            b"2024-01-15 10:22:33+00",
        ]
        for i in range(rows)
    ]
    strategies = [masker.column_strategy(c, "public.users") for c in ("id", "name", "email", "card", "created_at")]
    mask_row, mask_rows = masker.mask_row, masker.mask_rows

    def direct() -> None:
        for row in table:
            b"".join(row)

    def masked() -> None:
        for row in table:
            out = mask_row(row, strategies)
            b"".join(row if out is None else out)  # type: ignore[arg-type]

    def masked_batched() -> None:  # 100 rows per network chunk, one prefilter per chunk
        for k in range(0, len(table), 100):
            batch = table[k : k + 100]
            for row, out in zip(batch, mask_rows(batch, strategies), strict=True):
                b"".join(row if out is None else out)  # type: ignore[arg-type]

    # the no-masking-needed case: one prefilter call over a whole 64 KiB chunk of rows
    clean = b"".join(b"".join((r[0], r[1], r[4])) for r in table)[: 64 * 1024]

    def forward() -> None:
        for _ in range(100):
            bytes(memoryview(clean))

    def prefiltered() -> None:
        for _ in range(100):
            if not masker.might_contain(clean):
                bytes(memoryview(clean))

    t_direct, t_masked, t_batched = best(direct), best(masked), best(masked_batched)
    return {
        "rows_per_s_two_masked_columns": rows / t_masked,
        "rows_per_s_two_masked_columns_batched": rows / t_batched,
        "rows_per_s_direct": rows / t_direct,
        "prefilter_clean_chunk_MB_per_s": len(clean) * 100 / best(prefiltered) / 1e6,
        "forward_clean_chunk_MB_per_s": len(clean) * 100 / best(forward) / 1e6,
    }


def bench_keystrokes(masker: Masker) -> dict[str, float]:
    s = masker.stream()
    lat = []
    for ch in b"ls -la /var/log && grep -i error syslog | tail -n 20\r\n" * 200:
        t = time.perf_counter()
        s.feed(bytes([ch]))
        lat.append(time.perf_counter() - t)
    lat.sort()
    return {"p50_us": statistics.median(lat) * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


def bench_json(masker: Masker, **kw: bool) -> float:
    rng = random.Random(3)
    items = [
        {"id": i, "name": rng.choice(WORDS), "email": f"u{i}@example.com", "password": "pw", "tags": ["a", "b"]}
        for i in range(20_000)
    ]
    data = json.dumps({"items": items}).encode()
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]

    def run() -> None:
        j = JsonStreamMasker(masker, **kw)
        for c in chunks:
            j.feed(c)
        j.flush()

    return len(data) / best(run, 3) / 1e6


def k8s_pods(count: int) -> bytes:
    """A Kubernetes ``PodList`` like ``kubectl get pods -o json`` returns (an email every 10 pods)."""
    rng = random.Random(4)
    items = []
    for i in range(count):
        name = f"web-{i:05d}-{rng.getrandbits(20):05x}"
        labels = {"app": "web", "pod-template-hash": f"{rng.getrandbits(32):08x}", "tier": rng.choice(["fe", "be"])}
        applied = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}})
        annotations = {"kubectl.kubernetes.io/last-applied-configuration": applied + "\n"}
        if i % 10 == 0:
            annotations["owner"] = f"team-{i}@example.com"
        env = [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"},
               {"name": "DB_HOST", "value": f"db-{i % 3}.prod.svc.cluster.local"}]
        items.append({
            "metadata": {"name": name, "generateName": "web-", "namespace": "prod",
                         "uid": f"{rng.getrandbits(128):032x}", "resourceVersion": str(rng.getrandbits(24)),
                         "creationTimestamp": "2024-01-15T10:22:33Z", "labels": labels, "annotations": annotations,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9",
                                              "uid": f"{rng.getrandbits(128):032x}", "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": {"containers": [{"name": "web", "image": "registry.example.com/web:1.4.2",
                                     "ports": [{"containerPort": 8080, "protocol": "TCP"}], "env": env,
                                     "resources": {"limits": {"cpu": "500m", "memory": "256Mi"},
                                                   "requests": {"cpu": "100m", "memory": "128Mi"}},
                                     "volumeMounts": [{"name": "kube-api-access", "readOnly": True,
                                                       "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                                     "terminationMessagePath": "/dev/termination-log",
                                     "imagePullPolicy": "IfNotPresent"}],
                     "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                     "serviceAccountName": "default", "nodeName": f"node-{i % 7}",
                     "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                      "effect": "NoExecute", "tolerationSeconds": 300}]},
            "status": {"phase": "Running", "hostIP": f"10.0.{i % 7}.{i % 250}", "podIP": f"10.244.{i % 7}.{i % 250}",
                       "startTime": "2024-01-15T10:22:33Z",
                       "conditions": [{"type": t, "status": "True", "lastProbeTime": None,
                                       "lastTransitionTime": "2024-01-15T10:22:40Z"}
                                      for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
                       "containerStatuses": [{"name": "web", "ready": True, "restartCount": 0,
                                              "image": "registry.example.com/web:1.4.2",
                                              "imageID": f"docker-pullable://registry.example.com/web@sha256:"
                                                         f"{rng.getrandbits(256):064x}",
                                              "containerID": f"containerd://{rng.getrandbits(256):064x}",
                                              "started": True,
                                              "state": {"running": {"startedAt": "2024-01-15T10:22:39Z"}}}],
                       "qosClass": "Burstable"},
        })
    return json.dumps({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "123456"},
                       "items": items}, indent=4).encode()


def bench_json_doc(masker: Masker, data: bytes, **kw: bool) -> float:
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]

    def run() -> None:
        j = JsonStreamMasker(masker, **kw)
        for c in chunks:
            j.feed(c)
        j.flush()

    return len(data) / best(run, 3) / 1e6


def bench_whole(masker: Masker, data: bytes, n: int) -> dict[str, float]:
    """Microseconds per document that arrives whole (one HTTP body): one pass vs the tokenizer."""

    def run(whole: bool) -> None:
        for _ in range(n):
            j = JsonStreamMasker(masker, whole=whole)
            j.feed(data)
            j.flush()

    return {"bytes": len(data), "one_pass_us": round(best(lambda: run(True)) / n * 1e6, 1),
            "tokenizer_us": round(best(lambda: run(False)) / n * 1e6, 1)}


def bench_small_text(masker: Masker) -> dict[str, float]:
    """Microseconds per short value (a cell, a JSON string, an SSH line) masked as text."""
    samples = {"clean_40B": b"total 4096 drwxr-xr-x root user config",
               "email_40B": b"user=alice@example.com logged in ok",
               "clean_200B": b"2024-01-15 12:22:33 host-12 pid=1234 the quick brown fox jumps over lazy dog GET "
                             b"/api/v1/users 200 ms /usr/lib/python3.11/site-packages README.md src tests error 10:22"}
    out = {}
    for name, data in samples.items():
        def run(data: bytes = data) -> None:
            for _ in range(2000):
                masker.mask_bytes(data)

        out[f"{name}_us"] = round(best(run) / 2000 * 1e6, 2)
    return out


def main() -> None:
    rng = random.Random(1)
    config = Masking.model_validate(
        {
            "columns": [{"match": "users.email", "strategy": "hash"}, {"match": "card", "strategy": "partial"}],
            "json_keys": [{"match": "password"}],
        }
    )
    masker = Masker(config, b"k" * 32)
    plain = Masker(Masking(), b"k" * 32)
    pods = k8s_pods(2000)
    clean = ssh_text(rng, 100_000, 0)
    dirty = ssh_text(rng, 100_000, 20)
    results = {
        "ssh_clean_text_MB_per_s": bench_ssh(masker, clean),
        "ssh_text_one_secret_per_20_lines_MB_per_s": bench_ssh(masker, dirty),
        **bench_rows(masker, 200_000),
        "keystroke_latency": bench_keystrokes(masker),
        "mask_bytes_small": bench_small_text(masker),
        "json_MB_per_s": bench_json(masker),
        "json_exact_path_MB_per_s": bench_json(masker, fast=False),
        "json_k8s_pods_MB_per_s": bench_json_doc(masker, pods),
        "json_k8s_pods_exact_path_MB_per_s": bench_json_doc(masker, pods, fast=False),
        "json_k8s_pods_no_key_rules_MB_per_s": bench_json_doc(plain, pods),
        "json_k8s_pods_bytes": len(pods),
        # what bench/http_proxy.py serves: 10 users, each with an email and a ruled key
        "json_whole_http_bench_body": bench_whole(masker, json.dumps({"items": [
            {"name": f"user {i}", "email": f"user{i}@example.com", "password": f"pw-{i}-secret", "role": "viewer",
             "created": "2030-01-01T12:00:00Z", "id": i} for i in range(10)]}).encode(), 2000),
        # 20 pods (escaped JSON in an annotation of each)
        "json_whole_k8s_20_pods": bench_whole(masker, k8s_pods(20), 50),
    }
    for key, value in results.items():
        print(f"{key:45s} {value}")
    out = Path(__file__).parent / "results" / "mask.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
