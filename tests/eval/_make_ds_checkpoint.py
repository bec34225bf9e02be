"""Helper run in a subprocess by test_export.py: train a tiny HybridLM for one step with DeepSpeed on
CPU (one process, ZeRO stage from argv) and save a DeepSpeed checkpoint plus the reference weights.

usage: python _make_ds_checkpoint.py OUT_DIR STAGES MODEL_CONFIG_JSON   (STAGES e.g. "0,2": OUT_DIR/ds0, OUT_DIR/ds2)
"""

import importlib
import json
import os
import socket
import sys

root, stages, cfg_json = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], sys.argv[3]
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                  DS_ACCELERATOR="cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402

# plain gloo all-reduce: skip the ~40 s JIT build of DeepSpeed's CPU shared-memory op (INSTALL-NOTES)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

from megasleep.models import HybridLM, ModelConfig  # noqa: E402

cfg = ModelConfig(**json.loads(cfg_json))


class Wrapper(torch.nn.Module):  # like a trainer: the model is an attribute, so names get a "model." prefix
    def __init__(self):
        super().__init__()
        self.model = HybridLM(cfg)

    def forward(self, ids):
        return self.model(ids)


for stage in stages:
    out = os.path.join(root, f"ds{stage}")
    torch.manual_seed(stage)
    net = Wrapper()
    ds_cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-2),
                                      config=ds_cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = engine(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out, tag="global_step1")
    torch.save({k: v.detach().clone() for k, v in net.model.state_dict().items()}, os.path.join(out, "reference.pt"))
    torch.distributed.barrier()
torch.distributed.destroy_process_group()
print("saved")
