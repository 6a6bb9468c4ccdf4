"""The training loop shared by every task: mesh and shardings, checkpoints (resume, fallback,
checksums), logging, evaluation, samples and stopping on SIGTERM.

The train step (``steps.build_train_step``) is one ``jax.jit`` program with explicit shardings
and a donated state; task-specific parts (model, loss, sampler) come from a ``Task``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax.config import ExperimentConfig
from discreteflow_jax.io import checkpoint as ckpt
from discreteflow_jax.models import sharding as shd
from discreteflow_jax.tasks.base import Task
from discreteflow_jax.training import distributed as dist
from discreteflow_jax.training.metrics import DISCARDED_FILE, MetricWriter, eta_seconds, format_progress
from discreteflow_jax.training.optim import learning_rate
from discreteflow_jax.training.programs import build_programs
from discreteflow_jax.training.steps import TrainState, stream_key, validation_batches, window_metrics

log = logging.getLogger("discreteflow_jax")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is left intact."""


class Trainer:
    """Owns the mesh, the jitted programs, the checkpoint manager and the loop."""

    def __init__(self, cfg: ExperimentConfig, task: Task, workdir: str, dataset: Any, tokenizer: Any,
                 preemption_sync_every: int = 10, resume_step: int | None = None):
        self.cfg, self.task, self.workdir = cfg, task, workdir
        self.resume_step = resume_step  # None: the newest checkpoint that loads
        self.dataset, self.tokenizer = dataset, tokenizer
        self.preemption_sync_every = preemption_sync_every  # steps between SIGTERM agreements (multi-process)
        # First, before any shape check can fail on some processes only: every process must run the same
        # experiment (one all-gather of a config hash; a no-op with one process).
        dist.check_same_config(cfg.raw)
        programs = build_programs(cfg, task)
        self.mesh, self.tx, self.graphdef = programs.mesh, programs.tx, programs.graphdef
        self.state_shardings, self.abstract_state = programs.state_shardings, programs.abstract_state
        self.num_params = programs.num_params
        self.train_step, self.eval_step = programs.train_step, programs.eval_step
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.local_batch = cfg.train.batch_size // self.process_count
        self.init_key = stream_key(cfg.seed, "init")
        self.base_key = stream_key(cfg.seed, "train")  # step s trains with fold_in(base_key, s)
        self.writer = MetricWriter(workdir, enabled=self.process_index == 0)
        self.ckpt = ckpt.manager(workdir, cfg.train.keep_checkpoints, clean_partial=True)
        self._unconfirmed_save: int | None = None  # step of the last asynchronous save not yet finished
        self._checksum_thread: threading.Thread | None = None

    # -- state -----------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        def init():
            model = self.task.create_model(nnx.Rngs(self.init_key))
            params = nnx.to_pure_dict(nnx.state(model))
            return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

        state = jax.jit(init, out_shardings=self.state_shardings)()
        if self.task.init_params is None:
            return state
        # The new parameters are placed with the same shardings; the optimizer state starts at
        # zero moments whatever the parameters are, so it stays as initialized.
        params = self.task.init_params(jax.device_get(state.params))
        return state.replace(params=jax.device_put(params, self.state_shardings.params))

    def restore_or_init(self) -> TrainState:
        """The state of the newest checkpoint that loads (or of ``resume_step``), else a new one.

        A damaged newer checkpoint is reported, moved to ``<workdir>/checkpoints_damaged/`` (kept,
        never deleted; later saves of the same step and pruning would otherwise meet it) and the
        next older one restored. With ``resume_step``, newer checkpoints are moved to
        ``<workdir>/checkpoints_skipped/`` so the run can write those steps again.
        """
        steps = sorted(self.ckpt.all_steps(), reverse=True)
        if not steps:
            if self.resume_step is not None:
                raise ckpt.CheckpointError(
                    f"--resume_step={self.resume_step}: {self.ckpt.directory} holds no checkpoint yet"
                )
            return self.init_state()
        (state, meta), step, bad = ckpt.select(
            self.ckpt, self._restore_step, step=self.resume_step, steps=steps, how="--resume_step={}",
        )
        newer = [s for s in steps if s > step]
        if newer:
            folder = ckpt.SKIPPED_DIR if self.resume_step is not None else ckpt.DAMAGED_DIR
            if self.process_index == 0:
                moved = ckpt.set_aside(self.ckpt, newer, folder)
                log.warning("moved %s out of the way (kept, not deleted): %s",
                            "the damaged checkpoints" if folder == ckpt.DAMAGED_DIR else
                            f"the checkpoints newer than step {step}", ", ".join(moved))
            if self.process_count > 1:
                dist.allgather_json(None)  # the others wait until the folders have moved
            self.ckpt.reload()
        data_state = meta.get("data_state")
        per_process = meta.get("data_states")  # one entry per process (each reads its own shard)
        if isinstance(per_process, list) and len(per_process) == self.process_count:
            data_state = per_process[self.process_index]
        if data_state is not None and hasattr(self.dataset, "restore"):
            self.dataset.restore(data_state)
        log.info("resumed from %s at step %d", self.ckpt.directory, step)
        return state

    def _restore_step(self, step: int) -> tuple[TrainState, dict]:
        """(state, meta) of one step; CheckpointDamagedError when it does not read on any process.
        A checkpoint of another experiment raises CheckpointMismatchError (never a fallback)."""
        error: ckpt.CheckpointDamagedError | None = None
        try:
            if self.process_index == 0:  # one reader is enough; the verdict is shared below
                ckpt.verify(self.ckpt, step)
            meta = ckpt.guarded(self.ckpt, step, lambda: ckpt.read_meta(self.ckpt, step))
            if not isinstance(meta.get("config"), dict):
                raise ckpt.damaged(self.ckpt, step, "its metadata carries no config")
            ckpt.check_compatible(
                meta.get("config", {}), self.cfg.raw, self.workdir, meta.get("task_identity"), self.task.identity
            )
            try:
                state, meta = ckpt.guarded(self.ckpt, step, lambda: ckpt.restore(self.ckpt, step, self.abstract_state))
            except ckpt.CheckpointDamagedError as err:
                if "opt_state" in str(err) and "tree structures do not match" in str(err):
                    raise ckpt.CheckpointMismatchError(
                        f"the checkpoint at step {step} in {self.workdir} holds its optimizer state in an older "
                        "layout (before the learning rate became an injected hyperparameter), so training cannot "
                        "continue from it. Its parameters still load (load(), sample, export); to train on, "
                        "start a new --workdir."
                    ) from err
                raise
        except ckpt.CheckpointDamagedError as err:
            error = err
        if self.process_count > 1:  # every process falls back together, or none does
            reasons = [r for r in dist.allgather_json(None if error is None else str(error)) if r]
            if reasons and error is None:
                error = ckpt.CheckpointDamagedError(reasons[0])
        if error is not None:
            raise error
        return state, meta

    def save(self, state: TrainState, *, force: bool = False) -> None:
        step = int(jax.device_get(state.step))
        meta = {"config": self.cfg.raw, "step": step, "data_state": self._data_state(),
                "task_identity": self.task.identity}
        if self.process_count > 1:
            # Only process 0 writes the JSON item, so the others' stream positions travel with it.
            meta["data_states"] = dist.allgather_json(meta["data_state"])
        self.finish_saves()
        try:
            started = ckpt.save(self.ckpt, step, state, meta, force=force)
        except Exception as err:
            self._write_failed(step, err)
        if started:  # orbax skips a step it already holds
            self._unconfirmed_save = step

    def finish_saves(self, *, wait_checksums: bool = False) -> None:
        """Waits for the asynchronous checkpoint write in flight; a failed one stops the run with
        CheckpointWriteError (the steps written before it stay intact). A finished step gets its
        checksums (``checkpoint.write_checksums``) in a background thread on process 0, for local
        workdirs (reading a remote one back would cost a full download)."""
        if self._checksum_thread is not None:
            self._checksum_thread.join()
            self._checksum_thread = None
        try:
            self.ckpt.wait_until_finished()
        except Exception as err:
            self._write_failed(self._unconfirmed_save, err)
        step, self._unconfirmed_save = self._unconfirmed_save, None
        if step is not None and self.process_index == 0 and not ckpt.is_remote(self.workdir):
            self._checksum_thread = threading.Thread(target=self._write_checksums, args=(step,), daemon=True)
            self._checksum_thread.start()
            if wait_checksums:
                self._checksum_thread.join()
                self._checksum_thread = None

    def _write_checksums(self, step: int) -> None:
        path = ckpt.step_path(self.ckpt, step)
        try:
            ckpt.write_checksums(path)
        except Exception as err:  # e.g. the step pruned meanwhile: it is then only unverified
            if os.path.isdir(path):
                log.warning("could not record the checksums of %s (%s); it will be read unverified", path, err)

    def _write_failed(self, step: int | None, err: Exception) -> NoReturn:
        self.ckpt.reload()  # what is really on disk: the failed step is not a checkpoint
        good = self.ckpt.latest_step()
        kept = (f"the newest intact checkpoint is step {good}; rerunning the same command resumes from it"
                if good is not None else "no checkpoint was finished yet; rerunning starts over")
        path = ckpt.step_path(self.ckpt, step) if step is not None else str(self.ckpt.directory)
        raise ckpt.CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {path}: {ckpt.damage_reason(err)}. "
            f"Training stopped; {kept} (its unfinished temporary folder is removed then). Free space "
            "or fix the folder first."
        ) from err

    def _data_state(self) -> dict:
        return self.dataset.state() if hasattr(self.dataset, "state") else {}

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, params: Any) -> dict:
        batches = validation_batches(self.dataset, self.local_batch, self.cfg.train.eval_batches)
        eval_key = stream_key(self.cfg.seed, "eval")
        sums = None
        for i, local in enumerate(batches):
            tokens = shd.global_batch_from_local(np.asarray(local, np.int32), self.mesh)
            out = self.eval_step(params, self.task.aux, tokens, jax.random.fold_in(eval_key, i))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        return self.task.summarize(jax.device_get(sums), "val") if sums is not None else {}

    def samples(self, params: Any, step: int) -> dict[int, list[str]]:
        if self.task.sample_fn is None:
            return {}
        texts: dict[int, list[str]] = {}
        key = stream_key(self.cfg.seed, "samples")
        for k in self.cfg.sample.eval_steps:
            tokens = dist.to_host(self.task.sample_fn(self.graphdef, params, self.task.aux, key, k))
            texts[k] = [self.tokenizer.decode_until_eos(row.tolist()) for row in tokens]
        if self.process_index == 0:
            from etils import epath  # local folders and gs:// alike

            path = epath.Path(self.workdir) / "samples" / f"step_{step:07d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            blocks = [f"=== step {step} K={k} sample {j} ===\n{text}\n\n"
                      for k, rows in texts.items() for j, text in enumerate(rows)]
            path.write_text("".join(blocks))
        return texts

    # -- loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        state = self.restore_or_init()
        start = int(jax.device_get(state.step))
        dropped = self.writer.discard_after(start)
        if dropped:
            log.warning("metrics.jsonl: moved the records of steps %s (a trajectory the resume from step %d "
                        "discards) to %s", ", ".join(map(str, dropped)), start, DISCARDED_FILE)
        if start == 0:
            self.writer.write_hparams(cfg.raw)
        log.info(
            "task=%s params=%.2fM mesh=%s devices=%d processes=%d steps %d->%d",
            self.task.name, self.num_params / 1e6, dict(self.mesh.shape), jax.device_count(),
            self.process_count, start, cfg.train.num_steps,
        )
        t_start = time.time()
        guard = dist.PreemptionGuard(self.preemption_sync_every)
        with guard:
            result = self._loop(state, start, guard)
        self.finish_saves(wait_checksums=True)
        self.writer.flush()
        if result.get("preempted"):
            log.info("stopped by signal %s after step %d; checkpoint saved", guard.received, result["step"])
        else:
            log.info("finished %d steps in %.1fs", cfg.train.num_steps - start, time.time() - t_start)
        return result

    def _loop(self, state: TrainState, start: int, guard: dist.PreemptionGuard) -> dict:
        cfg = self.cfg
        pending: list[tuple[int, dict]] = []
        last_metrics: dict = {}
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        t_window, steps_in_window = time.time(), 0
        eval_s = None  # duration of the last evaluation, for the ETA
        for step in range(start, cfg.train.num_steps):
            local = np.asarray(self.dataset.train_batch(step, self.local_batch), np.int32)
            tokens = shd.global_batch_from_local(local, self.mesh)
            state, metrics = self.train_step(state, self.task.aux, tokens, self.base_key)
            pending.append((step + 1, metrics))
            steps_in_window += 1
            done = step + 1
            is_last = done == cfg.train.num_steps
            log_now = done % cfg.train.log_every == 0 or is_last or done % cfg.train.ckpt_every == 0
            if step == start and not log_now:
                # The first step compiles: the speed (and so the ETA) is measured from the steps after it.
                jax.block_until_ready(metrics)
                t_window, steps_in_window = time.time(), 0
            if log_now:
                last_metrics = self._drain(pending)
                elapsed = time.time() - t_window
                speed = steps_in_window / max(elapsed, 1e-9)
                last_metrics.update(
                    {"train/steps_per_s": speed, "train/tokens_per_s": speed * tokens_per_step,
                     "train/lr": float(dist.to_host(learning_rate(state.opt_state)))}
                )
                self.writer.write_scalars(done, last_metrics)
                eta = eta_seconds(done, cfg.train.num_steps, 1.0 / max(speed, 1e-9), cfg.train.eval_every, eval_s)
                if self.process_index == 0:
                    print(format_progress(done, cfg.train.num_steps, last_metrics, eta), flush=True)
                t_window, steps_in_window = time.time(), 0
            if done % cfg.train.eval_every == 0 or is_last:
                t_eval = time.time()
                self._eval_and_sample(state, done)
                t_window, steps_in_window = time.time(), 0
                eval_s = t_window - t_eval
            saved = done % cfg.train.ckpt_every == 0 or is_last
            if saved:
                self.save(state, force=is_last)
            # Called on every process after every step (it synchronizes them every few steps).
            if not is_last and guard.should_stop(done):
                # SIGTERM (preemption, scancel): save now and return; rerunning the command resumes here.
                if not saved:
                    if pending:
                        self._drain(pending)  # never checkpoint a diverged state
                    self.save(state, force=True)
                return {"state": state, "metrics": last_metrics, "preempted": True, "step": done}
        return {"state": state, "metrics": last_metrics, "preempted": False, "step": cfg.train.num_steps}

    def _drain(self, pending: list[tuple[int, dict]]) -> dict:
        fetched = jax.device_get([m for _, m in pending])
        for (step, _), m in zip(pending, fetched):
            if not bool(m["finite"]):
                latest = self.ckpt.latest_step()
                raise TrainingDivergedError(
                    f"non-finite loss or gradient at step {step}; training stopped. The last good checkpoint "
                    f"(step {latest}) in {self.workdir} is intact. Try a lower --config.train.lr, "
                    f"--config.train.grad_clip=1.0 or --config.model.dtype=float32."
                )
        pending.clear()
        return window_metrics(self.task, fetched)

    def _eval_and_sample(self, state: TrainState, step: int) -> None:
        val = self.evaluate(state.params)
        self.writer.write_scalars(step, val)
        texts = self.samples(state.params, step)
        if self.process_index == 0:
            print(format_progress(step, self.cfg.train.num_steps, val, None), flush=True)
            for k, rows in texts.items():
                for j, text in enumerate(rows[:2]):
                    print(f"--- sample K={k} #{j} ---\n{text.strip()[:600]}", flush=True)
            self.writer.write_texts(step, {f"samples/K{k}": "\n\n---\n\n".join(rows) for k, rows in texts.items()})
