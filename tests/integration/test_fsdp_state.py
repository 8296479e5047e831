"""The trainer's trainable state under FSDP2, for real: two CPU processes over gloo shard the toy UNet.

Why torch's FSDP2 (`fully_shard`) directly and not the trainer under
`accelerate launch`: accelerate (1.15) enables FSDP only for GPU processes;
CPU processes become MULTI_CPU, that is DDP, whatever the config says. Torch's
own FSDP2 does run on CPU over gloo (torch 2.13). The trainer reads and writes
its trainable parameters through `full_trainable_state` /
`load_trainable_state`, its EMA and `unsharded_copy` (export), which take any
module (only the DDP digest check reads each replica itself), so they are
tested here on a toy UNet sharded as accelerate's FSDP2 plugin shards it
(every `BasicTransformerBlock`, then the root) on a CPU device mesh. Under DDP
the same helpers run in `test_distributed_training.py`.

Two processes (started like `torchrun`: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) each take half of a fixed global batch of four and take two AdamW
steps with an EMA. Then:

* the gathered state, and the gathered EMA, equal what one unsharded process
  computes with the whole global batch (and a process with only the first
  half, the control, is far off);
* only rank 0 receives the gathered state, and each process held about half
  of the parameters;
* save -> load into a freshly built, differently initialised sharded model is
  exact: every shard, the EMA's shards, and the state gathered again;
* the plain copy built from the sharded model (what `export` saves) computes
  what the unsharded reference computes with the EMA weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from unifl.feedback.trainer import (
    ExponentialMovingAverage,
    full_trainable_state,
    load_trainable_state,
    unsharded_copy,
)
from unifl.models.toy_presets import build_toy_model

WORLD_SIZE = 2
GLOBAL_BATCH = 4
STEPS = 2
LEARNING_RATE = 1e-3
ADAM_EPS = 1e-6
"""Not AdamW's default 1e-8. Adam divides each gradient by its own size, so an element whose
gradient is near eps, or is a small difference of large terms, turns its last-bit rounding into a
visible change of the update: in ONE process the whole batch's gradient and the mean of its two
halves' gradients, equal but for rounding, give parameters 9e-5 apart at eps 1e-8 and 1.3e-5 at
1e-6. The larger eps leaves more room between rounding and a real error."""
RELATIVE_TOLERANCE = 5e-5
"""Largest difference, relative to the largest value, between the sharded run's gathered state and
the one-process run of the same global batch (measured: 1.1e-5, the rounding above; the control run
with the first half of the batch differs by 4e-3, a shard gathered in the wrong place by about 1)."""
EMA_DECAY = 0.9
TIMEOUT_SECONDS = 240


# --------------------------------------------------------------------------- shared by both sides


def global_batch() -> dict[str, Tensor]:
    """Fixed inputs and targets of the toy UNet for the whole global batch."""
    generator = torch.Generator().manual_seed(1234)
    return {
        "latents": torch.randn(GLOBAL_BATCH, 4, 8, 8, generator=generator),
        "noise": torch.randn(GLOBAL_BATCH, 4, 8, 8, generator=generator),
        "timesteps": torch.tensor([10, 250, 500, 900]),
        "hidden": torch.randn(GLOBAL_BATCH, 24, 32, generator=generator),
    }


def toy_unet(seed: int = 0) -> nn.Module:
    unet = build_toy_model("toy-sd15", seed=seed).unet
    assert unet.config.cross_attention_dim == 32
    unet.requires_grad_(True)  # a full fine-tune, as FSDP is used for
    unet.train()
    return unet


def predict(unet: nn.Module, batch: dict[str, Tensor], rows: slice) -> Tensor:
    return unet(
        batch["latents"][rows],
        batch["timesteps"][rows],
        encoder_hidden_states=batch["hidden"][rows],
    ).sample


def train(unet: nn.Module, rows: slice) -> ExponentialMovingAverage:
    """STEPS AdamW steps on `rows` of the global batch (a mean loss); the EMA of the run."""
    batch = global_batch()
    trainable = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(
        trainable.values(), lr=LEARNING_RATE, eps=ADAM_EPS, weight_decay=0.01
    )
    ema = ExponentialMovingAverage(trainable, EMA_DECAY)
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(predict(unet, batch, rows), batch["noise"][rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(trainable)
    return ema


# --------------------------------------------------------------------------- one sharded process


def shard(unet: nn.Module, mesh: object) -> nn.Module:
    """FSDP2 as accelerate's plugin applies it: each transformer block, then the root."""
    from diffusers.models.attention import BasicTransformerBlock
    from torch.distributed.fsdp import fully_shard

    blocks = [module for module in unet.modules() if isinstance(module, BasicTransformerBlock)]
    assert blocks
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    return unet


def sharded_process(out: Path) -> None:
    """One rank: train sharded, gather, save, reload into a fresh sharded model; facts to `out`."""
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        unet = shard(toy_unet(seed=0), mesh)
        share = GLOBAL_BATCH // WORLD_SIZE
        ema = train(unet, slice(rank * share, (rank + 1) * share))
        trained = dict(unet.named_parameters())
        gathered = full_trainable_state(unet)  # collective
        averaged = ema.full_state()  # collective
        ema_path = out / "ema.pt"
        if rank == 0:
            save_file(gathered, str(out / "gathered.safetensors"))
            save_file(averaged, str(out / "ema.safetensors"))
            torch.save(ema.state_dict(), ema_path)
        else:
            ema.state_dict()  # the checkpoint calls it on every process: a collective
        dist.barrier()

        fresh = shard(toy_unet(seed=1), mesh)
        differed = any(
            not torch.equal(p.to_local(), trained[name].to_local())
            for name, p in fresh.named_parameters()
        )
        load_trainable_state(fresh, load_file(str(out / "gathered.safetensors")))  # collective
        fresh_ema = ExponentialMovingAverage(dict(fresh.named_parameters()), decay=0.5)
        fresh_ema.load_state_dict(torch.load(ema_path, weights_only=True))
        again = full_trainable_state(fresh)  # collective
        if rank == 0:
            save_file(again, str(out / "reloaded.safetensors"))
            exported = unsharded_copy(unet, {**gathered, **averaged})
            with torch.no_grad():
                output = predict(exported, global_batch(), slice(None))
            torch.save(
                {
                    "output": output,
                    "class": type(exported).__name__,
                    "plain_tensors": all(type(p) is nn.Parameter for p in exported.parameters()),
                },
                out / "exported.pt",
            )
        facts = {
            "rank": rank,
            "gathered": len(gathered),
            "ema_gathered": len(averaged),
            "parameters": len(trained),
            "sharded": all(isinstance(p, DTensor) for p in trained.values()),
            "local_fraction": sum(p.to_local().numel() for p in trained.values())
            / sum(p.numel() for p in trained.values()),
            "fresh_differed": differed,
            "shards_equal_after_load": all(
                torch.equal(p.to_local(), trained[name].to_local())
                for name, p in fresh.named_parameters()
            ),
            "ema_shards_equal_after_load": all(
                torch.equal(fresh_ema.shadow[name].to_local(), ema.shadow[name].to_local())
                for name in ema.shadow
            ),
            "ema_sharded": all(isinstance(v, DTensor) for v in ema.shadow.values()),
            "ema_num_updates": fresh_ema.num_updates,
        }
        (out / f"rank{rank}.json").write_text(json.dumps(facts), encoding="utf-8")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_sharded(out: Path) -> None:
    """Start the WORLD_SIZE processes (this file as a script) and wait for them."""
    from unifl.cluster.distributed import free_port

    port = free_port()
    processes = []
    for rank in range(WORLD_SIZE):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, __file__, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_SECONDS)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = {rank: p.returncode for rank, p in enumerate(processes) if p.returncode != 0}
    assert not failed, f"exit codes {failed}:\n" + "\n".join(o[-3000:] for o in outputs)


# --------------------------------------------------------------------------- the tests


def relative_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    scale = max(float(value.abs().max()) for value in a.values())
    return max(float((a[name] - b[name]).abs().max()) for name in a) / scale


def test_fsdp2_shards_gather_to_the_one_process_update_and_reload_exactly(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run_sharded(tmp_path)
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    gathered = load_file(str(tmp_path / "gathered.safetensors"))
    averaged = load_file(str(tmp_path / "ema.safetensors"))

    # Sharded for real: DTensor parameters and averages, each process holding about half.
    for rank_facts in facts:
        assert rank_facts["sharded"] and rank_facts["ema_sharded"]
        assert 0.4 < rank_facts["local_fraction"] < 0.6
    # Only the main process receives the gathered state.
    assert facts[0]["gathered"] == facts[0]["parameters"] == len(gathered) > 300
    assert facts[0]["ema_gathered"] == len(averaged) == len(gathered)
    assert facts[1]["gathered"] == facts[1]["ema_gathered"] == 0

    # One unsharded process with the whole global batch computes the same update and EMA.
    reference = toy_unet(seed=0)
    reference_ema = train(reference, slice(None))
    expected = {name: p.detach() for name, p in reference.named_parameters()}
    assert gathered.keys() == expected.keys()
    assert all(value.dtype == torch.float32 for value in gathered.values())
    assert relative_difference(gathered, expected) < RELATIVE_TOLERANCE
    assert relative_difference(averaged, reference_ema.shadow) < RELATIVE_TOLERANCE
    # The control: the first process's half of the batch alone gives a far different update.
    control = toy_unet(seed=0)
    train(control, slice(0, GLOBAL_BATCH // WORLD_SIZE))
    control_state = {name: p.detach() for name, p in control.named_parameters()}
    assert relative_difference(gathered, control_state) > 10 * RELATIVE_TOLERANCE

    # Save -> load into a fresh sharded model is exact, shard by shard and gathered again.
    reloaded = load_file(str(tmp_path / "reloaded.safetensors"))
    assert reloaded.keys() == gathered.keys()
    assert all(torch.equal(reloaded[name], gathered[name]) for name in gathered)
    for rank_facts in facts:
        assert rank_facts["fresh_differed"]
        assert rank_facts["shards_equal_after_load"]
        assert rank_facts["ema_shards_equal_after_load"]
        assert rank_facts["ema_num_updates"] == STEPS

    # The export's plain copy of the sharded model computes what the reference does with its EMA.
    exported = torch.load(tmp_path / "exported.pt", weights_only=True)
    assert exported["class"] == "UNet2DConditionModel" and exported["plain_tensors"]
    reference_ema.copy_to(dict(reference.named_parameters()))
    with torch.no_grad():
        expected_output = predict(reference, global_batch(), slice(None))
    torch.testing.assert_close(exported["output"], expected_output, rtol=1e-4, atol=1e-5)


def test_one_process_gets_copies_and_a_state_of_other_parameters_is_refused_by_name() -> None:
    unet = toy_unet(seed=0)
    unet.conv_in.requires_grad_(False)  # frozen parameters are neither gathered nor loaded
    state = full_trainable_state(unet)
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert set(state) == trainable and "conv_in.weight" not in state
    name = "conv_out.weight"
    state[name].add_(1.0)  # a copy: the module's parameter is untouched
    assert not torch.equal(state[name], unet.get_parameter(name).detach())

    load_trainable_state(unet, state)
    assert torch.equal(unet.get_parameter(name).detach(), state[name])
    missing = {key: value for key, value in state.items() if key != name}
    with pytest.raises(ValueError, match=r"missing \['conv_out.weight'\]"):
        load_trainable_state(unet, missing)
    with pytest.raises(ValueError, match=r"unexpected \['conv_in.weight'\]"):
        load_trainable_state(unet, {**state, "conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="conv_out.weight has shape"):
        load_trainable_state(unet, {**state, name: state[name][:1]})


if __name__ == "__main__":
    sharded_process(Path(sys.argv[1]))
