"""The stage chain: v1-1 (256) -> v1-1 (512) -> v1-2 -> v1-3 as Slurm jobs linked by afterok.

Each stage after the first is initialised from the previous stage's export
(`stage.init.from_checkpoint=<previous run.dir>/export`); what it carries (weights, EMA, step,
warmup) is the stage config's `stage.init`. Submitting a chain again is safe: a finished stage is
skipped, a stage that Slurm still holds (pending, running, requeued) is not submitted twice and the
next stage waits for that job, and anything else is submitted, resuming from its own checkpoints.

A stage with `stage.data.precompute_from` also waits for the job making its latent shards
(launch/precompute.py), submitted first and once per latent folder, unless they are all there already.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from launch.config import ConfigError, StageJob, stage_job
from launch.precompute import PrecomputeJob, same_work
from train.overrides import later_wins, refuse_repeated

# conf/stage/<name>.yaml, in training order (SD v1 model card).
DEFAULT_STAGES = "v1-1_256,v1-1_512,v1-2,v1-3"


@dataclass(frozen=True)
class StageSpec:
    label: str  # stage.name: the run folder, and the prefix of overrides meant for this stage only
    config: str  # the stage config group option


def parse_stages(text: str) -> list[StageSpec]:
    """"a,b,c" runs those stage configs; "label=config" runs a config under another stage.name
    (its own run folder), e.g. the same config twice in a test."""
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        label, _, config = item.partition("=")
        specs.append(StageSpec(label, config or label))
    labels = [s.label for s in specs]
    if not specs or len(set(labels)) != len(labels):
        raise ConfigError(f"--stages {text!r}: give one or more distinct stage names, e.g. {DEFAULT_STAGES}")
    return specs


def split_overrides(tokens: Sequence[str], labels: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Overrides for every stage, and `LABEL:key=value` ones for one stage (e.g. its shards)."""
    common, scoped = [], {label: [] for label in labels}
    for token in tokens:
        key = token.split("=", 1)[0]
        if ":" in key:
            label, _, rest = token.partition(":")
            if label not in scoped:
                raise ConfigError(f"{token!r} is scoped to stage {label!r}, which is not in the chain "
                                  f"({', '.join(labels)})")
            scoped[label].append(rest)
        elif key in ("stage", "stage.name"):
            raise ConfigError(f"{token!r}: a chain picks its stages with --stages (label=config to rename one)")
        else:
            common.append(token)
    return common, scoped


def compose_chain(specs: Sequence[StageSpec], tokens: Sequence[str], *, strict: bool = True) -> list[StageJob]:
    """Every stage's job, composed (and, with `strict`, checked) before anything is submitted."""
    refuse_repeated(tokens)
    common, scoped = split_overrides(tokens, [s.label for s in specs])
    jobs: list[StageJob] = []
    for spec in specs:
        chained = [f"stage.name={spec.label}"] if spec.label != spec.config else []
        if jobs:
            chained.append(f"stage.init.from_checkpoint={jobs[-1].run_dir / 'export'}")
        overrides = later_wins([f"stage={spec.config}", *common], chained, scoped[spec.label])
        try:
            jobs.append(stage_job(overrides, strict=strict))
        except ConfigError as err:  # say which stage, and how to set a value for it alone
            raise ConfigError(f"stage {spec.label}: {err} (for this stage only: {spec.label}:key=value)") from None
    dirs = [j.run_dir for j in jobs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"two stages share a run folder ({dirs}): keep run.dir's default "
                          "(runs/${run.name}/${stage.name}) or put ${stage.name} in it")
    return jobs


@dataclass
class Decision:
    job: StageJob | PrecomputeJob
    action: str  # "finished": skipped; "queued": Slurm already holds it as job_id; "submit"
    job_id: str | None = None
    after: str | None = None  # the job it waits for (afterok)


def plan(jobs: Sequence[StageJob], status_of: Callable, active_of: Callable) -> list[Decision]:
    """What to do with each stage, from its status.json (`status_of(run_dir)`) and from Slurm
    (`active_of(run_dir)`: the job id if still pending/running, else None)."""
    decisions: list[Decision] = []
    for job in jobs:
        status = status_of(job.run_dir)
        if status is not None and status.get("state") == "finished":
            unfinished = [d.job.stage for d in decisions if d.action != "finished"]
            if unfinished:
                raise ConfigError(f"stage {job.stage} is finished but the earlier {unfinished} are not, so it was "
                                  f"not initialised from them; remove {job.run_dir} or leave them out of --stages")
            decisions.append(Decision(job, "finished"))
            continue
        active = active_of(job.run_dir)
        decisions.append(Decision(job, "queued", job_id=active) if active else Decision(job, "submit"))
    return decisions


def plan_precompute(decisions: Sequence[Decision], active_of: Callable) -> list[Decision]:
    """The latent-shard jobs (launch/precompute.py) of the stages about to be submitted, one per latent
    folder: "finished" when every latent shard is there, "queued" when Slurm holds its job, else "submit"."""
    by_folder: dict = {}
    for d in decisions:
        job = d.job.precompute
        if d.action != "submit" or job is None:
            continue  # a finished stage needs nothing; a queued one was submitted with its dependencies
        if job.out_dir in by_folder:
            same_work(by_folder[job.out_dir].job, job)
            continue
        if not job.missing():
            by_folder[job.out_dir] = Decision(job, "finished")
        else:
            active = active_of(job.run_dir)
            by_folder[job.out_dir] = Decision(job, "queued", job_id=active) if active else Decision(job, "submit")
    return list(by_folder.values())


def execute(decisions: Sequence[Decision], submit: Callable[[StageJob, str | None], str],
            precompute: Sequence[Decision] = ()) -> None:
    """Submit the latent-shard jobs, then the stages in order; each submitted stage waits (afterok) for the
    previous stage's job and for its latent shards' job, where either is still to run."""
    for d in precompute:
        if d.action == "submit":
            d.job_id = submit(d.job, None)
    latents_job = {d.job.out_dir: d.job_id for d in precompute}  # None when the shards are all there
    previous: str | None = None
    for d in decisions:
        if d.action == "submit":
            made_by = latents_job.get(d.job.precompute.out_dir) if d.job.precompute else None
            d.after = ":".join(j for j in (previous, made_by) if j) or None
            d.job_id = submit(d.job, d.after)
        previous = d.job_id  # None after a finished stage: nothing to wait for


def describe(d: Decision) -> str:
    if d.action == "finished":
        if isinstance(d.job, PrecomputeJob):
            return f"{d.job.stage}: all {len(d.job.latents)} latent shards in {d.job.out_dir}, nothing to make"
        return f"{d.job.stage}: finished, skipped ({d.job.run_dir})"
    if d.action == "queued":
        return f"{d.job.stage}: already in Slurm as job {d.job_id}, not submitted again"
    after = f" after job{'s' if ':' in d.after else ''} {d.after.replace(':', ', ')} (afterok)" if d.after else ""
    if isinstance(d.job, PrecomputeJob):
        return (f"{d.job.stage}: submitted as job {d.job_id}: {len(d.job.missing())} of {len(d.job.latents)} "
                f"latent shards to make -> {d.job.out_dir}")
    return f"{d.job.stage}: submitted as job {d.job_id}{after} -> {d.job.run_dir}"
