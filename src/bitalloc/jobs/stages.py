"""The stages of a job -- measure -> plan -> quantize -> recover -> export -- over one open job
directory.

:class:`Stages` runs each stage of a :class:`~bitalloc.jobs.config.RunConfig` at most once per job, checkpointed
(:mod:`bitalloc.jobs.checkpoints` inside the measurement and the quantization, block by block), and always
continues from what it reads back from the job's files (the measurement table, the plan), so a resumed run
computes exactly what an uninterrupted one would.  The model is loaded on first use only: a job whose stages
are done reads no weight.  Layout (beside ``job.json`` and ``job.lock``, :mod:`bitalloc.jobs.store`)::

    measure_blocks/fisher.safetensors       Fisher statistics (the gradient pass), once
    measure_blocks/rows0003.json            measurement rows of block 3
    measure_blocks/hidden.safetensors       inputs of block k of the fp model (metadata "block": k)
    rounded/block0003.safetensors           --reuse-rounding: block 3's roundings into every format, as measured
                                            (the head tensors: block len(blocks)); kept for the quantization
    measurement.json                        stage "measure" (the Measurement table)
    plan/capacity.json, plan.json           stage "plan": the budget as the target resolved it, the plan
    quantize/block0003.safetensors          QTensor parts of block 3 (metadata: formats, shapes, dtypes)
    quantize/hidden.safetensors             inputs of block k (metadata "block": k), replaced after each block
    recover_blocks/block0003.safetensors    recovered QTensors and trained norms of block 3 (--recover block...)
    recover_blocks/hidden.safetensors       both models' states at block k's input (student, teacher)
    recover/block0000.safetensors           stage "recover": every tensor the recovery changed
    export/expected.json                    the digests of the output about to be written (the target's)

The one place where the measurement and the quantization are called (:meth:`Stages.measure_now`,
:meth:`Stages.quantize`) is where run-wide settings (``config.device``, ``config.screen``) reach them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..budget import Budget, Constraints
from ..errors import InputError
from ..formats import QTensor
from ..measure import Measurement
from ..placement import Placement
from ..plan import Plan
from ..targets.base import Capacity, Target, Written
from ..timing import StageTimer
from .checkpoints import (MEASURE_STAGE, QUANT_STAGE, RECOVER_STAGE, MeasureCheckpoints, RecoverCheckpoints, block_hook,
                          load_recovered, load_rounded, load_state, save_recovered, save_rounded)
from .config import RunConfig
from .store import Job

log = logging.getLogger(__name__)

MEASUREMENT_FILE = "measurement.json"
PLAN_FILE = "plan.json"
RECOVER_FILE = "recover/block0000.safetensors"


def measure_stage(job: Job, measure: Callable[[MeasureCheckpoints], Measurement],
                  before_done: Callable[[], None] | None = None) -> Measurement:
    """Stage "measure": ``measure(checkpoints)`` once (resumable per block), saved as ``measurement.json`` and
    always read back from it; ``before_done()`` runs after the save, before the stage is marked done."""
    mpath = job.dir / MEASUREMENT_FILE
    if not job.stage_done("measure"):
        measure(MeasureCheckpoints(job)).save(mpath)
        if before_done is not None:
            before_done()
        job.complete_stage("measure", mpath)
        job.discard(MEASURE_STAGE)
    return Measurement.load(mpath)


@dataclass(frozen=True, eq=False)
class Loaded:
    model: torch.nn.Module
    tokenizer: Any
    view: Any


class Stages:
    """The stages of ``config`` in the open ``job``."""

    def __init__(self, job: Job, config: RunConfig, target: Target | None = None) -> None:
        self.job = job
        self.config = config
        self.target = target  # the output: its capacity is what a screened measurement screens for
        self._loaded: Loaded | None = None
        self._calib: torch.Tensor | None = None
        self._recovery_windows: tuple[torch.Tensor, int] | None = None
        self._placement: Placement | None = None
        #: wall time per stage of this run (load, calibrate.*, fisher, measure.*, allocate, quantize, write)
        self.timer = StageTimer(device=config.device)

    # ------------------------------------------------------------------------------------- inputs
    def load_source(self, tokenizer: bool = True) -> tuple[torch.nn.Module, Any]:
        """``(model, tokenizer)`` of ``config.model`` as every stage sees it: weights in a memory-mapped spill file,
        resident one block at a time (values identical to a whole load), with ``config.rotate`` folded in.
        ``tokenizer=False``: a second copy (reference, teacher), without parsing the tokenizer again (None)."""
        from ..models.sources import load_model

        with self.timer.stage("load"):
            model, tok = load_model(self.config.model, low_memory=True, tokenizer=tokenizer)
            if self.config.rotate:
                from ..models.rotate import rotate_model_

                rotate_model_(model, self.config.rotate, untie=self.config.untie)
        return model, tok

    @property
    def loaded(self) -> Loaded:
        if self._loaded is None:
            from ..models.view import ModelView

            model, tok = self.load_source()
            self._loaded = Loaded(model, tok, ModelView(model))
        return self._loaded

    @property
    def placement(self) -> Placement:
        """Where the stages compute: ``config.device``, offloading decided from the loaded model's size."""
        if self._placement is None:
            self._placement = Placement.for_device(self.config.device, model=self.loaded.model)
        return self._placement

    def windows(self, texts: tuple[Any, ...], n: int) -> torch.Tensor:
        """``n`` windows of ``config.ctx`` tokens from ``texts``, read only as far as they need."""
        from ..data import text_windows

        tok = self.loaded.tokenizer
        if tok is None:
            raise InputError("the model has no tokenizer, so text cannot be tokenized")
        return text_windows(tok, list(texts), self.config.ctx, n)

    @property
    def calibration(self) -> torch.Tensor:
        if self._calib is None:
            with self.timer.stage("tokenize"):
                self._calib = self.windows(self.config.calib_texts, self.config.windows)
        return self._calib

    @property
    def recovery_windows(self) -> tuple[torch.Tensor, int]:
        """``(windows, guard)``: the windows recovery trains on, ``config.recover.windows`` of the calibration text,
        by default :data:`~bitalloc.recover.config.DEFAULT_WINDOW_FACTOR` times the quantization's (the first ones
        are the quantization's), then the ``guard`` held-out windows its stages check their gains on
        (:func:`bitalloc.recover.training_windows`; a log line when the text holds fewer).  Read once: the
        recovery-aware gains and the recovery stage share them."""
        from ..recover import training_windows

        def read(n: int) -> torch.Tensor:
            with self.timer.stage("tokenize"):
                return self.windows(self.config.calib_texts, n)

        if self._recovery_windows is None:
            self._recovery_windows = training_windows(self.config.recover, self.calibration, read)
        return self._recovery_windows

    # -------------------------------------------------------------------------------------- measure
    def measurement(self, before_done: Callable[[], None] | None = None) -> Measurement | None:
        """Stage "measure" (None for a ``--format`` run, which needs no measurement)."""
        if self.config.uniform_format is not None:
            return None
        given = self.config.measurement
        if given is not None:  # a table measured before: saved in the job like one measured here
            return measure_stage(self.job, lambda _: Measurement.load(given), before_done)
        return measure_stage(self.job, self.measure_now, before_done)

    def measure_now(self, checkpoints: MeasureCheckpoints) -> Measurement:
        from .. import pipeline

        c, lo = self.config, self.loaded
        calib = self.calibration
        fisher_w = calib[: c.fisher_windows] if c.fisher else None
        rounded = (lambda b, r: save_rounded(self.job, b, r)) if c.reuse_rounding else None
        return pipeline.measure_model(lo.model, lo.view, calib, list(c.formats), c.measuring_method, c.fisher,
                                      progress=c.progress, fisher_windows=fisher_w,
                                      activation_noise=c.activation_noise, placement=self.placement,
                                      timer=self.timer, screen=self.screen(), on_rounded=rounded,
                                      **checkpoints.kwargs())

    def screen(self) -> Any:
        """The :class:`bitalloc.screen.Screen` of a ``--screen`` run: the budget as the target resolves it for the
        allocator (the same bytes ``plan`` gives ``make_plan``), the same constraints and objective."""
        c = self.config
        if not c.screen:
            return None
        if self.target is None or c.budget is None:  # RunConfig refuses the rest before any work
            raise InputError("--screen needs a budget and an output to screen for (quantize --budget, gguf)")
        from ..screen import Screen

        view = self.loaded.view
        cap = self.target.capacity(c.budget, None, view)
        return Screen((cap.plan_budget(view.fixed_bytes),), constraints=self.constraints(self.target),
                      objective=c.objective)

    # ----------------------------------------------------------------------------------------- plan
    def constraints(self, target: Target | None) -> Constraints:
        """``config.constraints`` with the ties the target's layout needs."""
        from ..pipeline import fused_constraints

        view = self.loaded.view
        ties = fused_constraints(view).tie_groups if self.config.constraints == "fused" else ()
        allowed: tuple[tuple[str, tuple[str, ...]], ...] = ()
        if target is not None:
            own = target.constraints(view)
            ties += own.tie_groups
            allowed = own.allowed  # the formats the output can store, per tensor
        return Constraints(tie_groups=ties, allowed=allowed)

    def plan(self, measurement: Measurement | None, target: Target, budget: Budget | None) -> tuple[Plan, Capacity]:
        """Stage "plan": the target resolves ``budget`` (its capacity, saved) and the allocator fills it; or the
        given ``--plan``; or, without a measurement, the uniform ``--format`` plan (a cheap pure function of the
        model, not checkpointed)."""
        from ..pipeline import check_measurement, make_plan, plan_for_assignments

        c = self.config
        if measurement is None:
            from ..quantize import uniform_assignments

            lo = self.loaded
            plan = plan_for_assignments(lo.view, uniform_assignments(lo.model, c.uniform_format, lo.view),
                                        f"uniform {c.uniform_format}")
            return plan, _capacity_of(plan)
        ppath = self.job.dir / PLAN_FILE
        if not self.job.stage_done("plan"):
            if c.measurement is not None:  # a table made elsewhere: for these weights?
                check_measurement(measurement, self.loaded.model)
            if c.plan is not None:
                plan = Plan.load(c.plan, measurement)
                cap = _capacity_of(plan)
            else:
                if budget is None:
                    raise InputError("a plan needs a budget")
                cap = target.capacity(budget, measurement, self.loaded.view)
                table = self.recovery_aware(measurement)
                with self.timer.stage("allocate"):
                    plan = make_plan(table, cap.plan_budget(measurement.fixed_bytes),
                                     self.constraints(target), c.objective)
            self.job.save_item("plan", "capacity", cap.to_dict())
            plan.save(ppath)
            self.job.complete_stage("plan", ppath)
        # always the plan read back: a resumed run continues with the same bytes
        return Plan.load(ppath, measurement), saved_capacity(self.job)

    def recovery_aware(self, measurement: Measurement) -> Measurement:
        """The table the allocator reads: ``measurement``, or with ``--recover-aware`` its errors scaled by each
        format's recovery gain (measured once on sample blocks of the full-precision model, on the recovery's
        training and held-out windows, saved in the job)."""
        rc = self.config.recover
        if not rc.aware:
            return measurement
        from ..recover.aware import block_tensors, format_gains, scaled_table

        if not self.job.has_item("plan", "recovery_gains"):
            windows, guard = self.recovery_windows  # trained and checked as the recovery stage will
            with self.timer.stage("recover.gains"):
                gains = format_gains(self.loaded.model, windows, measurement.formats(), rc, guard=guard,
                                     quant=int(self.calibration.shape[0]), placement=self.placement,
                                     progress=self.config.progress)
            self.job.save_item("plan", "recovery_gains", gains)
        saved = self.job.load_item("plan", "recovery_gains")
        return scaled_table(measurement, {str(k): float(v) for k, v in dict(saved).items()},
                            block_tensors(self.loaded.view))

    # ------------------------------------------------------------------------------------- quantize
    def quantize(self, plan: Plan) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
        """Stage "quantize", block by block: ``(qtensors, originals)``, originals being the fixed tensors'
        values before quantization (a target may store them at full precision).  With ``reuse_rounding`` the
        measurement's roundings of the plan's formats, read from the job (:func:`bitalloc.quantize.assemble_rounded`:
        no forward, no rounding)."""
        from ..quantize import assemble_rounded, quantize_model

        lo = self.loaded
        originals = {f.name: lo.model.get_parameter(f.name).detach().clone() for f in lo.view.fixed()}
        if self.config.reuse_rounding:
            q = assemble_rounded(lo.model, lo.view, plan, load_rounded(self.job, plan.assignments), timer=self.timer)
            self.job.complete_stage(QUANT_STAGE)
            return q, originals
        method: Any = self.config.method  # checked by RunConfig
        q = quantize_model(lo.model, lo.view, plan, self.calibration, method=method,
                           progress=self.config.progress, on_block=block_hook(self.job, QUANT_STAGE),
                           start=load_state(self.job, QUANT_STAGE), placement=self.placement, timer=self.timer)
        self.job.complete_stage(QUANT_STAGE)
        return q, originals

    # -------------------------------------------------------------------------------------- recover
    def recover(self, qtensors: dict[str, QTensor], originals: dict[str, torch.Tensor]
                ) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
        """Stage "recover" (``config.recover``; nothing when its mode is "none"): the quantized model trained toward
        a second, full-precision copy of the source on the calibration windows, block by block (checkpointed per
        block), then end to end.  Returns the recovered QTensors (same formats, same bytes) and the originals with
        the fixed tensors' trained values (a target storing them at full precision writes those)."""
        from ..quantize import set_weight
        from ..rounding import dequantize

        rc = self.config.recover
        if not rc.active:
            return qtensors, originals
        model = self.loaded.model
        path = self.job.dir / RECOVER_FILE
        if not self.job.stage_done("recover"):
            from ..recover import recover_model

            ckpt = RecoverCheckpoints(self.job)
            saved = ckpt.start()
            start, given = None, qtensors
            if saved is not None:
                start, done_q, done_v = saved
                for name, q in done_q.items():
                    set_weight(model, name, dequantize(q).reshape(model.get_parameter(name).shape))
                given = {**qtensors, **done_q}
            # rotated like the student: recovery matches them block by block
            teacher = self.load_source(tokenizer=False)[0]
            windows, guard = self.recovery_windows
            q, values = recover_model(model, teacher, windows, given, rc, placement=self.placement,
                                      progress=self.config.progress, on_block=ckpt.on_block, start=start,
                                      timer=self.timer, guard=guard)
            if saved is not None:
                values = {**saved[2], **values}
            changed = {n: t for n, t in q.items() if t is not qtensors.get(n)}
            save_recovered(self.job, 0, changed, values, "recover")
            self.job.complete_stage("recover", path)
            self.job.discard(RECOVER_STAGE)
        changed, values = load_recovered(path)  # always what the job saved: a resumed run writes the same bytes
        for name, t in changed.items():
            set_weight(model, name, dequantize(t).reshape(model.get_parameter(name).shape))
        return {**qtensors, **changed}, {**originals, **values}

    # --------------------------------------------------------------------------------------- export
    def export(self, target: Target, plan: Plan, capacity: Capacity, qtensors: dict[str, QTensor],
               originals: dict[str, torch.Tensor]) -> Written:
        """Stage "export": the expected digests are saved, then the target writes, verifies and asserts the size."""
        lo = self.loaded
        with self.timer.stage("write"):
            prepared = target.prepare(lo.model, lo.view, plan, qtensors, originals, lo.tokenizer)
            self.job.save_item("export", "expected", prepared.expected)
            written = target.write_verified(prepared, capacity, overwrite=self.config.overwrite)
        self.job.complete_stage("export")
        return written


def saved_capacity(job: Job) -> Capacity:
    """The capacity stage "plan" saved."""
    return Capacity.from_dict(job.load_item("plan", "capacity"), f"job {job.dir}: plan/capacity")


def _capacity_of(plan: Plan) -> Capacity:
    """A plan made without a target (``--plan``, ``--format``): its own budget, over all weights."""
    return Capacity(plan.budget, plan.budget_bytes, plan.budget_bytes - plan.fixed_bytes, plan.fixed_bytes, "weights")


__all__ = ["Loaded", "MEASUREMENT_FILE", "PLAN_FILE", "Stages", "measure_stage", "saved_capacity"]
