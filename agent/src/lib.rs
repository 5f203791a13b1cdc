//! ckpt-agent: the per-node process engine.
//!
//! It freezes process trees with ptrace and dumps them from outside (no parasite
//! code in the target), and rebuilds them from an image inside ptrace-held husks.
//! See `../shared/DESIGN.md` (The stance, Restore, Storage).
//!
//! Layout: each resource keeps its dump and its restore together — [`thread`],
//! [`signals`], [`mem`], [`fd`] — while [`dump`] and [`restore`] only order the
//! steps. System calls are wrapped in [`sys`]; [`inject`] runs single system calls
//! inside a stopped thread.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod cli;
pub mod dump;
pub mod fd;
pub mod freeze;
pub mod inject;
pub mod inspect;
pub mod mem;
pub mod pidns;
pub mod restore;
pub mod signals;
pub mod sys;
pub mod thread;
