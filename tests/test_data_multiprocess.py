"""Two real JAX processes (jax.distributed on CPU, 2 devices each) read the same data.

Each process records the source rows it saw and the shards of the global arrays that
``to_global_batch`` made; the test checks that the processes' rows are disjoint, that together
they are the batch a single process would build, and that every global array holds exactly
those rows. Both processes also tokenize into the same cache folder at once (atomic writes).

Run as a script, this file is the worker: ``python test_data_multiprocess.py SPEC.json ID``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

STEPS = 5


def _worker(spec_path: str, pid: int) -> None:
    import jax

    spec = json.load(open(spec_path))
    jax.distributed.initialize(coordinator_address=spec["address"], num_processes=2,
                               process_id=pid)
    from jaxtune.config import MeshConfig, config_from_dict
    from jaxtune.data import load_tokenizer, make_batch_iterator, to_global_batch
    from jaxtune.mesh import make_mesh

    cfg = config_from_dict(spec["config"])
    it = make_batch_iterator(cfg, load_tokenizer(cfg))  # process index / count from jax
    mesh = make_mesh(MeshConfig(data=2, fsdp=2))
    record = {"examples": [], "local": [], "shards": []}
    for _ in range(STEPS):
        host = next(it)
        glob = to_global_batch(host, mesh)
        record["examples"].append(it.last_examples)
        record["local"].append(host["input_ids"].tolist())
        record["shards"].append([
            [s.index[0].start or 0, np.asarray(s.data).tolist()]
            for s in glob["input_ids"].addressable_shards])
        assert glob["loss_mask"].shape == (cfg.trainer.global_batch_size, cfg.data.seq_len)
    with open(os.path.join(spec["out"], f"proc{pid}.json"), "w") as f:
        json.dump(record, f)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_read_disjoint_parts_of_each_global_batch(tmp_path, data_tokenizers):
    from jaxtune.config import config_to_dict
    from jaxtune.data import load_tokenizer, make_batch_iterator
    from tests.fixtures_data import chat_rows, make_data_config, write_jsonl

    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(60, seed=2))
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [path], batch=8, seed=3)
    spec = {"address": f"localhost:{_free_port()}", "config": config_to_dict(cfg),
            "out": str(tmp_path)}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, str(spec_path), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    rec = [json.load(open(tmp_path / f"proc{i}.json")) for i in range(2)]

    single = make_batch_iterator(cfg, load_tokenizer(cfg), process_index=0, process_count=1)
    seen: list[list] = [[], []]  # source rows each process saw during epoch 0
    for step in range(STEPS):
        whole = next(single)
        if single.epoch == 0:
            for i, r in enumerate(rec):
                seen[i] += [tuple(d) for row in r["examples"][step] for d in row]
        local = np.concatenate([np.asarray(r["local"][step]) for r in rec])
        np.testing.assert_array_equal(local, whole["input_ids"])
        for r in rec:  # each global array shard holds the global batch's rows at its index
            for start, data in r["shards"][step]:
                data = np.asarray(data)
                np.testing.assert_array_equal(data, whole["input_ids"][start:start + len(data)])
    assert len(seen[0]) > 5 and len(seen[1]) > 5
    assert len(set(seen[0] + seen[1])) == len(seen[0]) + len(seen[1])  # each row seen once


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
