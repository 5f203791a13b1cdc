//! ckpt's SPANK plugin: adds `--checkpoint` and `--restart-from` to `srun`/`sbatch`
//! and registers each task with its node's agent.
//!
//! Not built yet: this crate is the skeleton that the Slurm work fills. It exports
//! no SPANK symbols, so Slurm cannot load it by mistake.
