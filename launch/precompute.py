"""The latent shards a stage reads, made by a Slurm job before it when `stage.data.precompute_from` names
the image shards they come from: `python -m data precompute` on every GPU of the stage's cluster (one
srun task per GPU, `--part env`: each takes every N-th image shard).

`python -m data precompute` names each latent shard after its image shard, so `stage.data.shards` must
list the same file names in one folder; that folder identifies the job. Its Slurm record, scripts and
logs live in `<latent folder>/.precompute/` (not in a stage's run folder): stages that read the same
latents (v1-2 and v1-3) and later submissions find one job. It is done when every latent shard exists
(each is written under a temporary name and renamed when complete), so a job stopped part-way (time
limit, pre-emption, a failed node) is simply submitted again and skips the shards already written.

The latents must come from the VAE the stage trains with: `model.pretrained_first_stage`'s or
`model.pretrained_vae` (with `model.pretrained_text_encoder` for caption contexts), or (toy models only)
the random one the trainer builds from `run.seed`; encoded in the precision the stage's loop would
encode images in (bf16 autocast at `parallel.precision=bf16`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from train.config import ClusterConfig, ConfigError

PRECOMPUTE_DIR = ".precompute"
# Architectures `python -m data precompute --arch` builds (mini's first stage is not a VAE).
ARCHS = ("sd-v1", "tiny")


@dataclass(frozen=True)
class PrecomputeJob:
    name: str  # the Slurm job name
    stage: str  # "<stage>/precompute": the stage that asked for it first
    run_dir: Path  # <latent folder>/.precompute: the Slurm record, scripts and logs
    cluster: ClusterConfig
    out_dir: Path
    latents: tuple[Path, ...]  # what the stage reads, in order
    args: tuple[str, ...]  # for `python -m data precompute`, but --device and --part
    workdir: Path = field(default_factory=Path.cwd)  # where the launcher ran (as StageJob.workdir)

    def missing(self) -> list[Path]:
        return [path for path in self.latents if not path.is_file()]

    @property
    def tasks_per_node(self) -> int:
        return self.cluster.gpus_per_node

    @property
    def cpus_per_task(self) -> int:
        """cluster.cpus_per_task is a node's share (the trainer runs one task per node); split it."""
        return max(1, self.cluster.cpus_per_task // self.cluster.gpus_per_node)


def _local(url: str, setting: str) -> Path:
    if url.startswith("pipe:"):
        raise ConfigError(f"{setting}: {url!r} is a pipe: URL; precompute reads and writes local files (or a "
                          "shared file system)")
    return Path(url.removeprefix("file:")).expanduser().absolute()


def _check_images(first: Path) -> None:
    """The first image shard, where it is there already: latent shards named by mistake (a stage's
    `shards` value pasted into `precompute_from`) fail here, not after the job's wait in the queue."""
    from data.samples import WrongShardKind, check_shard_kind

    if not first.is_file():
        return  # not downloaded yet: precompute says which shard is missing when it runs
    try:
        check_shard_kind(str(first), latents=False, latent_size=None)
    except WrongShardKind:
        raise ConfigError(f"stage.data.precompute_from: {first} holds latents, not images: point it at the image "
                          "shards the latents are made from (or, to train on these latents as they are, remove "
                          "precompute_from and point stage.data.shards at them)") from None


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def precompute_job(cfg, cluster: ClusterConfig) -> PrecomputeJob | None:
    """The job that makes the stage's latent shards from `stage.data.precompute_from`, or None if unset.
    `cfg` is the typed config (train.config.TrainConfig), already validated."""
    from data.loader import expand_shards

    data = cfg.stage.data
    if data.precompute_from is None:
        return None
    images = [_local(u, "stage.data.precompute_from") for u in expand_shards(data.precompute_from)]
    latents = [_local(u, "stage.data.shards") for u in expand_shards(data.shards)]
    folders = sorted({str(p.parent) for p in latents})
    if len(folders) != 1:
        raise ConfigError(f"stage.data.shards lists latent shards in {len(folders)} folders ({', '.join(folders[:3])}"
                          "...); with precompute_from they are made in one folder: point shards at one")
    if [p.name for p in latents] != [p.name for p in images]:
        raise ConfigError(f"stage.data.shards ({len(latents)} shards, {latents[0].name}...) and "
                          f"stage.data.precompute_from ({len(images)}, {images[0].name}...) must list the same file "
                          "names in the same order: each latent shard is named after its image shard")
    _check_images(images[0])
    if cfg.model.arch not in ARCHS:
        raise ConfigError(f"stage.data.precompute_from with model.arch={cfg.model.arch}: latent shards come from a "
                          f"VAE ({' or '.join(ARCHS)}); this arch has none")
    model = cfg.model
    if model.pretrained_first_stage:
        source = ["--checkpoint", _absolute(model.pretrained_first_stage)]
    elif model.pretrained_vae:
        source = ["--vae", _absolute(model.pretrained_vae)]
        if data.context:
            if not model.pretrained_text_encoder:
                raise ConfigError("stage.data.context=true: the caption contexts come from the stage's text encoder; "
                                  "set model.pretrained_text_encoder beside model.pretrained_vae")
            source += ["--text-encoder", _absolute(model.pretrained_text_encoder)]
    elif model.arch == "tiny" and not model.pretrained_text_encoder:
        source = ["--random", "--seed", str(cfg.run.seed)]  # the trainer's own random VAE
    else:
        raise ConfigError("stage.data.precompute_from: set model.pretrained_first_stage to the SD v1 checkpoint whose "
                          "VAE the stages train with (or model.pretrained_vae to that VAE); the latents must come "
                          "from that VAE")
    out_dir = latents[0].parent
    # The encode precision the stage's loop would use on images (bf16 autocast, else float32: SD's VAE
    # overflows in fp16), so the latents are the ones the run would make itself.
    dtype = "bfloat16" if cfg.parallel.precision == "bf16" else "float32"
    args = [data.precompute_from, "--out", str(out_dir), *source, "--arch", cfg.model.arch,
            "--resolution", str(data.resolution), "--dtype", dtype, "--no-progress"]
    if not data.context:
        args.append("--no-text")  # the trainer encodes captions in its loop
    return PrecomputeJob(name=f"{cfg.run.name}.precompute.{out_dir.name}", stage=f"{cfg.stage.name}/precompute",
                         run_dir=out_dir / PRECOMPUTE_DIR, cluster=cluster, out_dir=out_dir, latents=tuple(latents),
                         args=tuple(args))


def precompute_argv(job: PrecomputeJob, *, python: str) -> list[str]:
    """One task's command, `[exec_prefix] python -m data precompute ...`: under torchrun or srun, `--part env`
    is the task's share and `--device cuda` its own GPU (LOCAL_RANK / SLURM_LOCALID)."""
    return [*job.cluster.exec_prefix, python, "-m", "data", "precompute", *job.args, "--device", job.cluster.device,
            "--decode-workers", str(job.cpus_per_task), "--part", "env"]


def same_work(a: PrecomputeJob, b: PrecomputeJob) -> None:
    """Two stages may share a latent folder only if they make it the same way."""
    if a.args != b.args or a.latents != b.latents:
        raise ConfigError(f"{a.stage} and {b.stage} both make latent shards in {a.out_dir} but differently "
                          f"({' '.join(a.args)} / {' '.join(b.args)}): give each its own folder")
