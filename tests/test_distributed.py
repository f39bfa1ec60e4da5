"""tf.distribute.MirroredStrategy (2 logical CPUs) gives the numbers of one device."""
import json
import os
import subprocess
import sys

import numpy as np


def _run(script):
    here = os.path.dirname(__file__)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(here, script)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mirrored_strategy_matches_one_device():
    res = _run("distributed_check.py")
    one, mirrored = res["one"], res["mirrored"]
    assert mirrored["replicas"] == 2
    np.testing.assert_allclose(mirrored["train_m_coherence"], one["train_m_coherence"], rtol=1e-4)
    np.testing.assert_allclose(mirrored["probe"], one["probe"], rtol=1e-4)
    for a, b in zip(one["weights"], mirrored["weights"]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6)


def test_aggregators_and_rm3_under_mirrored_strategy_match_one_device():
    res = _run("distributed_aggregation_check.py")
    assert res["mirrored"]["replicas"] == 2
    for arm, weights in res["one"].items():
        if arm == "replicas":
            continue
        for a, b in zip(weights, res["mirrored"][arm]):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6, err_msg=arm)
