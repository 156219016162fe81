"""Load: hundreds of clients streamed through one round keep memory flat, time linear, results = batch.

Runs benchmarks/load.py's configurations, each in its own process (peak RSS is
per process). The full figures (4 / 250 / 1,000 clients) are in RELIABILITY.md.
"""

import pytest

from benchmarks import load

pytestmark = pytest.mark.slow  # 4 + 80 + 240 clients streamed and 240 batched, each run in a fresh process

CLIENTS = (4, 80, 240)


@pytest.mark.parametrize("method", ["fedsrd-e"])
def test_streaming_many_clients_is_flat_linear_and_exact(tmp_path, method):
    rows = {n: load.measure(method, n, "stream", tmp_path) for n in CLIENTS}
    batch = load.measure(method, CLIENTS[-1], "batch", tmp_path)
    # memory: 240 clients' payloads pass through without adding to the peak (the batch run holds them all)
    growth = rows[CLIENTS[-1]]["peak_rss_mib"] - rows[CLIENTS[0]]["peak_rss_mib"]
    assert growth < 8.0, f"peak RSS grew {growth:.1f} MiB from {CLIENTS[0]} to {CLIENTS[-1]} clients"
    # time: the same cost per client at 80 and at 240 (a fold quadratic in clients would triple it);
    # process CPU time, which other jobs on the machine do not inflate
    per_client = {n: rows[n]["server_cpu_seconds"] / n for n in CLIENTS[1:]}
    assert per_client[240] < 2.0 * per_client[80], per_client
    assert load.relative_error(rows[CLIENTS[-1]]["state_file"], batch["state_file"]) < 1e-6
