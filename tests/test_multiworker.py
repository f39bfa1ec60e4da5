"""tf.distribute.MultiWorkerMirroredStrategy: two worker processes on localhost, each
with its TF_CONFIG, give the one-device numbers on the same global batches (coherence
step and probe, winsorized count and percentile, M3, RM3, a quantize_model QAT fit)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    here = os.path.dirname(__file__)
    out = str(tmp_path_factory.mktemp("multiworker") / "results.json")
    ports = [str(p) for p in _free_ports(2)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    workers = [subprocess.Popen([sys.executable, os.path.join(here, "multiworker_check.py"), str(i), *ports, out],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for i in range(2)]
    logs = []
    try:
        for w in workers:
            _, err = w.communicate(timeout=600)
            logs.append(err)
    finally:
        for w in workers:
            w.kill()
    for i, (w, err) in enumerate(zip(workers, logs)):
        assert w.returncode == 0, f"worker {i} failed:\n{err[-3000:]}"
    with open(out) as f:
        return json.load(f)


CASES = ["coherence", "winsorized:c=2", "winsorized:percentile=20", "m3:groups=3", "rm3", "qat"]


def test_two_workers_one_replica_each(results):
    assert results["replicas"] == 2


@pytest.mark.parametrize("case", CASES)
def test_multiworker_matches_one_device(results, case):
    one, multi = results["cases"][case]["one"], results["cases"][case]["multiworker"]
    for key in one:
        if key == "weights":
            continue
        np.testing.assert_allclose(multi[key], one[key], rtol=1e-4, err_msg=key)
    assert len(one["weights"]) == len(multi["weights"])
    for a, b in zip(one["weights"], multi["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6, err_msg=case)
