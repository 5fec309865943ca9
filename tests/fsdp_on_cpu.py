"""Run `cli.py` with accelerate's FSDP2 code paths on CPU processes (gloo), for the multi-process tests.

accelerate enables FSDP only on accelerators: on a machine without one, a process started by
`accelerate launch --config_file recipes/accelerate/fsdp.yaml` gets no process group at all (each would
train alone). torch's `fully_shard` itself runs on CPU tensors with gloo, so this launcher asks accelerate
for its CPU process group (`ACCELERATE_USE_CPU`) and then marks the state as FSDP with the plugin that the
config file's environment built; everything after that (prepare, no_sync, clipping, save_state,
load_state, get_state_dict) is accelerate's own FSDP2 code, as on GPUs.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 tests/fsdp_on_cpu.py train RECIPE ...
"""

import os
import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

CLI = Path(__file__).resolve().parents[1] / "cli.py"
_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP  # what accelerate sets where a GPU is present
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    os.environ["ACCELERATE_USE_CPU"] = "true"
    AcceleratorState.__init__ = _fsdp_on_cpu
    sys.argv = [str(CLI), *sys.argv[1:]]
    runpy.run_path(str(CLI), run_name="__main__")
