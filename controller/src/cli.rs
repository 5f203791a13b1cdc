//! Command-line arguments of `ckpt-controller`. The doc comments are the `--help` text.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// ckpt-controller: checkpoints of whole jobs across nodes.
///
/// Built so far: the cluster CA (`ca`), and in the library the barrier state
/// machine and the mutual-TLS QUIC set-up. Not built yet: `serve`, `job save`,
/// `job restore`, `ckpt list/show/rm` and `demo` (the "Job checkpoints" issue);
/// `ckpt-agent` dumps and restores single process trees today.
#[derive(Debug, Parser)]
#[command(name = "ckpt-controller", version, verbatim_doc_comment)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The cluster's certificate authority: every agent and the controller prove
    /// who they are with a certificate it signed (mutual TLS over QUIC), and a peer
    /// without one is refused at the handshake.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the cluster CA, the controller's certificate and the named agents'.
    ///
    /// Example:
    ///   ckpt-controller ca init --dir /etc/ckpt/pki --controller-name ctl.cluster \
    ///       --agent node001 --agent node002
    /// Then copy agents/NODE.pem, agents/NODE.key and ca.pem to each node. ca.key
    /// stays on the controller's host.
    #[command(verbatim_doc_comment)]
    Init {
        /// Directory for the files (created; must not hold a CA already).
        #[arg(long)]
        dir: PathBuf,
        /// Names and addresses agents use to reach the controller (repeatable).
        #[arg(long = "controller-name", value_name = "NAME")]
        controller_names: Vec<String>,
        /// An agent node to issue a certificate for (repeatable).
        #[arg(long = "agent", value_name = "NAME")]
        agents: Vec<String>,
    },
    /// Issue a certificate for one more agent node.
    Issue {
        /// The directory of `ca init`.
        #[arg(long)]
        dir: PathBuf,
        /// The node's name.
        #[arg(long, value_name = "NAME")]
        agent: String,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ca(CaCommand::Init {
            dir,
            controller_names,
            agents,
        }) => {
            crate::tls::ca_init(&dir, &controller_names, &agents)?;
            println!("cluster CA created in {}", dir.display());
            println!("  controller: {}/controller.pem", dir.display());
            for a in &agents {
                println!("  agent {a}: {}/agents/{a}.pem", dir.display());
            }
            println!("keep {}/ca.key on this host only", dir.display());
        }
        Command::Ca(CaCommand::Issue { dir, agent }) => {
            let (cert, key) = crate::tls::ca_issue(&dir, &agent)?;
            println!("agent {agent}: {} and {}", cert.display(), key.display());
        }
    }
    Ok(())
}
