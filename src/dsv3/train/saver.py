"""Saving a run's checkpoints: in the foreground, or in the background while training goes on.

One save is in flight at a time. A foreground save returns once the checkpoint is published. A
background save (`train.async_checkpoint`) stalls training only while the state is copied to host
memory: a thread (or DCP's async writer, for sharded checkpoints) writes the files, and the
checkpoint is published when they are all on disk. Until then it is a temp directory that no resume
takes, so a kill -9 at any moment leaves the previous checkpoint the newest complete one. After each
publish the run keeps its newest `keep_last` checkpoints and the best by validation loss.

The copies go into pinned host buffers kept from one save to the next (one process pins them in a
thread after the first step, `prepare`; DCP's stager at the first save). The stall counts the copies
themselves, not only their queueing, since the GPU runs them before the next step's work.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dsv3.config import RunConfig
from dsv3.host_copy import HostCopy
from dsv3.model import Transformer
from dsv3.train import checkpoint as ckpt
from dsv3.train.sharded import begin_sharded_save

__all__ = ["CheckpointWriter"]

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    step: int
    final: Path
    thread: threading.Thread | None = None
    future: object = None  # DCP's future: this rank's shards written
    error: list[BaseException] = field(default_factory=list)


def _reusing_stager():
    """DCP's stager for background saves, keeping its host copy (pinned, on a GPU) from one save to the
    next: `dcp.async_save`'s default allocates fresh pageable memory on every save. (DefaultStager's
    cached staging failed on FSDP's DTensors in torch 2.11, on the second save: KeyError <class 'type'>.)"""
    from torch.distributed.checkpoint.staging import BlockingAsyncStager

    return BlockingAsyncStager(cache_staged_state_dict=torch.cuda.is_available())


def _on_host(config, weights: dict[str, torch.Tensor]) -> Transformer:
    """A CPU Transformer over `weights` (host tensors, not copied again): what a background save writes."""
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(weights, assign=True)
    return model


class CheckpointWriter:
    """Writes the checkpoints of one run; `group` (a gloo group) makes them sharded over its ranks."""

    def __init__(self, output_dir: Path, keep_last: int, background: bool,
                 group: dist.ProcessGroup | None = None) -> None:
        self.output_dir, self.keep_last, self.background = Path(output_dir), keep_last, background
        self.group = group
        self.is_main = group is None or dist.get_rank(group) == 0
        self._in_flight: _InFlight | None = None
        self._pinned: dict[str, dict[str, torch.Tensor]] = {}  # host buffers of background saves
        self._pinning: threading.Thread | None = None  # `prepare`'s allocation of those buffers
        self._prepared = False
        self._stager = None  # DCP's stager for sharded background saves: its host copies are reused
        if background and group is not None:
            self._stager = _reusing_stager()

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Pin a one-process background save's host buffers in a thread (call once the optimizer has
        state, after the first step), so no save waits for pinning gigabytes. Pinning costs the same
        either way, here as slower first steps (on one H200, 15 GB: steps 1-10 took 14.9 s instead of
        6.9 s; the first save then stalled 0.30 s instead of ~9 s). Sharded runs do not: staging DCP's
        copy in a thread slowed their first 20 steps by 22 s, twice what pinning at the first save
        costs (10.7 s on 2 H200s), so DCP's stager pins then and keeps the copy for later saves."""
        if not self.background or self.group is not None or self._prepared:
            return
        self._prepared = True
        if not torch.cuda.is_available():
            return
        shapes = {
            "model": {k: (v.shape, v.dtype) for k, v in model.state_dict().items() if v.is_cuda},
            "optimizer": {k: (v.shape, v.dtype) for k, v in
                          ckpt.optimizer_tensors(model, optimizer, on_host=False).items() if v.is_cuda},
        }

        def pin() -> None:
            try:
                for kind, tensors in shapes.items():
                    buffers = self._pinned.setdefault(kind, {})
                    for name, (shape, dtype) in tensors.items():
                        buffers[name] = torch.empty(shape, dtype=dtype, pin_memory=True)
            except Exception as e:  # only the head start is lost: the first save pins what is missing
                log.warning("pinning the background checkpoint buffers failed (%s): the first save "
                            "pins them itself", e)

        self._pinning = threading.Thread(target=pin, name="checkpoint-pinning", daemon=True)
        self._pinning.start()

    def save(self, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             run_config: RunConfig, tokenizer: Path | None) -> tuple[Path, float]:
        """Begin (background) or do the save of `step`; (its final path, seconds training stood still)."""
        self.wait()
        t0 = time.perf_counter()
        if self._pinning is not None:
            self._pinning.join()
        if self.group is not None:
            final, tmp, future = begin_sharded_save(
                self.output_dir, step, model=model, optimizer=optimizer, trainer_state=trainer_state,
                run_config=run_config, tokenizer=tokenizer, group=self.group, stager=self._stager,
            )
            job = _InFlight(step, final, future=future)
            if future is None:
                if self.is_main:
                    ckpt.publish_checkpoint(tmp, final, step)
                    self._prune()
                dist.barrier(group=self.group)  # nobody moves on before the checkpoint exists
            elif self.is_main:
                def publish_when_written() -> None:
                    future.result()  # every rank's shards are on disk once DCP's collective finish ran
                    ckpt.publish_checkpoint(tmp, final, step)

                job.thread = self._start(job, publish_when_written)
        elif not self.background:
            final = ckpt.save_checkpoint(self.output_dir, step, model=model, optimizer=optimizer,
                                         trainer_state=trainer_state, run_config=run_config,
                                         tokenizer=tokenizer)
            self._prune()
            job = _InFlight(step, final)
        else:
            # The snapshot: copies into the pinned buffers, queued behind the step's work. Training
            # waits for them (the next step's kernels would run after them anyway), not for the write.
            weights = HostCopy(dict(model.state_dict()), self._pinned.setdefault("model", {}))
            moments = HostCopy(ckpt.optimizer_tensors(model, optimizer, on_host=False),
                               self._pinned.setdefault("optimizer", {}))
            weights.get()
            moments.get()
            rng = ckpt.capture_rng()
            final = self.output_dir / ckpt.checkpoint_name(step)
            job = _InFlight(step, final)
            job.thread = self._start(job, lambda: ckpt.save_checkpoint(
                self.output_dir, step, model=_on_host(model.config, weights.get()), optimizer=None,
                trainer_state=trainer_state, run_config=run_config, tokenizer=tokenizer,
                optimizer_state=moments.get(), rng=rng,
            ))
        if job.thread is not None or job.future is not None:
            self._in_flight = job
        return final, time.perf_counter() - t0

    def _start(self, job: _InFlight, work) -> threading.Thread:
        def run() -> None:
            try:
                work()
            except BaseException as e:  # handed to the training thread by wait()
                job.error.append(e)

        thread = threading.Thread(target=run, name=f"checkpoint-{job.step}", daemon=True)
        thread.start()
        return thread

    def wait(self) -> None:
        """Finish the save in flight (every rank calls it): its files on disk, published, old ones pruned."""
        job, self._in_flight = self._in_flight, None
        if job is None:
            return
        if job.future is not None:
            job.future.result()
        if job.thread is not None:
            job.thread.join()
        if job.error:
            raise job.error[0]
        if self.is_main:
            log.info("checkpoint %s written in the background", job.final)
            self._prune()
        if self.group is not None:
            dist.barrier(group=self.group)

    def close(self) -> None:
        """Finish the save in flight and release the host buffers (the end of the run)."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            self._pinned.clear()

    def _prune(self) -> None:
        for removed in ckpt.prune_checkpoints(self.output_dir, self.keep_last):
            log.info("removed old checkpoint %s", removed)
